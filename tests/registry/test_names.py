"""The model-name grammar: valid and invalid tables, defaults, display form, case rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.registry.errors import InvalidName
from berth.registry.names import ModelName

VALID = [
    ("llama3", "registry.ollama.ai", "library", "llama3", "latest"),
    ("llama3:8b", "registry.ollama.ai", "library", "llama3", "8b"),
    ("gemma3:270m", "registry.ollama.ai", "library", "gemma3", "270m"),
    ("user/model", "registry.ollama.ai", "user", "model", "latest"),
    ("user/model:v1.2", "registry.ollama.ai", "user", "model", "v1.2"),
    ("localhost:5000/ns/m:t", "localhost:5000", "ns", "m", "t"),
    ("ghcr.io/org/model.gguf:q4_K_M", "ghcr.io", "org", "model.gguf", "q4_K_M"),
    ("_private/_m:_t", "registry.ollama.ai", "_private", "_m", "_t"),
    ("http://myhost/ns/m", "myhost", "ns", "m", "latest"),
    ("Mixed/CaseModel:TAG", "registry.ollama.ai", "Mixed", "CaseModel", "TAG"),
    ("a" * 80 + ":" + "b" * 80, "registry.ollama.ai", "library", "a" * 80, "b" * 80),
]


@pytest.mark.parametrize("text,host,namespace,model,tag", VALID)
def test_valid_names_parse_with_defaults(text: str, host: str, namespace: str, model: str, tag: str) -> None:
    name = ModelName.parse(text)
    assert (name.host, name.namespace, name.model, name.tag) == (host, namespace, model, tag)


INVALID = [
    ("", "empty"),
    ("   ", "empty"),
    ("model:", "tag is empty"),
    ("/model", "namespace is empty"),
    ("ns/", "model is empty"),
    ("../etc/passwd", "host must start"),
    ("ns/../m", "namespace must start"),
    ("a/b/c/d", "host may only contain"),
    ("localhost:5000/m", "namespace may only contain"),
    ("ns.x/m", "namespace may only contain"),
    ("-m", "model must start"),
    (".hidden", "model must start"),
    ("m@sha256:abc", "model may only contain"),
    ("m:t@x", "tag may only contain"),
    ("m\\x", "model may only contain"),
    ("m:t/x", "namespace may only contain"),
    ("a" * 81, "longer than 80"),
    ("m:" + "t" * 81, "longer than 80"),
    ("h" * 351 + "/ns/m", "longer than 350"),
    ("mödel", "model may only contain"),
]


@pytest.mark.parametrize("text,rule", INVALID)
def test_invalid_names_name_the_broken_rule(text: str, rule: str) -> None:
    with pytest.raises(InvalidName) as info:
        ModelName.parse(text)
    assert "invalid model name" in str(info.value)
    assert rule in str(info.value)


@pytest.mark.parametrize(
    "text,display",
    [
        ("llama3", "llama3:latest"),
        ("library/llama3:8b", "llama3:8b"),
        ("registry.ollama.ai/user/m:t", "user/m:t"),
        ("REGISTRY.OLLAMA.AI/LIBRARY/m", "m:latest"),
        ("myhost:5000/ns/m:t", "myhost:5000/ns/m:t"),
    ],
)
def test_display_form(text: str, display: str) -> None:
    assert ModelName.parse(text).display == display


def test_full_form_and_repository() -> None:
    name = ModelName.parse("user/m:t")
    assert str(name) == "registry.ollama.ai/user/m:t"
    assert name.repository == "user/m"


def test_case_insensitive_identity_and_canonical_spelling() -> None:
    existing = [ModelName.parse("llama3:8B"), ModelName.parse("Team/Other:latest")]
    assert ModelName.parse("LLaMA3:8b").key == ModelName.parse("llama3:8B").key
    assert ModelName.parse("LLAMA3:8b").canonical(existing) == existing[0]
    # Part-wise: a new tag under an existing model keeps the stored spelling of known parts.
    assert ModelName.parse("team/other:new").canonical(existing).namespace == "Team"
    assert ModelName.parse("new:latest").canonical(existing).model == "new"


PART = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=20).filter(lambda s: s[0] not in "-.")


@given(namespace=PART.filter(lambda s: "." not in s), model=PART, tag=PART)
def test_display_round_trips(namespace: str, model: str, tag: str) -> None:
    name = ModelName.parse(f"{namespace}/{model}:{tag}")
    assert ModelName.parse(name.display) == name
    assert ModelName.parse(str(name)) == name


@given(st.text(max_size=60))
def test_parse_never_crashes_and_valid_names_never_traverse(text: str) -> None:
    try:
        name = ModelName.parse(text)
    except InvalidName:
        return
    for part in (name.namespace, name.model, name.tag):
        assert "/" not in part and "\\" not in part and not part.startswith(".")
