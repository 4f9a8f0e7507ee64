"""Tests for server/tools.py: tool-call markers, capabilities, request tools as template values,
and the streaming tool-call parser."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.registry.errors import InvalidInput
from berth.server.template import render
from berth.server.tools import (
    ToolCall,
    ToolCallParser,
    capabilities_from_template,
    new_tool_call_id,
    tool_call_marker,
    tools_for_template,
)

LLAMA3 = """{{- range $i, $_ := .Messages }}
{{- if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>
{{- if .ToolCalls }}
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}
{{- else }}

{{ .Content }}
{{- end }}
{{- end }}
{{- end }}"""

QWEN = """{{- range .Messages }}
{{- if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- end }}{{ if .Tools }}{{ .Tools }}{{ end }}"""

MISTRAL = """{{- range $i, $_ := .Messages }}
{{- if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}</s>
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}
{{- end }}]</s>
{{- end }}
{{- end }}
{{- end }}"""


def sequential_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def parse_all(marker: str, pieces: list[str]) -> tuple[str, list[tuple[str, dict, int]]]:
    """Feed the pieces one by one and finish; return all content and (name, arguments, index)."""
    parser = ToolCallParser(marker, new_id=sequential_ids())
    content: list[str] = []
    calls: list[ToolCall] = []
    for piece in pieces:
        text, found = parser.feed(piece)
        content.append(text)
        calls.extend(found)
    text, found = parser.finish()
    content.append(text)
    calls.extend(found)
    return "".join(content), [(call.name, call.arguments, call.index) for call in calls]


# ---------------------------------------------------------------------------------------------
# Ids and the API form


def test_new_ids_look_like_ollamas() -> None:
    ids = {new_tool_call_id() for _ in range(50)}
    assert all(re.fullmatch(r"call_[a-z0-9]{8}", call_id) for call_id in ids)
    assert len(ids) > 1


def test_tool_call_json_round_trip() -> None:
    call = ToolCall.from_json({"function": {"name": "f", "arguments": {"b": 1, "a": 2}}}, position=3)
    assert call == ToolCall(id="", name="f", arguments={"b": 1, "a": 2}, index=3)
    assert call.to_json() == {"function": {"index": 3, "name": "f", "arguments": {"b": 1, "a": 2}}}
    with_id = ToolCall.from_json({"id": "call_x", "function": {"index": 0, "name": "g"}})
    assert with_id.to_json() == {"id": "call_x", "function": {"index": 0, "name": "g", "arguments": {}}}
    with pytest.raises(InvalidInput, match="arguments"):
        ToolCall.from_json({"function": {"name": "f", "arguments": "{}"}})


# ---------------------------------------------------------------------------------------------
# Markers and capabilities


@pytest.mark.parametrize(
    ("template", "marker"),
    [
        (LLAMA3, "{"),
        (QWEN, "<tool_call>"),
        (MISTRAL, "[TOOL_CALLS]"),
        ("{{ if .ToolCalls }}{{ range .ToolCalls }}{{ json . }}{{ end }}{{ end }}", "{"),
        ("{{ range .Messages }}{{ if .Content }}x{{ else if and .ToolCalls true }}\n<|python_tag|>{{ end }}{{ end }}", "<|python_tag|>"),
        ("{{ if .ToolCalls }}{{ if true }} <call>{\"x\": 1}{{ end }}{{ end }}", "<call>"),
        ("{{ if .ToolCalls }} [{{ end }}", "["),
        ("{{ .Prompt }}", None),
        ("{{ if $.ToolCalls }}<x>{{ end }}", None),  # like Ollama, only a .ToolCalls field counts
        ("{{ if .Prompt ", None),  # does not parse
    ],
)
def test_tool_call_marker(template: str, marker: str | None) -> None:
    assert tool_call_marker(template) == marker


def test_capabilities_from_template() -> None:
    assert capabilities_from_template(QWEN) == {"tools"}
    assert capabilities_from_template("{{ .Prompt }}") == set()
    assert capabilities_from_template("{{ if .suffix }}{{ .Prompt }}{{ end }}") == {"insert"}
    assert capabilities_from_template("{{ range .Messages }}{{ .Thinking }}{{ end }}") == {"thinking"}
    assert capabilities_from_template("{{ if .Think }}/think{{ end }}{{ .Tools }}") == {"thinking", "tools"}
    assert capabilities_from_template("{{ if ") == set()


# ---------------------------------------------------------------------------------------------
# Request tools as template values

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "$defs": {"z": {"type": "string"}, "a": {"type": "integer"}},
            "properties": {
                "query": {"description": "Text", "type": "string", "default": "dropped"},
                "filters": {
                    "type": "object",
                    "properties": {"zeta": {"type": "string"}, "alpha": {"type": ["string", "null"]}},
                },
                "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}], "enum": [1, 5]},
                "tags": {"type": "array", "items": {"type": "string", "minItems": 1}},
            },
        },
    },
}

SEARCH_TOOL_JSON = (
    '{"type":"function","function":{"name":"search","parameters":{"type":"object",'
    '"$defs":{"a":{"type":"integer"},"z":{"type":"string"}},"properties":{'
    '"filters":{"type":"object","properties":{"zeta":{"type":"string"},"alpha":{"type":["string","null"]}}},'
    '"limit":{"anyOf":[{"type":"integer"},{"type":"null"}],"enum":[1,5]},'
    '"query":{"type":"string","description":"Text"},'
    '"tags":{"type":"array","items":{"minItems":1,"type":"string"}}}}}}'
)


def test_tools_print_as_ollama_json() -> None:
    tools = tools_for_template([SEARCH_TOOL])
    assert render("{{ .Tools }}", {"Tools": tools}) == "[" + SEARCH_TOOL_JSON + "]"
    assert render("{{ range .Tools }}{{ json . }}{{ end }}", {"Tools": tools}) == SEARCH_TOOL_JSON
    function_json = json.dumps(json.loads(SEARCH_TOOL_JSON)["function"], separators=(",", ":"))
    assert render("{{ range .Tools }}{{ .Function }}{{ end }}", {"Tools": tools}) == function_json
    assert render("{{ range .Tools }}{{ json .Function }}{{ end }}", {"Tools": tools}) == function_json


def test_tool_fields_for_templates() -> None:
    template = (
        "{{ range .Tools }}{{ .Type }} {{ .Function.Name }} [{{ .Function.Description }}]"
        "{{ range $name, $p := .Function.Parameters.Properties }} {{ $name }}:{{ toTypeScriptType $p }}{{ end }}"
        " {{ (index .Function.Parameters.Properties \"query\").Type }}{{ end }}"
    )
    assert render(template, {"Tools": tools_for_template([SEARCH_TOOL])}) == (
        "function search [] filters:Record<string, any> limit:number | null query:string tags:any[] string"
    )


def test_required_and_description_appear_when_given() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather", "description": "Get the weather",
            "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
        },
    }
    assert render("{{ .Tools }}", {"Tools": tools_for_template([tool])}) == (
        '[{"type":"function","function":{"name":"get_weather","description":"Get the weather",'
        '"parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string"}}}}}]'
    )
    assert render("{{ if .Tools }}yes{{ else }}no{{ end }}", {"Tools": tools_for_template([])}) == "no"


@pytest.mark.parametrize(
    "tool",
    [
        "get_weather",
        {"type": "function", "function": []},
        {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": 3}}}}},
        {"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}},
    ],
)
def test_malformed_tools_are_invalid_input(tool: object) -> None:
    with pytest.raises(InvalidInput):
        tools_for_template([tool])


# ---------------------------------------------------------------------------------------------
# Streaming parser

QWEN_OUTPUT = (
    "Let me check. <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "note": "a } in {a string\\" }"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {}}\n'
    "</tool_call>"
)


def test_qwen_calls_streamed_one_character_at_a_time() -> None:
    assert parse_all("<tool_call>", list(QWEN_OUTPUT)) == (
        "Let me check. ",
        [("get_weather", {"city": "Paris", "note": 'a } in {a string" }'}, 0), ("get_time", {}, 1)],
    )


def test_content_streams_before_the_marker_and_a_partial_marker_is_held() -> None:
    parser = ToolCallParser("<tool_call>")
    assert parser.feed("Hello <tool") == ("Hello ", [])
    assert parser.feed("box> is not it") == ("<toolbox> is not it", [])
    assert parser.feed(" <") == (" ", [])
    assert parser.finish() == ("<", [])


def test_mistral_list_of_calls() -> None:
    output = '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": [2]}}]'
    assert parse_all("[TOOL_CALLS]", [output[i:i + 3] for i in range(0, len(output), 3)]) == (
        "", [("a", {"x": 1}, 0), ("b", {"y": [2]}, 1)],
    )


def test_json_marker_only_applies_when_output_starts_with_json() -> None:
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parse_all("{", ["  \n", call]) == ("  \n", [("get_weather", {"city": "Paris"}, 0)])
    assert parse_all("{", ["Here: ", call]) == ("Here: " + call, [])
    # A JSON answer that is not a call is content.
    assert parse_all("{", ['{"answer": 42}', " done"]) == ('{"answer": 42} done', [])


def test_calls_are_found_inside_wrappers_and_with_string_arguments() -> None:
    wrapped = '<tool_call>{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}</tool_call>'
    assert parse_all("<tool_call>", [wrapped]) == ("", [("f", {"a": 1}, 0)])


def test_text_after_the_calls_is_content_and_may_hold_more_calls() -> None:
    output = 'A<tool_call>{"name": "f", "arguments": {}}</tool_call>\nB <tool_call>{"name": "g", "arguments": {}}'
    assert parse_all("<tool_call>", [output]) == ("AB ", [("f", {}, 0), ("g", {}, 1)])


@pytest.mark.parametrize(
    "output",
    [
        'Sure <tool_call>{"name": get_weather}</tool_call> ok',  # not JSON
        'Sure <tool_call>{"tool": "get_weather"}</tool_call> ok',  # JSON without a call
        'Sure <tool_call>{"name": "f", "arguments": {"a": ',  # cut off
        "Sure <tool_call> I changed my mind",  # no JSON after the marker
        "Sure <tool_call>",
    ],
)
def test_malformed_tool_calls_fall_back_to_content(output: str) -> None:
    assert parse_all("<tool_call>", list(output)) == (output, [])
    assert parse_all("<tool_call>", [output]) == (output, [])


def test_a_bad_call_after_a_good_one_gives_only_itself_back() -> None:
    output = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"broken"}'
    assert parse_all("<tool_call>", [output]) == ('<tool_call>{"broken"}', [("f", {}, 0)])


def test_nothing_after_finish() -> None:
    parser = ToolCallParser("<tool_call>")
    assert parser.feed("a") == ("a", [])
    assert parser.finish() == ("", [])
    assert parser.feed("b") == ("b", [])


# Output built from pieces that exercise every state: prose, markers, closing tags, separators,
# good and bad JSON, and text that looks like the start of a marker.
FRAGMENTS = [
    "Hello", " ", "\n", ",", "<", "<tool", "<tool_call>", "</tool_call>", "[", "]", "{", "}", '"',
    '{"name": "f", "arguments": {"a": "}{"}}', '{"name": "g", "parameters": {}}',
    '[{"name": "h", "arguments": {"x": [1, {"y": 2}]}}]', '{"broken": }', '{"name": "n"}', '"\\"{"',
]
outputs = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)


def random_pieces(data: st.DataObject, text: str) -> list[str]:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("marker", ["<tool_call>", "{", "[TOOL_CALLS]"])
@given(data=st.data(), output=outputs)
def test_any_split_gives_the_same_result_as_one_feed(marker: str, data: st.DataObject, output: str) -> None:
    text = output.replace("<tool_call>", marker) if marker != "{" else output
    assert parse_all(marker, random_pieces(data, text)) == parse_all(marker, [text])


@given(output=outputs)
def test_without_calls_the_content_is_the_output(output: str) -> None:
    content, calls = parse_all("<tool_call>", [output])
    if not calls:
        assert content == output


@given(prose=st.text(alphabet=st.characters(blacklist_characters="<"), max_size=30), data=st.data())
def test_prose_without_the_marker_passes_through(prose: str, data: st.DataObject) -> None:
    assert parse_all("<tool_call>", random_pieces(data, prose)) == (prose, [])
