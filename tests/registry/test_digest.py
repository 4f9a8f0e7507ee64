"""Digest validation happens before any path join."""

from __future__ import annotations

import hashlib

import pytest

from berth.registry.digest import Digest
from berth.registry.errors import InvalidDigest

GOOD = "sha256:" + "a" * 64


def test_parse_accepts_canonical_form() -> None:
    digest = Digest.parse(GOOD)
    assert str(digest) == GOOD
    assert digest.filename == "sha256-" + "a" * 64
    assert digest.short == "a" * 12


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,  # upper case would name a different file
        "sha256-" + "a" * 64,
        "sha512:" + "a" * 128,
        "sha256:" + "g" * 64,
        "sha256:../../../../etc/passwd",
        "sha256:" + "a" * 60 + "/../",
        " sha256:" + "a" * 64,
        "sha256:" + "a" * 64 + "\n",
        None,
        42,
    ],
)
def test_parse_rejects_everything_else(text: object) -> None:
    with pytest.raises(InvalidDigest, match="invalid digest format"):
        Digest.parse(text)


def test_constructor_validates_too() -> None:
    with pytest.raises(InvalidDigest):
        Digest("../" + "a" * 61)


def test_of_bytes_matches_hashlib() -> None:
    assert Digest.of_bytes(b"berth").hex == hashlib.sha256(b"berth").hexdigest()


def test_from_filename_only_for_blob_names() -> None:
    assert Digest.from_filename("sha256-" + "b" * 64) == Digest("b" * 64)
    assert Digest.from_filename("sha256:" + "b" * 64) is None
    assert Digest.from_filename(".incoming-1234") is None
    assert Digest.from_filename("sha256-" + "b" * 64 + "-partial") is None
