"""Server settings, read once from the environment at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from berth.server.address import HostAddress, parse_host
from berth.server.durations import parse_env_keep_alive
from berth.server.guard import BUILTIN_ORIGINS, parse_origins


def _flag(value: str | None) -> bool:
    # As Ollama's env booleans: empty is false; a non-empty value that is not a known false is true.
    return bool(value) and value.strip().lower() not in ("0", "false", "f", "no", "off")


def _int(env: Mapping[str, str], key: str, default: int, minimum: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{key}={value} is below the minimum of {minimum}")
    return value


def _signing_key(env: Mapping[str, str]) -> Path | None:
    if "BERTH_SIGNING_KEY" not in env:
        return None  # and no need to load the cryptography package at every start
    from berth.registry.user_key import signing_key_setting

    return signing_key_setting(env)


@dataclass(frozen=True)
class Settings:
    host: HostAddress
    models_dir: Path
    import_default_model: bool = True
    keep_alive: float = 300.0
    max_loaded_models: int = 3
    num_parallel: int = 0  # 0: by hardware (4 on a GPU, 2 on the CPU, fewer if their KV does not fit)
    max_queue: int = 512
    load_timeout: float = 300.0
    context_length: int = 4096
    origins: tuple[str, ...] = BUILTIN_ORIGINS
    no_auth: bool = False
    batching: bool = True  # BERTH_BATCHING=0: one generation at a time per runner
    loopback_needs_key: bool = False
    flash_attention: bool = True  # BERTH_FLASH_ATTENTION=0 turns llama.cpp's flash attention off
    # BERTH_DETERMINISTIC=1: a request's output does not depend on what else its runner is doing
    # (batch-invariant kernels, one KV stream per slot), at ~15% of the throughput.
    deterministic: bool = False
    signing_key: Path | None = None  # BERTH_SIGNING_KEY: pushes are signed with it unless told not to

    @property
    def keys_required(self) -> bool:
        """Beyond loopback, every request needs a key unless the operator said --no-auth;
        BERTH_LOOPBACK_AUTH asks for keys from every client, loopback ones included."""
        return self.loopback_needs_key or (not self.host.is_loopback and not self.no_auth)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        models = env.get("BERTH_MODELS") or str(Path.home() / ".berth" / "models")
        return cls(
            host=parse_host(env.get("BERTH_HOST")),
            models_dir=Path(models).expanduser(),
            import_default_model=not _flag(env.get("BERTH_NO_DEFAULT_MODEL")),
            keep_alive=parse_env_keep_alive(env.get("BERTH_KEEP_ALIVE")),
            max_loaded_models=_int(env, "BERTH_MAX_LOADED_MODELS", 3, minimum=1),
            num_parallel=_int(env, "BERTH_NUM_PARALLEL", 0, minimum=0),
            max_queue=_int(env, "BERTH_MAX_QUEUE", 512, minimum=0),
            load_timeout=parse_env_keep_alive(env.get("BERTH_LOAD_TIMEOUT") or "5m"),
            context_length=_int(env, "BERTH_CONTEXT_LENGTH", 4096, minimum=4),
            origins=parse_origins(env.get("BERTH_ORIGINS")),
            no_auth=_flag(env.get("BERTH_NO_AUTH")),
            batching=_flag(env.get("BERTH_BATCHING") or "1"),  # unset or empty: on
            loopback_needs_key=_flag(env.get("BERTH_LOOPBACK_AUTH")),
            flash_attention=_flag(env.get("BERTH_FLASH_ATTENTION") or "1"),  # unset or empty: on
            deterministic=_flag(env.get("BERTH_DETERMINISTIC")),
            signing_key=_signing_key(env),
        )
