"""Human-readable sizes, times and model summaries, as Ollama's CLI prints them."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def human_bytes(size: int) -> str:
    """Decimal units; integer when >= 10 or whole, else one decimal (`4.7 GB`, `934 MB`)."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 1000 or unit == "PB":
            break
    if value >= 10 or value == int(value):
        return f"{int(value)} {unit}"
    return f"{value:.1f} {unit}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def human_duration(seconds: float) -> str:
    if seconds < 1:
        return "Less than a second"
    if seconds < 60:
        return _count(int(seconds), "second")
    minutes = seconds / 60
    if minutes < 2:
        return "About a minute"
    if minutes < 60:
        return _count(int(minutes), "minute")
    hours = minutes / 60
    if hours < 2:
        return "About an hour"
    if hours < 48:
        return _count(int(hours), "hour")
    days = hours / 24
    if days < 14:
        return _count(int(days), "day")
    if days < 60:
        return _count(int(days / 7), "week")
    if days < 730:
        return _count(int(days / 30), "month")
    return _count(int(days / 365), "year")


def human_time(moment: datetime, now: datetime | None = None) -> str:
    """`3 minutes ago`, `4 minutes from now`, `Forever` beyond 20 years ahead."""
    now = now or datetime.now(timezone.utc)
    delta = (moment - now).total_seconds()
    if delta > 20 * 365 * 86400:
        return "Forever"
    if delta >= 0:
        return f"{human_duration(delta)} from now"
    return f"{human_duration(-delta)} ago"


def show_summary(info: dict[str, Any]) -> str:
    details = info.get("details") or {}
    model_info = info.get("model_info") or {}
    arch = model_info.get("general.architecture") or details.get("family", "")
    rows = [("architecture", arch), ("parameters", details.get("parameter_size", ""))]
    if f"{arch}.context_length" in model_info:
        rows.append(("context length", str(model_info[f"{arch}.context_length"])))
    if f"{arch}.embedding_length" in model_info:
        rows.append(("embedding length", str(model_info[f"{arch}.embedding_length"])))
    rows.append(("quantization", details.get("quantization_level", "")))
    out = ["  Model"] + [f"    {key:<20}{value}" for key, value in rows]
    if info.get("capabilities"):
        out += ["", "  Capabilities"] + [f"    {cap}" for cap in info["capabilities"]]
    if info.get("parameters"):
        out += ["", "  Parameters"] + [f"    {line}" for line in info["parameters"].splitlines()]
    if info.get("system"):
        out += ["", "  System"] + [f"    {line}" for line in info["system"].splitlines()[:5]]
    if info.get("license"):
        out += ["", "  License"] + [f"    {line}" for line in info["license"].splitlines()[:2]]
    return "\n".join(out) + "\n"
