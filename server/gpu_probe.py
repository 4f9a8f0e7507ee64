"""Which compute devices llama.cpp sees, and their memory: logged at start-up.

The most common complaint about peers' images is a GPU silently unused, so the server says plainly
what it found. The probe runs in a child process (`python -m server.gpu_probe`), so the API process
never loads llama.cpp itself; it reads ggml's device registry through ctypes, since the Python
bindings do not expose it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("berth.gpu")

# ggml_backend_dev_type: 0 = CPU, 1 = GPU, 2 = integrated GPU, 3 = accelerator.
_GPU_TYPES = {1: "gpu", 2: "igpu", 3: "accelerator"}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str
    free_bytes: int
    total_bytes: int


def probe_devices() -> list[Device]:
    """Devices ggml reports (run this in a child process: it loads llama.cpp)."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    llama_cpp.llama_backend_init()
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (base.ggml_backend_dev_name, base.ggml_backend_dev_description):
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)]
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = _GPU_TYPES.get(base.ggml_backend_dev_type(dev), "cpu")
        devices.append(Device((base.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                              (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                              kind, free.value, total.value))
    return devices


def describe(devices: list[Device]) -> str:
    """One plain sentence for the log."""
    gpus = [d for d in devices if d.kind != "cpu"]
    if not gpus:
        return ("llama.cpp found no GPU backend: models run on the CPU. For GPU offload use the cuda or rocm "
                "image (docker run --gpus all ... berth:cuda) or llama-cpp-python built with GGML_CUDA/GGML_HIP")
    listed = "; ".join(f"{d.name} ({d.description}), {d.free_bytes / 2**30:.1f} of {d.total_bytes / 2**30:.1f} "
                       f"GiB free" for d in gpus)
    return f"llama.cpp found {len(gpus)} GPU device(s): {listed}"


def log_devices(timeout: float = 60.0) -> None:
    """Run the probe in a child process and log what it found (never raises)."""
    try:
        result = subprocess.run([sys.executable, "-m", "berth.server.gpu_probe"], capture_output=True, text=True,
                                timeout=timeout)
        devices = [Device(**d) for d in json.loads(result.stdout.strip().splitlines()[-1])]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, TypeError) as exc:
        log.warning("could not ask llama.cpp which devices it sees (%s); assuming CPU", exc)
        return
    log.info(describe(devices))


if __name__ == "__main__":
    print(json.dumps([d.__dict__ for d in probe_devices()]))
