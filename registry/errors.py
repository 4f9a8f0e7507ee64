"""The error hierarchy of `registry/`.

Each class says what kind of failure it is; the HTTP layer maps kinds to status codes once
(server/api/errors.py). Messages say what was wrong and, where it helps, what to do.
"""

from __future__ import annotations


class BerthError(Exception):
    """Base of every error Berth raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(BerthError):
    """The caller sent something malformed: a bad name, digest, body or option."""


class InvalidField(InvalidInput):
    """One field of a request has the wrong type or an out-of-range value; `field` is its path
    (`options.num_ctx`, `messages.2.content`), which APIs that name parameters report."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class InvalidName(InvalidInput):
    """A model name breaks the grammar."""


class InvalidDigest(InvalidInput):
    """A digest string is not `sha256:` followed by 64 lowercase hex characters."""


class NotFound(BerthError):
    """A model, blob or other object does not exist."""


class ModelNotFound(NotFound):
    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"model '{name}' not found")
        self.name = name


class BlobNotFound(NotFound):
    def __init__(self, digest: str) -> None:
        super().__init__(f'blob "{digest}" not found')
        self.digest = digest


class DigestMismatch(InvalidInput):
    """Bytes did not hash to the digest they were supposed to have."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f'digest mismatch, expected "{expected}", got "{actual}"')
        self.expected = expected
        self.actual = actual


class TooLarge(InvalidInput):
    """A body or file is larger than the bound that applies to it."""


class Conflict(BerthError):
    """What a request would make exists already (a live API key of that name)."""


class CorruptData(BerthError):
    """Something stored on disk or in the catalog is damaged (run `berth fsck`)."""


class SchemaTooNew(BerthError):
    """The catalog was written by a newer Berth; refusing to touch it."""
