"""Pull benchmark: Berth against curl on the same blob, and a resume after killing the server.

1. The default model is pushed to a local docker-registry. Its weights blob is downloaded by
   `curl` to a file, then the model is pulled by a live Berth server (`POST /api/pull`: ranged
   chunks, digest verified, durable): the ratio of throughputs is printed (target >= 0.9). Two more
   baselines verify and sync as a pull does: curl piped through tee and openssl, and the simplest
   Python loop on one socket (what verifying and syncing cost by themselves, on this disk).
2. A Berth server pulls the model through a byte-counting TCP proxy in front of the registry; it is
   killed (SIGKILL) at about half the weights, restarted on the same store, and pulls again: the bytes
   the proxy carried for the second pull are compared with what was left (target <= left + a chunk).

Run: .venv/bin/python bench/bench_pull.py [--rounds 9]   (loopback only; needs /usr/bin/docker-registry and curl)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.registry.default_model import ensure_default_model  # noqa: E402
from berth.registry.library import Library  # noqa: E402
from berth.registry.manifest import MODEL_LAYER  # noqa: E402
from berth.registry.names import ModelName  # noqa: E402
from berth.registry.oci import RegistryClient  # noqa: E402
from berth.registry.pull import CHECKPOINT_BYTES, DEFAULT_CHUNK_SIZE, DEFAULT_PARALLEL  # noqa: E402
from berth.registry.push import Pusher  # noqa: E402
from tests.conftest import start_server  # noqa: E402
from tests.registry_fixture import start_registry  # noqa: E402

# Rounds of each side, alternating: this kind of VM's disk and CPU vary from second to second.
ROUNDS = 9


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts the bytes flowing from the upstream to clients."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.downstream_bytes = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 20):
                target.sendall(data)
                if count:
                    with self._lock:
                        self.downstream_bytes += len(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> int:
        with self._lock:
            value, self.downstream_bytes = self.downstream_bytes, 0
            return value


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _sha256_cpu(size: int) -> float:
    data = os.urandom(min(size, 64 << 20))
    started = time.process_time()
    for _ in range(max(1, size // len(data))):
        hashlib.sha256(data).digest()
    return time.process_time() - started


def _socket_loop(url: str, out: Path, size: int) -> str:
    """The least a verified, durable download can do in Python: one connection, each piece received
    into one buffer, written and hashed, then fdatasync. No resume, no chunk records: a floor for
    what Berth's pull costs beyond verifying and syncing. Returns the sha256 hex."""
    host, _, rest = url.removeprefix("http://").partition("/")
    address, _, port = host.rpartition(":")
    with socket.create_connection((address, int(port))) as sock:
        sock.sendall(f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(65536)
            assert piece, "the registry closed the connection before the headers ended"
            head += piece
        status, _, body = head.partition(b"\r\n\r\n")
        assert status.split(b" ", 2)[1] == b"200", status
        hasher = hashlib.sha256(body)
        buffer = memoryview(bytearray(1 << 20))
        fd = os.open(out, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            received = len(body)
            while received < size:
                count = sock.recv_into(buffer)
                assert count, f"the body ended after {received} of {size} bytes"
                os.write(fd, buffer[:count])
                hasher.update(buffer[:count])
                received += count
            os.fdatasync(fd)
        finally:
            os.close(fd)
    return hasher.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds of each side (default {ROUNDS})")
    rounds_wanted = max(1, parser.parse_args().rounds)
    work = Path(tempfile.mkdtemp(prefix="berth-bench-pull-"))
    registry = start_registry(work / "registry")
    try:
        source = Library(work / "source")
        ensure_default_model(source)
        stored = source.get("gemma3:270m")
        name = ModelName.parse(f"{registry.host}/library/gemma3:270m")
        source.copy(stored.name, name)
        weights = stored.manifest.layers_of(MODEL_LAYER)[0]
        with RegistryClient() as client:
            Pusher(source, client).push(name, lambda e: None, insecure=True)
        source.close()
        url = f"{registry.url}/v2/library/gemma3/blobs/{weights.digest}"

        # -- 1. throughput against curl, same run, same blob --------------------------------------------
        # Berth's side is a live server's /api/pull (stream: false), as a user runs it: the server
        # is up and warm, and the model is deleted (its blobs collected) before each round.
        model = f"{registry.host}/library/gemma3:270m"
        env = {"BERTH_NO_DEFAULT_MODEL": "1", "BERTH_HOME": str(work / "home")}
        server = start_server(work / "pulled", work / "pulled.log", extra_env=env)
        pulled_blob = work / "pulled" / "blobs" / weights.digest.filename
        curl_out = work / "curl.blob"
        rounds: list[tuple[float, float]] = []
        cpu: list[tuple[float, float]] = []
        verified: list[float] = []
        looped: list[float] = []  # _socket_loop: verified and durable, with nothing else
        served: list[tuple[float, float]] = []  # the registry's own CPU while serving each side
        try:
            with httpx.Client(base_url=server.url, timeout=300) as http:
                reply = http.post("/api/pull", json={"model": model, "insecure": True, "stream": False})
                assert reply.json() == {"status": "success"}, reply.text  # warm: the first pull of a run
                for _ in range(rounds_wanted):
                    curl_out.unlink(missing_ok=True)
                    # Each side starts with no dirty pages of the other's writing (curl never syncs;
                    # Berth does, and would otherwise wait for curl's writeback on the same disk).
                    os.sync()
                    started = time.perf_counter()
                    children_before = _cpu_seconds(resource.RUSAGE_CHILDREN)
                    registry_before = _process_cpu(registry.process.pid)
                    subprocess.run(["curl", "-sSf", "-o", str(curl_out), url], check=True)
                    curl_s = time.perf_counter() - started
                    curl_cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - children_before
                    registry_curl = _process_cpu(registry.process.pid) - registry_before
                    assert hashlib.sha256(curl_out.read_bytes()).hexdigest() == weights.digest.hex
                    # A second baseline that, like a pull, checks the digest as the bytes arrive and
                    # makes the file durable: curl piped through tee into openssl, then sync.
                    curl_out.unlink()
                    os.sync()
                    started = time.perf_counter()
                    piped = subprocess.run(f"curl -sSf '{url}' | tee '{curl_out}' | openssl dgst -sha256 -r "
                                           f"&& sync '{curl_out}'", shell=True, check=True, capture_output=True,
                                           text=True)
                    verified.append(time.perf_counter() - started)
                    assert piped.stdout.split()[0] == weights.digest.hex
                    curl_out.unlink()
                    os.sync()
                    started = time.perf_counter()
                    assert _socket_loop(url, curl_out, weights.size) == weights.digest.hex
                    looped.append(time.perf_counter() - started)
                    http.request("DELETE", "/api/delete", json={"model": model}).raise_for_status()
                    assert not pulled_blob.exists()
                    os.sync()
                    started, server_before = time.perf_counter(), _process_cpu(server.process.pid)
                    registry_before = _process_cpu(registry.process.pid)
                    reply = http.post("/api/pull", json={"model": model, "insecure": True, "stream": False})
                    berth_s = time.perf_counter() - started
                    assert reply.json() == {"status": "success"}, reply.text
                    berth_cpu = _process_cpu(server.process.pid) - server_before
                    served.append((registry_curl, _process_cpu(registry.process.pid) - registry_before))
                    assert hashlib.sha256(pulled_blob.read_bytes()).hexdigest() == weights.digest.hex
                    rounds.append((curl_s, berth_s))
                    cpu.append((curl_cpu, berth_cpu))
        finally:
            server.stop()
        size_mb = weights.size / 1e6
        curl_best = min(c for c, _ in rounds)
        berth_best = min(b for _, b in rounds)
        print(f"blob: {weights.digest.short}, {size_mb:.1f} MB")
        print(f"berth: 1 to {DEFAULT_PARALLEL} streams of {DEFAULT_CHUNK_SIZE >> 20} MiB chunks, fdatasync every "
              f"{CHECKPOINT_BYTES >> 20} MiB; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        for i, ((c, b), (cc, bc), (rc, rb)) in enumerate(zip(rounds, cpu, served)):
            print(f"  round {i}: curl {size_mb / c:7.1f} MB/s ({cc:.2f} s CPU, registry {rc:.2f})   berth pull "
                  f"{size_mb / b:7.1f} MB/s (server {bc:.2f} s CPU, registry {rb:.2f}; POST /api/pull, "
                  "manifest + 4 blobs, digest verified, durable)")
        sha_s = _sha256_cpu(weights.size)
        print(f"  sha256 of the blob alone: {sha_s:.2f} s of one core; curl + registry CPU per second of curl's "
              f"wall time: {(cpu[0][0] + served[0][0]) / rounds[0][0]:.2f} cores of {os.cpu_count()}")
        curl_median = statistics.median(c for c, _ in rounds)
        berth_median = statistics.median(b for _, b in rounds)
        paired = statistics.median(c / b for c, b in rounds)
        print(f"throughput ratio berth/curl: best of {len(rounds)} {curl_best / berth_best:.2f}, "
              f"median {curl_median / berth_median:.2f}, median of the rounds' own ratios {paired:.2f}")
        print(f"  curl | tee | openssl dgst, then sync (verified and durable, like a pull): best "
              f"{size_mb / min(verified):.1f} MB/s; ratio berth/that {min(verified) / berth_best:.2f}")
        print(f"  one socket in Python: receive, write, sha256, then fdatasync (verified and durable, nothing "
              f"else): best {size_mb / min(looped):.1f} MB/s = {curl_best / min(looped):.2f} of curl; "
              f"ratio berth/that {min(looped) / berth_best:.2f}")

        # -- 2. kill the server at ~50%, restart, pull again -----------------------------------------------
        proxy = CountingProxy(int(registry.host.rsplit(":", 1)[1]))
        via_proxy = f"127.0.0.1:{proxy.port}/library/gemma3:270m"
        models = work / "server-models"
        server = start_server(models, work / "server1.log", extra_env=env)
        killed_at = 0
        with httpx.Client(base_url=server.url, timeout=120) as http:
            with http.stream("POST", "/api/pull", json={"model": via_proxy, "insecure": True}) as response:
                for line in response.iter_lines():
                    event = json.loads(line)
                    if event.get("digest") == str(weights.digest) and event.get("completed", 0) >= weights.size / 2:
                        killed_at = event["completed"]
                        os.kill(server.process.pid, signal.SIGKILL)
                        break
        server.process.wait(timeout=10)
        first = proxy.reset()
        library = Library(models)
        from berth.registry.catalog.downloads import DownloadJournal

        state = DownloadJournal(library).load(weights.digest)
        on_disk = sum(c.completed for c in state.chunks.values()) if state else 0
        library.close()
        remaining = weights.size - on_disk
        server = start_server(models, work / "server2.log", extra_env=env)
        try:
            reply = httpx.post(f"{server.url}/api/pull", json={"model": via_proxy, "insecure": True,
                                                               "stream": False}, timeout=300)
            assert reply.json() == {"status": "success"}, reply.text
        finally:
            server.stop()
        second = proxy.reset()
        print(f"kill at {killed_at / 1e6:.1f} MB reported ({first / 1e6:.1f} MB through the proxy); "
              f"recorded on disk {on_disk / 1e6:.1f} MB; remaining {remaining / 1e6:.1f} MB")
        print(f"re-pull transferred {second / 1e6:.1f} MB (all HTTP bytes, incl. headers/manifest/small blobs); "
              f"limit remaining + one chunk = {(remaining + DEFAULT_CHUNK_SIZE) / 1e6:.1f} MB -> "
              f"{'OK' if second <= remaining + DEFAULT_CHUNK_SIZE else 'OVER'}")
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
