"""Models without a TEMPLATE layer use the GGUF's Jinja chat template, sandboxed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import ollama
import pytest

from berth.registry.errors import InvalidInput
from berth.server import jinja_prompt
from berth.server.prompt import ChatMessage
from tests.conftest import BerthServer

GEMMA_JINJA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set r = 'model' %}"
    "{% else %}{% set r = m['role'] %}{% endif %}<start_of_turn>{{ r }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_render_drops_the_leading_bos_and_adds_the_generation_prompt() -> None:
    messages = [ChatMessage("user", "Hi "), ChatMessage("assistant", "Hello"), ChatMessage("user", "Bye")]
    text = jinja_prompt.render(GEMMA_JINJA, messages, bos_token="<bos>", eos_token="<eos>")
    assert text == ("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_templates_are_sandboxed_and_errors_are_clear() -> None:
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidInput, match="template error"):
        jinja_prompt.render(hostile, [ChatMessage("user", "x")])
    raising = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidInput, match="roles must alternate"):
        jinja_prompt.render(raising, [ChatMessage("user", "x")])
    with pytest.raises(InvalidInput, match="does not parse"):
        jinja_prompt.render("{% for %}", [ChatMessage("user", "x")])


def test_fit_drops_oldest_messages_but_keeps_system_and_last() -> None:
    messages = [ChatMessage("system", "sys")] + [ChatMessage("user", f"m{i} " * 10) for i in range(6)]

    async def count(text: str) -> int:
        return len(text.split())

    text = asyncio.run(jinja_prompt.fit_and_render("{% for m in messages %}{{ m['content'] }} {% endfor %}",
                                                   messages, num_ctx=25, count_tokens=count))
    assert text.startswith("sys ") and "m5" in text and "m0" not in text
    assert len(text.split()) <= 25


def test_a_model_without_template_layer_chats_through_its_gguf_template(server: BerthServer, tmp_path: Path) -> None:
    from berth.registry.builder import ModelBuilder
    from berth.registry.library import Library
    from berth.registry.manifest import MODEL_LAYER
    from berth.registry.names import ModelName

    base = next(p for p in (server.models_dir / "blobs").iterdir() if p.stat().st_size > 100_000_000)
    copy = tmp_path / "with-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(base), str(copy),
                    "--chat-template", GEMMA_JINJA, "--force"], check=True, capture_output=True)
    library = Library(server.models_dir)
    try:
        with open(copy, "rb") as handle:
            stored = library.blobs.write_stream(iter(lambda: handle.read(1 << 22), b""))
        builder = ModelBuilder(library)
        builder.add_blob(MODEL_LAYER, stored.digest, stored.size)
        builder.commit(ModelName.parse("jinja:1"), library.config(library.get("gemma3:270m").manifest))
    finally:
        library.close()
    client = ollama.Client(host=server.url, timeout=120)
    options = {"temperature": 0, "num_predict": 8}
    answer = client.chat(model="jinja:1", messages=[{"role": "user", "content": "Name a fruit."}], options=options)
    raw = client.generate(model="jinja:1", raw=True, options={**options, "stop": ["<end_of_turn>"]},
                          prompt="<start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\n")
    assert answer.message.content == raw.response
