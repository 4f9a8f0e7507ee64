"""The start-up device report: plain about a CPU fallback, specific about GPUs."""

from __future__ import annotations

import time

from berth.server.gpu_probe import Device, describe, probe_devices
from tests.conftest import BerthServer


def test_this_machine_reports_cpu_only() -> None:
    devices = probe_devices()
    assert devices and all(d.kind == "cpu" for d in devices)  # CI machines have no GPU
    assert "no GPU backend" in describe(devices)


def test_gpu_devices_are_named_with_their_memory() -> None:
    cuda = Device("CUDA0", "NVIDIA H100 80GB HBM3", "gpu", 80 * 2**30, 81 * 2**30)
    text = describe([Device("CPU", "AMD EPYC", "cpu", 0, 0), cuda])
    assert "1 GPU device(s)" in text and "NVIDIA H100" in text and "80.0 of 81.0 GiB free" in text


def test_the_server_logs_the_fallback(server: BerthServer) -> None:
    deadline = time.monotonic() + 60
    while "no GPU backend" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "llama.cpp found no GPU backend: models run on the CPU" in server.log()
