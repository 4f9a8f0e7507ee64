"""`berth run MODEL [PROMPT]`: one answer, or an interactive chat like `ollama run`.

With a prompt argument or piped stdin it prints one answer (stdin first, then the arguments,
joined by a space) and exits. On a terminal it opens a REPL: streamed answers with word wrap,
`\"\"\"` multi-line input, /set, /show, /load, /save, /clear, /bye, /?, arrow-key history, Ctrl-C
to cancel an answer and Ctrl-D to leave.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from berth.cli.client import Client, ClientError
from berth.cli.humanize import show_summary

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message.
"""

SET_HELP = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set template <string> Set prompt template
  /set history           Enable history
  /set nohistory         Disable history
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
"""

SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
"""

SHORTCUTS_HELP = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit berth (/bye)
  Up / Down           Previous / next message in the history
"""


class Spinner:
    """Ollama's braille spinner on stderr while the model loads; silent when stderr is not a terminal."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True) if sys.stderr.isatty() else None

    def _spin(self) -> None:
        frame = 0
        while not self._stop.wait(0.1):
            sys.stderr.write(f"\r{self.FRAMES[frame % len(self.FRAMES)]} ")
            sys.stderr.flush()
            frame += 1

    def __enter__(self) -> "Spinner":
        if self._thread is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r  \r")
            sys.stderr.flush()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Session:
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    format: str | None = None
    wordwrap: bool = True
    verbose: bool = False
    history: bool = True
    keepalive: str | None = None
    template: str | None = None


def format_duration(ns: int) -> str:
    """Go's time.Duration String(): 1.234567s, 12.3ms, 456µs."""
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.6f}".rstrip("0").rstrip(".") + "s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.6f}".rstrip("0").rstrip(".") + "ms"
    if ns >= 1_000:
        return f"{ns / 1e3:.3f}".rstrip("0").rstrip(".") + "µs"
    return f"{ns}ns"


def stats_text(final: dict[str, Any]) -> str:
    """Ollama's --verbose timing block."""
    lines = [f"total duration:       {format_duration(final.get('total_duration', 0))}",
             f"load duration:        {format_duration(final.get('load_duration', 0))}"]
    pcount, pdur = final.get("prompt_eval_count", 0), final.get("prompt_eval_duration", 0)
    lines.append(f"prompt eval count:    {pcount} token(s)")
    if pdur:
        lines.append(f"prompt eval duration: {format_duration(pdur)}")
        lines.append(f"prompt eval rate:     {pcount / (pdur / 1e9):.2f} tokens/s")
    count, dur = final.get("eval_count", 0), final.get("eval_duration", 0)
    lines.append(f"eval count:           {count} token(s)")
    if dur:
        lines.append(f"eval duration:        {format_duration(dur)}")
        lines.append(f"eval rate:            {count / (dur / 1e9):.2f} tokens/s")
    return "\n".join(lines)


class WordWrapper:
    """Wraps streamed text at the terminal width without splitting words."""

    def __init__(self, out: TextIO, width: int | None) -> None:
        self.out = out
        self.width = width
        self.column = 0
        self.word = ""

    def write(self, text: str) -> None:
        if not self.width:
            self.out.write(text)
            self.out.flush()
            return
        for ch in text:
            if ch == "\n":
                self._flush_word()
                self.out.write("\n")
                self.column = 0
            elif ch == " ":
                self._flush_word()
                if self.column < self.width:
                    self.out.write(" ")
                    self.column += 1
            else:
                self.word += ch
        self.out.flush()

    def _flush_word(self) -> None:
        if not self.word:
            return
        if self.column + len(self.word) > self.width and self.column > 0:
            self.out.write("\n")
            self.column = 0
        self.out.write(self.word)
        self.column += len(self.word)
        self.word = ""

    def close(self) -> None:
        self._flush_word()
        self.out.flush()


def _stream(client: Client, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for chunk in client.stream_json("POST", path, body):
        if "error" in chunk:
            raise ClientError(str(chunk["error"]))
        yield chunk


def ensure_model(client: Client, model: str, insecure: bool) -> dict[str, Any]:
    """The model's /api/show answer, pulling it first when the server does not have it."""
    try:
        return client.post_json("/api/show", {"model": model})
    except ClientError as exc:
        if exc.status != 404:
            raise
    print(f"pulling {model}...", file=sys.stderr)
    for chunk in _stream(client, "/api/pull", {"model": model, "insecure": insecure, "stream": True}):
        status = chunk.get("status", "")
        if status and not chunk.get("digest"):
            print(status, file=sys.stderr)
    return client.post_json("/api/show", {"model": model})


def generate_once(client: Client, session: Session, prompt: str, out: TextIO, images: list[str]) -> None:
    body: dict[str, Any] = {"model": session.model, "prompt": prompt, "stream": True, "options": session.options}
    if session.format:
        body["format"] = session.format
    if session.keepalive:
        body["keep_alive"] = session.keepalive
    if images:
        body["images"] = images
    wrapper = WordWrapper(out, _width() if session.wordwrap and out.isatty() else None)
    final: dict[str, Any] = {}
    with Spinner() as spinner:
        for chunk in _stream(client, "/api/generate", body):
            spinner.stop()
            wrapper.write(chunk.get("response", ""))
            if chunk.get("done"):
                final = chunk
    wrapper.close()
    out.write("\n\n" if out.isatty() else "\n")
    out.flush()
    if session.verbose and final:
        print(stats_text(final), file=sys.stderr)


def _width() -> int:
    return max(20, shutil.get_terminal_size((80, 24)).columns - 5)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def extract_images(text: str) -> tuple[str, list[str]]:
    """Pull image file paths out of a prompt (for models with a vision projector)."""
    import base64

    kept: list[str] = []
    images: list[str] = []
    for word in text.split(" "):
        candidate = word.strip().replace("\\ ", " ")
        if candidate.lower().endswith(IMAGE_SUFFIXES) and candidate.startswith(("/", "./", "~")):
            path = Path(candidate).expanduser()
            if path.is_file() and path.stat().st_size <= 100 * 1024 * 1024:
                images.append(base64.b64encode(path.read_bytes()).decode())
                print(f"Added image '{candidate}'", file=sys.stderr)
                continue
        kept.append(word)
    return " ".join(kept), images


class Repl:
    """The interactive chat. Input comes from `read_line` so tests can drive it through a pty."""

    def __init__(self, client: Client, session: Session, info: dict[str, Any]) -> None:
        self.client = client
        self.session = session
        self.info = info
        self.out = sys.stdout

    def run(self) -> None:
        _setup_readline(self.session)
        self._load_model()
        for message in self.info.get("messages") or []:
            self.out.write(f">>> {message.get('content', '')}\n" if message.get("role") == "user"
                           else f"{message.get('content', '')}\n\n")
        while True:
            try:
                line = self._read_message()
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:
                self.out.write("\nUse Ctrl + d or /bye to exit.\n")
                continue
            if line is None:
                continue
            if line.startswith("/"):
                if self._command(line):
                    return
                continue
            if line.strip():
                self._chat(line)

    def _read_message(self) -> str | None:
        line = input(">>> ")
        if line.lstrip().startswith('"""'):
            parts = [line.lstrip()[3:]]
            if parts[0].rstrip().endswith('"""') and len(parts[0].rstrip()) >= 3:
                return parts[0].rstrip()[:-3]
            while True:
                more = input("... ")
                if more.rstrip().endswith('"""'):
                    parts.append(more.rstrip()[:-3])
                    break
                parts.append(more)
            return "\n".join(parts).strip("\n")
        return line

    def _load_model(self) -> None:
        body: dict[str, Any] = {"model": self.session.model}
        if self.session.keepalive:
            body["keep_alive"] = self.session.keepalive
        with Spinner():
            self.client.post_json("/api/generate", body)

    def _chat(self, text: str) -> None:
        session = self.session
        text, images = extract_images(text) if "vision" in (self.info.get("capabilities") or []) else (text, [])
        message: dict[str, Any] = {"role": "user", "content": text}
        if images:
            message["images"] = images
        messages = list(session.messages)
        if session.system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": session.system})
        body: dict[str, Any] = {"model": session.model, "messages": messages + [message], "stream": True,
                                "options": session.options}
        if session.format:
            body["format"] = session.format
        if session.keepalive:
            body["keep_alive"] = session.keepalive
        if session.template is not None:
            body["template"] = session.template
        wrapper = WordWrapper(self.out, _width() if session.wordwrap else None)
        answer: list[str] = []
        final: dict[str, Any] = {}
        chunks = self.client.stream_json("POST", "/api/chat", body)
        try:
            for chunk in chunks:
                if "error" in chunk:
                    raise ClientError(str(chunk["error"]))
                piece = chunk.get("message", {}).get("content", "")
                answer.append(piece)
                wrapper.write(piece)
                if chunk.get("done"):
                    final = chunk
        except KeyboardInterrupt:
            chunks.close()  # closing the stream cancels the generation on the server
            wrapper.close()
            self.out.write("\n\n")
            return
        except ClientError as exc:
            wrapper.close()
            self.out.write(f"\nError: {exc}\n\n")
            return
        wrapper.close()
        self.out.write("\n\n")
        session.messages.append(message)
        session.messages.append({"role": "assistant", "content": "".join(answer)})
        if session.verbose and final:
            self.out.write(stats_text(final) + "\n")

    # -- slash commands -------------------------------------------------------------------------

    def _command(self, line: str) -> bool:
        """Run a /command; True means leave the REPL."""
        words = line.split()
        command, args = words[0], words[1:]
        if command in ("/bye", "/exit"):
            return True
        if command in ("/?", "/help"):
            topic = args[0] if args else ""
            self.out.write({"set": SET_HELP, "show": SHOW_HELP, "shortcuts": SHORTCUTS_HELP,
                            "shortcut": SHORTCUTS_HELP}.get(topic, HELP) + "\n")
        elif command == "/clear":
            self.session.messages.clear()
            self.out.write("Cleared session context\n")
        elif command == "/set":
            self._set(args, line)
        elif command == "/show":
            self._show(args)
        elif command == "/load":
            self._load(args)
        elif command == "/save":
            self._save(args)
        else:
            self.out.write(f"Unknown command '{command}'. Type /? for help\n")
        return False

    def _set(self, args: list[str], line: str) -> None:
        session = self.session
        if not args:
            self.out.write(SET_HELP + "\n")
            return
        what = args[0]
        flags: dict[str, Callable[[], None]] = {
            "history": lambda: setattr(session, "history", True),
            "nohistory": lambda: setattr(session, "history", False),
            "wordwrap": lambda: setattr(session, "wordwrap", True),
            "nowordwrap": lambda: setattr(session, "wordwrap", False),
            "verbose": lambda: setattr(session, "verbose", True),
            "quiet": lambda: setattr(session, "verbose", False),
            "noformat": lambda: setattr(session, "format", None),
        }
        messages = {"history": "Enabled history", "nohistory": "Disabled history",
                    "wordwrap": "Set 'wordwrap' mode.", "nowordwrap": "Set 'nowordwrap' mode.",
                    "verbose": "Set 'verbose' mode.", "quiet": "Set 'quiet' mode.",
                    "noformat": "Disabled format."}
        if what in flags:
            flags[what]()
            self.out.write(messages[what] + "\n")
        elif what == "format":
            if args[1:] == ["json"]:
                session.format = "json"
                self.out.write("Set format to 'json' mode.\n")
            else:
                self.out.write("Invalid or missing format. For 'json' mode use '/set format json'\n")
        elif what == "parameter":
            self._set_parameter(args[1:])
        elif what in ("system", "template"):
            text = self._long_value(line.split(what, 1)[1].strip())
            setattr(session, what, text)
            self.out.write("Set system message.\n" if what == "system" else "Set prompt template.\n")
        else:
            self.out.write(f"Unknown command '/set {what}'. Type /? for help\n")

    def _long_value(self, text: str) -> str:
        """A value given inline, or as \"\"\"-quoted text that may go on over several lines."""
        if not text.startswith('"""'):
            return text
        text = text[3:]
        if text.endswith('"""'):
            return text[:-3].strip()
        lines = [text]
        while not (more := input("... ")).rstrip().endswith('"""'):
            lines.append(more)
        lines.append(more.rstrip()[:-3])
        return "\n".join(lines).strip()

    def _set_parameter(self, args: list[str]) -> None:
        from berth.registry.errors import InvalidInput
        from berth.registry.options import parse_parameter

        if len(args) < 2:
            self.out.write("Usage:\n  /set parameter <name> <value>\n")
            return
        name, values = args[0], args[1:]
        try:
            if name == "stop":
                self.session.options["stop"] = list(values)
                shown = ", ".join(values)
            else:
                self.session.options[name] = parse_parameter(name, " ".join(values))
                shown = " ".join(values)
        except InvalidInput as exc:
            self.out.write(f"Couldn't set parameter: {exc}\n")
            return
        self.out.write(f"Set parameter '{name}' to '{shown}'\n")

    def _show(self, args: list[str]) -> None:
        info = self.info
        what = args[0] if args else ""
        if what == "info":
            self.out.write(show_summary(info))
        elif what in ("license", "modelfile", "template", "system"):
            value = info.get(what) or ""
            override = getattr(self.session, what, None) if what in ("system", "template") else None
            if override is not None:
                value = override
            self.out.write((value or f"No {what} was specified for this model.") + "\n")
        elif what == "parameters":
            from berth.registry.options import format_parameters

            params = info.get("parameters") or ""
            extra = format_parameters(self.session.options) if self.session.options else ""
            text = "\n".join(t for t in (params, extra) if t)
            self.out.write((f"Model defined parameters:\n{text}" if text else "No parameters were specified.") + "\n")
        else:
            self.out.write(SHOW_HELP + "\n")

    def _load(self, args: list[str]) -> None:
        if len(args) != 1:
            self.out.write("Usage:\n  /load <modelname>\n")
            return
        try:
            self.info = self.client.post_json("/api/show", {"model": args[0]})
        except ClientError as exc:
            self.out.write(f"error: {exc}\n")
            return
        self.session.model = args[0]
        self.session.messages.clear()
        self.out.write(f"Loading model '{args[0]}'\n")
        self._load_model()

    def _save(self, args: list[str]) -> None:
        if len(args) != 1:
            self.out.write("Usage:\n  /save <modelname>\n")
            return
        body: dict[str, Any] = {"model": args[0], "from": self.session.model, "stream": False}
        if self.session.system is not None:
            body["system"] = self.session.system
        if self.session.template is not None:
            body["template"] = self.session.template
        if self.session.options:
            body["parameters"] = self.session.options
        if self.session.messages:
            body["messages"] = self.session.messages
        try:
            self.client.post_json("/api/create", body)
        except ClientError as exc:
            self.out.write(f"error: {exc}\n")
            return
        self.out.write(f"Created new model '{args[0]}'\n")


def _setup_readline(session: Session) -> None:
    """Arrow-key editing and history (kept in ~/.berth/history unless BERTH_NOHISTORY)."""
    try:
        import readline
    except ImportError:
        return
    if os.environ.get("BERTH_NOHISTORY") or not session.history:
        return
    path = Path(os.environ.get("BERTH_HOME", Path.home() / ".berth")) / "history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
        import atexit

        atexit.register(readline.write_history_file, path)
    except OSError:
        pass


def run_command(model: str, prompt: list[str], *, verbose: bool, fmt: str | None, keepalive: str | None,
                nowordwrap: bool, insecure: bool) -> None:
    client = Client(timeout=None)
    session = Session(model=model, verbose=verbose, format=fmt, wordwrap=not nowordwrap, keepalive=keepalive)
    info = ensure_model(client, model, insecure)
    parts = list(prompt)
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped:
            parts.insert(0, piped)
    if parts or not sys.stdout.isatty():
        text = " ".join(parts)
        images: list[str] = []
        if "vision" in (info.get("capabilities") or []):
            text, images = extract_images(text)
        generate_once(client, session, text, sys.stdout, images)
        return
    Repl(client, session, info).run()


