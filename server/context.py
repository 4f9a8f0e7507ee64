"""The application's objects, built once at start-up and passed to handlers (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass

from registry.library import Library
from server.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    library: Library

    def close(self) -> None:
        self.library.close()
