"""/api/pull and /api/push on a live Berth server against a real local registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import BerthServer
from tests.registry_fixture import LocalRegistry


def _store_models(models: Path, names: list[str]) -> Path:
    """A models directory holding a small, distinct model under each name (no server running yet)."""
    import os

    from berth.registry.library import Library
    from tests.registry_fixture import make_model

    library = Library(models)
    try:
        for name in names:
            make_model(library, name, os.urandom(300_000) + name.encode())
    finally:
        library.close()
    return models


def _stream(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    with client.stream("POST", path, json=body) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line.strip()]
        return response.status_code, lines


def test_push_and_pull_default_model_through_the_api(fresh_server: BerthServer, registry: LocalRegistry) -> None:
    remote = f"{registry.host}/library/gemma3:270m"
    with httpx.Client(base_url=fresh_server.url, timeout=300) as client:
        assert client.post("/api/copy", json={"source": "gemma3:270m", "destination": remote}).status_code == 200
        local = {m["name"]: m for m in client.get("/api/tags").json()["models"]}

        status, events = _stream(client, "/api/push", {"model": remote, "insecure": True})
        assert status == 200, events
        assert events[0] == {"status": "retrieving manifest"}
        assert events[-2:] == [{"status": "pushing manifest"}, {"status": "success"}]
        pushing = [e for e in events if e["status"].startswith("pushing ") and "digest" in e]
        assert pushing and all(e["status"] == f"pushing {e['digest'][7:19]}" for e in pushing)

        # Non-stream push of an unchanged model: one object, success.
        again = client.post("/api/push", json={"model": remote, "insecure": True, "stream": False})
        assert again.status_code == 200 and again.json() == {"status": "success"}

        assert client.request("DELETE", "/api/delete", json={"model": remote}).status_code == 200
        status, events = _stream(client, "/api/pull", {"model": remote, "insecure": True})
        assert status == 200, events
        assert events[0] == {"status": "pulling manifest"}
        assert [e["status"] for e in events[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
        layer_events = [e for e in events if e["status"].startswith("pulling ") and "digest" in e]
        assert all({"digest", "total"} <= e.keys() for e in layer_events)
        tags = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
        assert tags[remote]["digest"] == local[remote]["digest"]

        # stream:false pull answers once with the last event.
        quiet = client.post("/api/pull", json={"name": remote, "insecure": True, "stream": False})
        assert quiet.status_code == 200 and quiet.json() == {"status": "success"}


def test_pull_errors(fresh_server: BerthServer, registry: LocalRegistry) -> None:
    with httpx.Client(base_url=fresh_server.url, timeout=60) as client:
        bad = client.post("/api/pull", json={"model": "../etc:passwd"})
        assert bad.status_code == 400 and "invalid model name" in bad.json()["error"]
        assert client.post("/api/pull", json={}).status_code == 400

        # Missing manifest after streaming began: a final error line, HTTP 200.
        status, events = _stream(client, "/api/pull", {"model": f"{registry.host}/library/absent:1",
                                                        "insecure": True})
        assert status == 200
        assert events[0] == {"status": "pulling manifest"}
        assert events[-1] == {"error": "pull model manifest: file does not exist"}

        # Non-stream: the error with its status.
        quiet = client.post("/api/pull", json={"model": f"{registry.host}/library/absent:1", "insecure": True,
                                               "stream": False})
        assert quiet.status_code == 404 and quiet.json()["error"] == "pull model manifest: file does not exist"

        missing = client.post("/api/push", json={"model": f"{registry.host}/library/nothere:1", "insecure": True,
                                                 "stream": False})
        assert missing.status_code == 404


def test_cli_login_push_pull_logout(tmp_path, auth_registry: LocalRegistry) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess

    from berth.registry.library import Library
    from tests.conftest import berth_executable, start_server
    from tests.registry_fixture import make_model

    home = tmp_path / "home"
    server = start_server(tmp_path / "models", tmp_path / "server.log",
                          extra_env={"BERTH_HOME": str(home), "BERTH_NO_DEFAULT_MODEL": "1"})
    try:
        name = f"{auth_registry.host}/team/tiny:v1"
        library = Library(server.models_dir)
        try:
            make_model(library, name, os.urandom(1_500_000))
        finally:
            library.close()
        env = {**server.env(), "BERTH_HOME": str(home)}

        def berth(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run([berth_executable(), *args], env=env, input=stdin, capture_output=True,
                                  text=True, timeout=120)

        denied = berth("push", name, "--insecure")
        assert denied.returncode == 1 and "berth login" in denied.stderr
        assert len(denied.stderr.strip().splitlines()) == 1

        bad = berth("login", auth_registry.host, "-u", "berth", "--password-stdin", "--insecure", stdin="nope\n")
        assert bad.returncode == 1 and "login to" in bad.stderr
        assert auth_registry.auth is not None
        good = berth("login", auth_registry.host, "-u", "berth", "--password-stdin", "--insecure",
                     stdin=auth_registry.auth[1] + "\n")
        assert good.returncode == 0, good.stderr
        assert "Login Succeeded" in good.stdout
        assert oct((home / "credentials.json").stat().st_mode & 0o777) == "0o600"

        pushed = berth("push", name, "--insecure")
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout.splitlines()[0] == "retrieving manifest" and pushed.stdout.splitlines()[-1] == "success"

        assert berth("rm", name).returncode == 0
        pulled = berth("pull", name, "--insecure")
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.splitlines()[0] == "pulling manifest" and pulled.stdout.splitlines()[-1] == "success"
        assert "verifying sha256 digest" in pulled.stdout

        missing = berth("pull", f"{auth_registry.host}/team/absent:v1", "--insecure")
        assert missing.returncode == 1 and "file does not exist" in missing.stderr

        out = berth("logout", auth_registry.host)
        assert out.returncode == 0 and berth("logout", auth_registry.host).returncode == 1
    finally:
        server.stop()


def test_signed_push_trust_policy_and_rate_cap_through_the_api(tmp_path, registry: LocalRegistry) -> None:  # type: ignore[no-untyped-def]
    from berth.registry.user_key import load_or_create_key
    from tests.conftest import start_server

    home = tmp_path / "home"
    key = load_or_create_key(home)  # the server signs with this key and its policy trusts it
    policy = {"rules": [{"scope": f"{registry.host}/team", "mode": "enforce", "keys": [key.public_line()]}]}
    models = _store_models(tmp_path / "models", [f"{registry.host}/team/m:{tag}" for tag in ("unsigned", "signed")])
    server = start_server(models, tmp_path / "server.log", extra_env={
        "BERTH_HOME": str(home), "BERTH_NO_DEFAULT_MODEL": "1", "BERTH_TRUST_POLICY": json.dumps(policy)})
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for tag, sign in (("unsigned", False), ("signed", True)):
                status, events = _stream(client, "/api/push", {"model": f"{registry.host}/team/m:{tag}",
                                                               "insecure": True, "sign": sign})
                assert status == 200 and events[-1] == {"status": "success"}, events
                assert ({"status": "pushing signature"} in events) == sign
                assert client.request("DELETE", "/api/delete",
                                      json={"model": f"{registry.host}/team/m:{tag}"}).status_code == 200

            refused = client.post("/api/pull", json={"model": f"{registry.host}/team/m:unsigned", "insecure": True,
                                                     "stream": False})
            assert refused.status_code == 403 and "is not signed" in refused.json()["error"]
            bad_rate = client.post("/api/pull", json={"model": f"{registry.host}/team/m:signed", "insecure": True,
                                                      "stream": False, "max_rate": "fast"})
            assert bad_rate.status_code == 400 and "invalid rate" in bad_rate.json()["error"]
            status, events = _stream(client, "/api/pull", {"model": f"{registry.host}/team/m:signed",
                                                           "insecure": True, "max_rate": "50M"})
            assert status == 200 and events[-1] == {"status": "success"}, events
            assert {"status": "verifying signature"} in events
            names = [m["name"] for m in client.get("/api/tags").json()["models"]]
            assert names == [f"{registry.host}/team/m:signed"]
    finally:
        server.stop()


def test_signing_key_setting_signs_every_push_and_verify_checks_the_local_copy(  # type: ignore[no-untyped-def]
        tmp_path, registry: LocalRegistry) -> None:
    import os
    import subprocess

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tests.conftest import berth_executable, start_server

    team_key = Ed25519PrivateKey.generate()  # a team's signing key, in PEM (PKCS#8) form
    key_file = tmp_path / "team.pem"
    key_file.write_bytes(team_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    team_public = team_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH).decode()
    models = _store_models(tmp_path / "models", [f"{registry.host}/team/m:{tag}" for tag in ("a", "b", "c")])
    env = {"BERTH_HOME": str(tmp_path / "home"), "BERTH_NO_DEFAULT_MODEL": "1", "BERTH_SIGNING_KEY": str(key_file)}
    server = start_server(models, tmp_path / "server.log", extra_env=env)
    try:
        cli_env = {**server.env(), "BERTH_HOME": str(tmp_path / "home")}

        def berth(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([berth_executable(), *args], env=cli_env, capture_output=True, text=True,
                                  timeout=120)

        signed = berth("push", f"{registry.host}/team/m:a", "--insecure")  # signed: the setting says so
        assert signed.returncode == 0 and "pushing signature" in signed.stdout, signed.stderr
        unsigned = berth("push", f"{registry.host}/team/m:b", "--insecure", "--no-sign")
        assert unsigned.returncode == 0 and "pushing signature" not in unsigned.stdout, unsigned.stderr

        ok = berth("verify", f"{registry.host}/team/m:a", "--insecure", "--key", team_public)
        assert ok.returncode == 0 and "local copy" in ok.stdout and "verified" in ok.stdout, ok.stderr
        refused = berth("verify", f"{registry.host}/team/m:b", "--insecure", "--key", team_public)
        assert refused.returncode == 1 and "NOT verified: no signature" in refused.stderr
        # Pushed as an OCI manifest (another digest than the local Docker v2 one, same config and
        # layers), which is what was signed: the local copy still verifies.
        oci = berth("push", f"{registry.host}/team/m:c", "--insecure", "--oci")
        assert oci.returncode == 0 and "pushing signature" in oci.stdout, oci.stderr
        ok = berth("verify", f"{registry.host}/team/m:c", "--insecure", "--key", team_public)
        assert ok.returncode == 0 and "local copy" in ok.stdout and "verified" in ok.stdout, ok.stderr

        # The local copy of :a changes (another model under the same name): the registry's signature
        # is for the pushed manifest, not this one; --remote still checks the registry's.
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.post("/api/copy", json={"source": f"{registry.host}/team/m:b",
                                                  "destination": f"{registry.host}/team/m:a"}).status_code == 200
        changed = berth("verify", f"{registry.host}/team/m:a", "--insecure", "--key", team_public)
        assert changed.returncode == 1 and "local copy" in changed.stderr and "NOT verified" in changed.stderr
        remote = berth("verify", f"{registry.host}/team/m:a", "--insecure", "--remote", "--key", team_public)
        assert remote.returncode == 0 and "local copy" not in remote.stdout, remote.stderr
    finally:
        server.stop()

    bad = subprocess.run([berth_executable(), "serve"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env, "BERTH_MODELS": str(models),
                              "BERTH_SIGNING_KEY": str(tmp_path / "missing.pem")})
    assert bad.returncode != 0 and "missing.pem" in bad.stderr and "BERTH_SIGNING_KEY" in bad.stderr
