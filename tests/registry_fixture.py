"""A real OCI registry for tests: Debian's `docker-registry` (distribution v2) on a free loopback port.

Storage is a temporary directory; with `users` it also requires htpasswd basic auth (bcrypt lines
from Python's `bcrypt` if installed, else `htpasswd` from apache2-utils). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import httpx
import pytest

from tests.conftest import free_port

REGISTRY_BINARY = "/usr/bin/docker-registry"


def htpasswd_line(user: str, password: str) -> str | None:
    """A bcrypt htpasswd entry, or None when neither bcrypt nor htpasswd is available."""
    try:
        import bcrypt  # type: ignore[import-not-found]

        return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}"
    except ImportError:
        pass
    tool = shutil.which("htpasswd")
    if tool is None:
        return None
    out = subprocess.run([tool, "-nbB", "-C", "5", user, password], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@dataclass
class LocalRegistry:
    host: str
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    auth: tuple[str, str] | None = None
    tls_certificate: Path | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_certificate else 'http'}://{self.host}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


# A name that resolves nowhere, in every test certificate: a client that reaches a server by this
# name can only have gone through a proxy (which sends it to 127.0.0.1).
PROXIED_HOST = "registry.test"


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (an IP SAN) and PROXIED_HOST, and its key, as PEM
    files: (cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    # A subject of its own: OpenSSL finds a certificate's issuer in the trust store by subject name,
    # so two test certificates in one bundle (a registry's and a proxy's) must not share one.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"berth test {directory.name}"),
                      x509.NameAttribute(NameOID.SERIAL_NUMBER, os.urandom(8).hex())])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                        x509.DNSName(PROXIED_HOST)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "registry.crt", directory / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def start_registry(base: Path, users: dict[str, str] | None = None, tls: bool = False) -> LocalRegistry:
    """Start docker-registry; with `tls`, it serves https with a fresh self-signed certificate."""
    if not Path(REGISTRY_BINARY).exists():
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth_yaml = ""
    if users:
        lines = [htpasswd_line(u, p) for u, p in users.items()]
        if any(line is None for line in lines):
            pytest.skip("no bcrypt for htpasswd: install python3-bcrypt/bcrypt or apache2-utils")
        (base / "htpasswd").write_text("\n".join(lines) + "\n")  # type: ignore[arg-type]
        auth_yaml = f"auth:\n  htpasswd:\n    realm: berth-test\n    path: {base / 'htpasswd'}\n"
    certificate = None
    tls_yaml = ""
    if tls:
        certificate, key = self_signed_certificate(base / "tls")
        tls_yaml = f"  tls:\n    certificate: {certificate}\n    key: {key}\n"
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        + tls_yaml
        + auth_yaml
    )
    log_path = base / "registry.log"
    log = open(log_path, "wb")
    process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    registry = LocalRegistry(f"127.0.0.1:{port}", base / "data", process, log_path,
                             next(iter(users.items())) if users else None, certificate)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"docker-registry exited: {log_path.read_text(errors='replace')}")
        try:
            verify = ssl.create_default_context(cafile=str(certificate)) if certificate else True
            if httpx.get(f"{registry.url}/v2/", timeout=1, verify=verify).status_code in (200, 401):
                return registry
        except httpx.HTTPError:
            time.sleep(0.05)
    registry.stop()
    pytest.fail("docker-registry did not start within 30s")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    reg = start_registry(tmp_path / "registry")
    yield reg
    reg.stop()


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    reg = start_registry(tmp_path / "tls-registry", tls=True)
    yield reg
    reg.stop()


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    reg = start_registry(tmp_path / "auth-registry", {"berth": "s3cret-pass"})
    yield reg
    reg.stop()


def make_model(library: "Library", name: str, weights: bytes, template: str = "{{ .Prompt }}") -> "Manifest":
    """Build a small model (weights layer + template + config) straight into a Library."""
    from berth.registry.builder import ModelBuilder
    from berth.registry.manifest import MODEL_LAYER, TEMPLATE_LAYER, ModelConfig
    from berth.registry.names import ModelName

    stored = library.blobs.write_bytes(weights)
    builder = ModelBuilder(library)
    builder.add_blob(MODEL_LAYER, stored.digest, stored.size)
    builder.add_text(TEMPLATE_LAYER, template)
    manifest, _ = builder.commit(ModelName.parse(name), ModelConfig(model_family="test", model_type="1M"))
    return manifest


if TYPE_CHECKING:
    from berth.registry.library import Library
    from berth.registry.manifest import Manifest
