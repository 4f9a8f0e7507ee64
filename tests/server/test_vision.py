"""Images through a model with a projector layer, end to end: `berth create` with a second FROM,
the runner's libmtmd path, and the official ollama client. The projector is a FAKE with random
weights (tests/vision_fixture.py), so these tests check the plumbing, not what the model says."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import httpx
import ollama
import pytest

from tests.conftest import BerthServer, berth_executable
from tests.vision_fixture import TOKENS_PER_IMAGE, png, write_fake_projector

VISION = "vision-test/fake-eyes:latest"
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def vision_model(server: BerthServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    work = tmp_path_factory.mktemp("vision")
    write_fake_projector(work / "mmproj.gguf", text_width=640)
    (work / "Modelfile").write_text("FROM gemma3:270m\nFROM ./mmproj.gguf\n")
    made = subprocess.run([berth_executable(), "create", VISION, "-f", str(work / "Modelfile")], env=server.env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    return VISION


def test_the_model_says_it_has_vision(vision_model: str, http: httpx.Client) -> None:
    shown = http.post("/api/show", json={"model": vision_model}).json()
    assert "vision" in shown["capabilities"]


def test_generate_and_chat_read_images_through_the_projector(vision_model: str, server: BerthServer,
                                                             http: httpx.Client) -> None:
    client = ollama.Client(host=server.url)
    text = client.generate(model=vision_model, prompt="Describe this.", options=GREEDY, stream=False)
    one = client.generate(model=vision_model, prompt="Describe this.", images=[png(64, 64)], options=GREEDY,
                          stream=False)
    # Each image adds its embeddings' positions to the prompt (16 for this projector).
    assert one.prompt_eval_count is not None and text.prompt_eval_count is not None
    assert one.done and one.eval_count == GREEDY["num_predict"]
    rendered = http.post("/api/generate", json={"model": vision_model, "prompt": "Describe this.",
                                                 "images": [base64.b64encode(png(64, 64)).decode()],
                                                 "_debug_render_only": True}).json()["_debug_info"]
    assert rendered["image_count"] == 1 and "[img-0]" in rendered["rendered_template"]

    chat = client.chat(model=vision_model, options=GREEDY, messages=[
        {"role": "user", "content": "What is in these?", "images": [png(40, 30), png(80, 80, shade=10)]}])
    assert chat.done and chat.message.role == "assistant" and chat.eval_count == GREEDY["num_predict"]
    streamed = list(client.chat(model=vision_model, options=GREEDY, stream=True, messages=[
        {"role": "user", "content": "And this?", "images": [png(64, 64)]}]))
    assert streamed[-1].done and streamed[-1].prompt_eval_count >= TOKENS_PER_IMAGE


def test_image_positions_are_counted(vision_model: str, http: httpx.Client) -> None:
    def positions(images: list[bytes]) -> int:
        body = {"model": vision_model, "prompt": "Look:", "raw": True, "stream": False, "options": GREEDY,
                "images": [base64.b64encode(i).decode() for i in images]}
        # A new raw prompt each time (no cached prefix), so the whole prompt is counted.
        return int(http.post("/api/generate", json=body, timeout=120).json()["prompt_eval_count"])

    none, one, two = positions([]), positions([png(64, 64)]), positions([png(64, 64), png(32, 32)])
    assert one - none == TOKENS_PER_IMAGE and two - none == 2 * TOKENS_PER_IMAGE


def test_bad_images_are_a_clear_error_and_the_runner_goes_on(vision_model: str, http: httpx.Client) -> None:
    reply = http.post("/api/generate", json={"model": vision_model, "prompt": "hi", "stream": False,
                                             "images": [base64.b64encode(b"not an image at all").decode()]})
    assert reply.status_code == 400 and "image 0 is not a PNG, JPEG, GIF or BMP image" in reply.json()["error"]
    again = http.post("/api/generate", json={"model": vision_model, "prompt": "hi", "stream": False,
                                             "images": [base64.b64encode(png(8, 8)).decode()], "options": GREEDY})
    assert again.status_code == 200 and again.json()["done"]


def test_images_work_with_batching_off_too(tmp_path: Path) -> None:
    from tests.conftest import start_server

    server = start_server(tmp_path / "models", tmp_path / "server.log", {"BERTH_BATCHING": "0"})
    try:
        write_fake_projector(tmp_path / "mmproj.gguf", text_width=640)
        (tmp_path / "Modelfile").write_text("FROM gemma3:270m\nFROM ./mmproj.gguf\n")
        made = subprocess.run([berth_executable(), "create", "eyes", "-f", str(tmp_path / "Modelfile")],
                              env=server.env(), capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr
        reply = httpx.post(f"{server.url}/api/generate", timeout=120, json={
            "model": "eyes", "prompt": "Look:", "raw": True, "stream": False, "options": GREEDY,
            "images": [base64.b64encode(png(64, 64)).decode()]}).json()
        assert reply["done"] and reply["prompt_eval_count"] >= TOKENS_PER_IMAGE
    finally:
        server.stop()


def test_image_tags_become_markers_in_order_and_untagged_images_go_first() -> None:
    from berth.server.runner.vision import with_markers

    assert with_markers("[img-1] and [img-0] ok", 2, "<M>") == ("<M> and <M> ok", [1, 0])
    assert with_markers("no tags", 2, "<M>") == ("<M><M>no tags", [0, 1])
    assert with_markers("[img-0][img-7]", 1, "<M>") == ("<M>[img-7]", [0])  # not an image of this request


def test_a_model_without_a_template_layer_reads_images_through_its_gguf_template(
        server: BerthServer, http: httpx.Client, tmp_path: Path) -> None:
    weights = max((server.models_dir / "blobs").iterdir(), key=lambda p: p.stat().st_size)  # the Gemma GGUF
    write_fake_projector(tmp_path / "mmproj.gguf", text_width=640)
    (tmp_path / "Modelfile").write_text(f"FROM {weights}\nFROM ./mmproj.gguf\n")
    made = subprocess.run([berth_executable(), "create", "vision-test/jinja-eyes", "-f", str(tmp_path / "Modelfile")],
                          env=server.env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert http.post("/api/show", json={"model": "vision-test/jinja-eyes"}).json().get("template", "") == ""

    def positions(images: list[bytes]) -> int:
        body = {"model": "vision-test/jinja-eyes", "stream": False, "options": GREEDY, "messages": [
            {"role": "user", "content": f"Look {len(images)}", "images": [base64.b64encode(i).decode() for i in images]}]}
        return int(http.post("/api/chat", json=body, timeout=120).json()["prompt_eval_count"])

    assert positions([png(64, 64)]) - positions([]) == TOKENS_PER_IMAGE


def test_openai_image_url_parts_reach_the_projector(vision_model: str, server: BerthServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    data_url = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()

    def prompt_tokens(parts: list[dict[str, object]]) -> int:
        reply = client.chat.completions.create(model=vision_model, max_tokens=2, temperature=0,
                                               messages=[{"role": "user", "content": parts}])  # type: ignore[list-item]
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    text_only = prompt_tokens([{"type": "text", "text": "What is this?"}])
    with_image = prompt_tokens([{"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": data_url}}])
    # The image's 16 positions, and perhaps a text token split differently around its marker.
    assert TOKENS_PER_IMAGE <= with_image - text_only <= TOKENS_PER_IMAGE + 2
