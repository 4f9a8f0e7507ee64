"""Server settings, read once from the environment at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from server.address import HostAddress, parse_host


def _flag(value: str | None) -> bool:
    # As Ollama's env booleans: empty is false; a non-empty value that is not a known false is true.
    return bool(value) and value.strip().lower() not in ("0", "false", "f", "no", "off")


@dataclass(frozen=True)
class Settings:
    host: HostAddress
    models_dir: Path
    import_default_model: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        models = env.get("BERTH_MODELS") or str(Path.home() / ".berth" / "models")
        return cls(
            host=parse_host(env.get("BERTH_HOST")),
            models_dir=Path(models).expanduser(),
            import_default_model=not _flag(env.get("BERTH_NO_DEFAULT_MODEL")),
        )
