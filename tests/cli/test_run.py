"""`berth run`: one-shot answers from arguments and stdin, and the REPL through a pseudo-terminal."""

from __future__ import annotations

import subprocess
import time

import pexpect
import pytest

from berth.registry.default_model import GEMMA_TEMPLATE
from tests.conftest import BerthServer, add_variant, berth_executable

SHORT = "short:1"


@pytest.fixture(scope="module")
def short_model(server: BerthServer) -> str:
    """The default weights with a short, greedy answer, so runs end quickly and repeatably."""
    add_variant(server.models_dir, SHORT, template=GEMMA_TEMPLATE,
                parameters={"num_predict": 8, "temperature": 0, "stop": ["<end_of_turn>"]})
    add_variant(server.models_dir, "long:1", template=GEMMA_TEMPLATE,
                parameters={"num_predict": 4000, "temperature": 0.8})
    return SHORT


def run(server: BerthServer, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([berth_executable(), "run", *args], env=server.env(), input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_prompt_from_arguments(server: BerthServer, short_model: str) -> None:
    result = run(server, short_model, "Say", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    again = run(server, short_model, "Say hello")
    assert again.stdout == result.stdout  # arguments are joined with a space; greedy is repeatable


def test_prompt_from_stdin_comes_before_the_arguments(server: BerthServer, short_model: str) -> None:
    piped = run(server, short_model, "world", stdin="hello")
    joined = run(server, short_model, "hello world")
    assert piped.returncode == 0 and piped.stdout == joined.stdout


def test_verbose_prints_the_timing_block(server: BerthServer, short_model: str) -> None:
    result = run(server, short_model, "hi", "--verbose")
    for label in ("total duration:", "load duration:", "prompt eval count:", "eval count:", "eval rate:"):
        assert label in result.stderr


def test_unknown_model_is_one_line(server: BerthServer) -> None:
    result = run(server, "no-such-model:1", "hi")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error:")
    assert "Traceback" not in result.stderr


def spawn_repl(server: BerthServer, model: str) -> pexpect.spawn:
    env = {**server.env(), "BERTH_NOHISTORY": "1", "TERM": "dumb"}
    child = pexpect.spawn(berth_executable(), ["run", model], env=env, encoding="utf-8", timeout=120,
                          dimensions=(40, 100))
    child.expect_exact(">>> ")
    return child


def test_repl_commands(server: BerthServer, short_model: str) -> None:
    child = spawn_repl(server, short_model)
    child.sendline("/?")
    child.expect_exact("Available Commands:")
    child.expect_exact(">>> ")
    child.sendline("/set parameter temperature 0.5")
    child.expect_exact("Set parameter 'temperature' to '0.5'")
    child.sendline("/set parameter top_k many")
    child.expect_exact("Couldn't set parameter")
    child.sendline("/show parameters")
    child.expect_exact("num_predict")
    child.expect_exact("temperature")
    child.sendline("/set system You are a cat.")
    child.expect_exact("Set system message.")
    child.sendline("/show system")
    child.expect_exact("You are a cat.")
    child.sendline("/show template")
    child.expect_exact("<start_of_turn>")
    child.sendline("/set nowordwrap")
    child.expect_exact("Set 'nowordwrap' mode.")
    child.sendline("/set format json")
    child.expect_exact("Set format to 'json' mode.")
    child.sendline("/set noformat")
    child.expect_exact("Disabled format.")
    child.sendline("/nonsense")
    child.expect_exact("Unknown command '/nonsense'. Type /? for help")
    child.sendline("/clear")
    child.expect_exact("Cleared session context")
    child.sendline("/load gemma3:270m")
    child.expect_exact("Loading model 'gemma3:270m'")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


def test_repl_chat_and_multiline(server: BerthServer, short_model: str) -> None:
    child = spawn_repl(server, short_model)
    child.sendline("Hello there")
    child.expect_exact(">>> ")
    child.sendline('"""First line')
    child.expect_exact("... ")
    child.sendline('second line"""')
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_repl_template_and_save(server: BerthServer, short_model: str) -> None:
    import httpx

    child = spawn_repl(server, short_model)
    child.sendline('/set template """<start_of_turn>user')
    child.expect_exact("... ")
    child.sendline('{{ .Prompt }}<end_of_turn>"""')
    child.expect_exact("Set prompt template.")
    child.sendline("/show template")
    child.expect_exact("{{ .Prompt }}<end_of_turn>")
    child.sendline('/set system """Answer in French."""')
    child.expect_exact("Set system message.")
    child.sendline("Bonjour")
    child.expect_exact(">>> ")
    child.sendline("/save saved-session:1")
    child.expect_exact("Created new model 'saved-session:1'")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    shown = httpx.post(server.url + "/api/show", json={"model": "saved-session:1"}).json()
    assert shown["system"] == "Answer in French."
    assert shown["template"] == "<start_of_turn>user\n{{ .Prompt }}<end_of_turn>"
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]
    assert "num_predict" in shown["parameters"]


def test_ctrl_c_cancels_the_answer_not_the_session(server: BerthServer, short_model: str) -> None:
    child = spawn_repl(server, "long:1")
    child.sendline("Tell me a very long story.")
    time.sleep(2)
    child.sendintr()
    child.expect_exact(">>> ", timeout=30)
    child.sendline("/bye")
    child.expect(pexpect.EOF)
