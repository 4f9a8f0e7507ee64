"""The `berth` command. Most commands are clients of a server's HTTP API; these work on this
machine instead: `serve` (is the server), `fsck` and `import-ollama` (the store at BERTH_MODELS),
`login`, `logout` and `key` (the Berth home's credentials and signing key), and `verify` (the
registry directly, with the server asked only whether it has the model)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any, Callable, NoReturn, Optional

import typer

from berth.cli.client import Client, ClientError
from berth.cli.humanize import human_bytes, human_time, show_summary

app = typer.Typer(
    name="berth",
    help="Berth: a registry-centric, Ollama-compatible model manager and server.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def _run(action: Callable[[], None]) -> None:
    """Turn client errors into one line and an exit code, never a traceback."""
    try:
        action()
    except ClientError as exc:
        _fail(str(exc), exc.exit_code)


def _version_callback(value: bool) -> None:
    if not value:
        return
    from berth.server import __version__

    typer.echo(f"berth version is {__version__}")
    try:
        server_version = Client(timeout=2).get_json("/api/version").get("version")
    except ClientError:
        server_version = None
    if server_version and server_version != __version__:
        typer.echo(f"Warning: server version is {server_version}")
    raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", "-v", help="Show version information.",
                                 callback=_version_callback, is_eager=True),
) -> None:
    """Berth: a registry-centric, Ollama-compatible model manager and server."""


@app.command()
def serve(
    no_auth: bool = typer.Option(False, "--no-auth",
                                 help="Serve beyond loopback without API keys (anyone who reaches it has full access)."),
) -> None:
    """Start the server (BERTH_HOST, default 127.0.0.1:11434; models in BERTH_MODELS)."""
    import dataclasses

    from berth.registry.errors import BerthError
    from berth.server.app import serve as run_server
    from berth.server.settings import Settings

    try:
        settings = Settings.from_env()
        if no_auth:
            settings = dataclasses.replace(settings, no_auth=True)
        run_server(settings)
    except (BerthError, ValueError) as exc:
        _fail(str(exc))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["    ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def _list(prefix: Optional[str], as_json: bool) -> None:
    models = Client().get_json("/api/tags").get("models") or []
    if prefix:
        models = [m for m in models if m.get("name", "").startswith(prefix)]
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    rows = [
        [m["name"], m.get("digest", "")[:12], human_bytes(int(m.get("size", 0))),
         human_time(datetime.fromisoformat(m["modified_at"]))]
        for m in models
    ]
    typer.echo(_table(["NAME", "ID", "SIZE", "MODIFIED"], rows))


@app.command("list")
def list_models(
    prefix: Optional[str] = typer.Argument(None, help="Only models whose name starts with this."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's JSON."),
) -> None:
    """List models."""
    _run(lambda: _list(prefix, as_json))


@app.command("ls", hidden=True)
def ls(
    prefix: Optional[str] = typer.Argument(None),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List models (alias of list)."""
    _run(lambda: _list(prefix, as_json))


def _show(model: str, section: Optional[str], as_json: bool) -> None:
    info: dict[str, Any] = Client().post_json("/api/show", {"model": model})
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    if section is not None:
        typer.echo(info.get(section) or "")
        return
    typer.echo(show_summary(info))


@app.command()
def show(
    model: str = typer.Argument(..., help="Model name."),
    modelfile: bool = typer.Option(False, "--modelfile", help="Show the Modelfile."),
    parameters: bool = typer.Option(False, "--parameters", help="Show the parameters."),
    template: bool = typer.Option(False, "--template", help="Show the template."),
    system: bool = typer.Option(False, "--system", help="Show the system message."),
    license: bool = typer.Option(False, "--license", help="Show the license."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's JSON."),
) -> None:
    """Show information about a model."""
    chosen = [name for name, flag in (("modelfile", modelfile), ("parameters", parameters),
                                      ("template", template), ("system", system), ("license", license)) if flag]
    if len(chosen) > 1:
        _fail("only one of --modelfile, --parameters, --template, --system, --license can be given")
    _run(lambda: _show(model, chosen[0] if chosen else None, as_json))


@app.command()
def run(
    model: str = typer.Argument(..., help="Model name."),
    prompt: Optional[list[str]] = typer.Argument(None, help="Prompt; without one, an interactive chat starts."),
    verbose: bool = typer.Option(False, "--verbose", help="Show timings for the response."),
    format: Optional[str] = typer.Option(None, "--format", help='Response format (e.g. "json").'),
    keepalive: Optional[str] = typer.Option(None, "--keepalive", help="How long to keep the model loaded (5m)."),
    nowordwrap: bool = typer.Option(False, "--nowordwrap", help="Do not wrap words to the next line."),
    insecure: bool = typer.Option(False, "--insecure", help="Use an insecure registry when pulling."),
) -> None:
    """Run a model: answer a prompt, or chat interactively."""
    from berth.cli.run import run_command

    _run(lambda: run_command(model, prompt or [], verbose=verbose, fmt=format, keepalive=keepalive,
                             nowordwrap=nowordwrap, insecure=insecure))


@app.command()
def cp(source: str = typer.Argument(...), destination: str = typer.Argument(...)) -> None:
    """Copy a model to a new name (no blob is copied)."""

    def action() -> None:
        Client().request("POST", "/api/copy", {"source": source, "destination": destination})
        typer.echo(f"copied '{source}' to '{destination}'")

    _run(action)


@app.command()
def rm(models: list[str] = typer.Argument(..., help="Models to remove.")) -> None:
    """Remove models; blobs no other model uses are deleted."""

    def action() -> None:
        client = Client()
        for model in models:
            client.request("DELETE", "/api/delete", {"model": model})
            typer.echo(f"deleted '{model}'")

    _run(action)


def processor(size: int, size_vram: int) -> str:
    """`100% GPU`, `100% CPU`, or the split, as Ollama's ps prints it."""
    if size <= 0 or size_vram > size:
        return "Unknown"
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def _ps(as_json: bool) -> None:
    models = Client().get_json("/api/ps").get("models") or []
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    rows = []
    for m in models:
        until = datetime.fromisoformat(m["expires_at"])
        when = human_time(until)
        rows.append([m["name"], m.get("digest", "")[:12], human_bytes(int(m.get("size", 0))),
                     processor(int(m.get("size", 0)), int(m.get("size_vram", 0))), str(m.get("context_length", "")),
                     "Stopping..." if when.endswith(" ago") else when])
    typer.echo(_table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows))


@app.command()
def ps(as_json: bool = typer.Option(False, "--json", help="Print the server's JSON.")) -> None:
    """List running models."""
    _run(lambda: _ps(as_json))


@app.command()
def stop(model: str = typer.Argument(..., help="Model to unload.")) -> None:
    """Stop a running model (unload it from memory)."""

    def action() -> None:
        from berth.registry.errors import InvalidName
        from berth.registry.names import ModelName

        try:
            display = ModelName.parse(model).display.lower()
        except InvalidName as exc:
            raise ClientError(str(exc)) from None
        client = Client()
        running = client.get_json("/api/ps").get("models") or []
        if display not in {m.get("name", "").lower() for m in running}:
            raise ClientError(f'couldn\'t find model "{model}" to stop')
        client.post_json("/api/generate", {"model": model, "keep_alive": 0})

    _run(action)


@app.command()
def fsck(repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed.")) -> None:
    """Re-hash every blob in BERTH_MODELS and check the catalog against the blob store."""
    from berth.registry.errors import BerthError
    from berth.registry.fsck import fsck as run_fsck
    from berth.registry.library import Library
    from berth.server.settings import Settings

    try:
        library = Library(Settings.from_env().models_dir)
        report = run_fsck(library, repair=repair)
    except BerthError as exc:
        _fail(str(exc))
    typer.echo(f"checked {report.checked_blobs} blobs ({human_bytes(report.checked_bytes)})")
    for label, items in (("corrupt blob", report.corrupt_blobs), ("missing blob", report.missing_blobs),
                         ("unreferenced blob file", report.orphan_files), ("broken name", report.broken_names)):
        for item in items:
            typer.echo(f"{label}: {item}")
    for model in sorted(report.affected_models):
        typer.echo(f"model needs to be pulled or created again: {model}")
    if repair:
        typer.echo(f"repaired; removed {report.stale_temp_files} stale temporary files")
    elif not report.clean:
        typer.echo("run `berth fsck --repair` to remove what is damaged")
    if not report.clean and not repair:
        raise typer.Exit(1)


@app.command()
def create(
    name: str = typer.Argument(..., help="Name of the new model."),
    file: Optional[str] = typer.Option(None, "--file", "-f", help="The Modelfile (default ./Modelfile)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", "-q",
                                           help="Quantize the model (e.g. q4_K_M); not supported yet."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only errors."),
    upload: bool = typer.Option(False, "--upload",
                                help="Upload the files even when the server runs on this machine (no linking)."),
) -> None:
    """Create a model from a Modelfile; local files are uploaded (or linked, for a local server)."""
    from berth.cli.create import create_command

    if quantize:
        _fail(f"quantizing to {quantize} is not supported yet; create from a GGUF that is already quantized "
              "(for example Q4_K_M)")
    _run(lambda: create_command(name, file, quiet, upload=upload))


@app.command("import-ollama")
def import_ollama(
    directory: Optional[str] = typer.Argument(
        None, help="An Ollama models folder (default $OLLAMA_MODELS, else ~/.ollama/models)."),
) -> None:
    """Register the models of an Ollama store in BERTH_MODELS, linking its blobs (nothing is downloaded)."""
    from berth.cli.create import import_ollama_command

    _run(lambda: import_ollama_command(directory))


@app.command()
def pull(
    model: str = typer.Argument(..., help="Model to pull, e.g. registry.example.com/team/model:tag."),
    insecure: bool = typer.Option(False, "--insecure", help="Use plain http for this registry."),
    max_rate: Optional[str] = typer.Option(None, "--max-rate",
                                           help="Cap this pull's download rate, e.g. 50M (bytes/s)."),
) -> None:
    """Pull a model from a registry (resumes an interrupted pull)."""
    from berth.cli import transfer

    _run(lambda: transfer.pull(model, insecure, max_rate))


@app.command()
def push(
    model: str = typer.Argument(..., help="Model to push; its name says the registry and repository."),
    insecure: bool = typer.Option(False, "--insecure", help="Use plain http for this registry."),
    oci: bool = typer.Option(False, "--oci", help="Push an OCI image manifest (for skopeo, oras, Harbor)."),
    sign: Optional[bool] = typer.Option(
        None, "--sign/--no-sign",
        help="Sign the pushed manifest (with BERTH_SIGNING_KEY, else your key: see `berth key`). "
             "Default: sign when the server has BERTH_SIGNING_KEY set."),
) -> None:
    """Push a model to a registry."""
    from berth.cli import transfer

    _run(lambda: transfer.push(model, insecure, oci, sign))


@app.command("key")
def key(pem: bool = typer.Option(False, "--pem", help="Print it as a PEM public key (for openssl).")) -> None:
    """Print your public key (created on first use), for a registry account or a trust policy."""
    from berth.cli import transfer

    _run(lambda: typer.echo(transfer.public_key(pem)))


@app.command()
def verify(
    model: str = typer.Argument(..., help="Model to check, e.g. registry.example.com/team/model:tag."),
    insecure: bool = typer.Option(False, "--insecure", help="Use plain http for this registry."),
    key: list[str] = typer.Option([], "--key", help="Trusted public key (ssh-ed25519 line or PEM file); repeatable."),
    remote: bool = typer.Option(False, "--remote", help="Check the registry's manifest even if the model is local."),
) -> None:
    """Check that a model is signed by a trusted key (BERTH_TRUST_POLICY's keys plus --key).

    A model the server has is checked as stored (the signatures must sign its local manifest);
    otherwise the manifest the registry serves."""
    from berth.cli import transfer

    _run(lambda: typer.echo(transfer.verify(model, insecure, key, remote)))


@app.command()
def login(
    registry: str = typer.Argument(..., help="Registry host, e.g. registry.example.com:5000."),
    username: Optional[str] = typer.Option(None, "--username", "-u", help="User name (prompted if absent)."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin."),
    insecure: bool = typer.Option(False, "--insecure", help="Check the login over plain http."),
) -> None:
    """Log in to a registry; the credentials are stored 0600 under the Berth home."""
    from berth.cli import transfer

    _run(lambda: typer.echo(transfer.login(registry, username, password_stdin, insecure)))


@app.command()
def logout(registry: str = typer.Argument(..., help="Registry host.")) -> None:
    """Forget the stored login for a registry."""
    from berth.cli import transfer

    _run(lambda: typer.echo(transfer.logout(registry)))


keys_app = typer.Typer(help="Manage the server's API keys (needs an admin key, or a loopback client).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="A name for the key (who or what uses it)."),
    scope: str = typer.Option("read", "--scope", help="read, write or admin."),
) -> None:
    """Create a key; its secret is printed once."""

    def action() -> None:
        made = Client().post_json("/api/keys", {"name": name, "scope": scope})
        typer.echo(made["key"])
        typer.echo(f"created key '{made['name']}' with scope {made['scope']}; store it now, it is not shown again",
                   err=True)

    _run(action)


@keys_app.command("list")
def keys_list(as_json: bool = typer.Option(False, "--json", help="Print the server's JSON.")) -> None:
    """List keys (never their secrets)."""

    def action() -> None:
        keys = Client().get_json("/api/keys").get("keys") or []
        if as_json:
            typer.echo(json.dumps(keys, indent=2))
            return
        rows = [[k["name"], k["prefix"] + "...", k["scope"],
                 human_time(datetime.fromisoformat(k["created_at"])),
                 "revoked" if k.get("revoked_at") else "active"] for k in keys]
        typer.echo(_table(["NAME", "KEY", "SCOPE", "CREATED", "STATE"], rows))

    _run(action)


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(..., help="Name of the key.")) -> None:
    """Revoke a key; requests with it are refused from now on."""

    def action() -> None:
        Client().request("DELETE", "/api/keys", {"name": name})
        typer.echo(f"revoked key '{name}'")

    _run(action)


@app.command("help")
def help_command(ctx: typer.Context, command: Optional[str] = typer.Argument(None, help="A command.")) -> None:
    """Help about any command."""
    root = ctx.parent.command if ctx.parent else ctx.command
    target = root.get_command(ctx.parent, command) if command and hasattr(root, "get_command") else root
    if target is None:
        _fail(f"unknown command {command!r}; `berth help` lists them")
    with typer.Context(target, info_name=f"berth {command}" if command else "berth") as help_ctx:
        typer.echo(target.get_help(help_ctx))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
