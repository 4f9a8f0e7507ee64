"""SHA-256 digests: the only form of content address Berth accepts.

A digest is validated before it is ever joined to a path or a URL (the Probllama lesson):
`sha256:` followed by exactly 64 lowercase hex characters. Blob files use `sha256-<hex>`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from berth.registry.errors import InvalidDigest

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BLOB_FILE = re.compile(r"sha256-[0-9a-f]{64}")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated `sha256:<hex>` digest."""

    hex: str

    def __post_init__(self) -> None:
        if len(self.hex) != 64 or not all(c in "0123456789abcdef" for c in self.hex):
            raise InvalidDigest(f"invalid digest format: {self.hex!r} is not 64 lowercase hex characters")

    @classmethod
    def parse(cls, text: object) -> "Digest":
        """Accept exactly `sha256:<64 lowercase hex>`; anything else raises InvalidDigest."""
        if not isinstance(text, str) or not _DIGEST.fullmatch(text):
            raise InvalidDigest(
                f"invalid digest format: {str(text)[:100]!r}; expected 'sha256:' followed by 64 lowercase hex characters"
            )
        return cls(text[7:])

    @classmethod
    def from_filename(cls, filename: str) -> "Digest | None":
        """The digest a blob file name stands for, or None for anything that is not a blob."""
        if _BLOB_FILE.fullmatch(filename):
            return cls(filename[7:])
        return None

    @classmethod
    def of_bytes(cls, data: bytes) -> "Digest":
        return cls(hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def filename(self) -> str:
        """The blob file name: `sha256-<hex>` (no colon, so it is valid on every filesystem)."""
        return f"sha256-{self.hex}"

    @property
    def short(self) -> str:
        """The first 12 hex characters, as progress messages and `berth list` show."""
        return self.hex[:12]
