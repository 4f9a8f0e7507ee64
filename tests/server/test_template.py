"""Tests for server/template.py, Go text/template semantics as Ollama uses them.

The model templates below are written for these tests in the shapes of real model templates
(ChatML, Llama 2/3, Mistral, Gemma, Phi-3, Command-R); expected strings follow Go's rules.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.server.template import (
    ExecError,
    GoStruct,
    JSONValue,
    ParseError,
    Template,
    TemplateError,
    parse,
    render,
)

# ---------------------------------------------------------------------------------------------
# Values shaped like Ollama's (template.templateMessage, templateTool, ...)


def message(role: str, content: str = "", tool_calls: list[GoStruct] | None = None) -> GoStruct:
    return GoStruct(
        Role=role, Content=content, Thinking="", Images=None, ToolCalls=tool_calls,
        ToolName="", ToolCallID="", type_name="*template.templateMessage",
    )


def tool_call(name: str, arguments: dict[str, Any]) -> GoStruct:
    return GoStruct(ID="", Function=GoStruct(Index=0, Name=name, Arguments=JSONValue(arguments)))


def weather_tool() -> JSONValue:
    """A tool as templates see it (Go field names) with the JSON Ollama marshals (json tags,
    struct field order, properties map sorted)."""
    view = GoStruct(
        Type="function",
        Function=GoStruct(
            Name="get_weather",
            Description="Get the weather",
            Parameters=GoStruct(
                Type="object",
                Required=["city"],
                Properties={
                    "unit": GoStruct(Type="string", Description="celsius or fahrenheit"),
                    "city": GoStruct(Type="string", Description="City name"),
                },
            ),
        ),
    )
    json_form = GoStruct(
        type="function",
        function=GoStruct(
            name="get_weather",
            description="Get the weather",
            parameters=GoStruct(
                type="object",
                required=["city"],
                properties={
                    "unit": GoStruct(type="string", description="celsius or fahrenheit"),
                    "city": GoStruct(type="string", description="City name"),
                },
            ),
        ),
    )
    return JSONValue(view, json_form)


WEATHER_TOOL_JSON = (
    '{"type":"function","function":{"name":"get_weather","description":"Get the weather",'
    '"parameters":{"type":"object","required":["city"],"properties":{'
    '"city":{"type":"string","description":"City name"},'
    '"unit":{"type":"string","description":"celsius or fahrenheit"}}}}}'
)


def tools() -> JSONValue:
    return JSONValue([weather_tool()])


CONVERSATION = [
    message("system", "You are helpful."),
    message("user", "Hi"),
    message("assistant", "Hello!"),
    message("user", "How are you?"),
]


def chat_values(messages: list[GoStruct], system: str = "", tool_list: JSONValue | None = None) -> dict[str, Any]:
    """The root map Ollama passes in Messages mode (spec 6.2)."""
    return {
        "System": system, "Messages": messages, "Tools": tool_list, "Response": "",
        "Think": False, "ThinkLevel": "", "IsThinkSet": False,
    }


def legacy_prompt(template_text: str, messages: list[GoStruct]) -> str:
    """Ollama's legacy mode (spec 6.4): render (system, prompt, response) slots per turn and
    the last turn with the template cut after .Response."""
    template = parse(template_text)
    out: list[str] = []
    slots = {"System": "", "Prompt": "", "Response": ""}

    def flush() -> None:
        out.append(template.execute(dict(slots, Think=False, ThinkLevel="", IsThinkSet=False)))
        slots.update(System="", Prompt="", Response="")

    for item in messages:
        if item["Role"] == "system":
            if slots["Prompt"] or slots["Response"]:
                flush()
            slots["System"] = item["Content"]
        elif item["Role"] == "user":
            if slots["Response"]:
                flush()
            slots["Prompt"] = item["Content"]
        elif item["Role"] == "assistant":
            slots["Response"] = item["Content"]
    out.append(template.cut_after_response().execute(dict(slots, Think=False, ThinkLevel="", IsThinkSet=False)))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Model templates


CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def test_chatml() -> None:
    assert render(CHATML, chat_values(CONVERSATION, "You are helpful.")) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


LLAMA2 = "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST] {{ .Response }}</s>"


def test_llama2_legacy_prompt() -> None:
    assert not parse(LLAMA2).uses("Messages")
    assert legacy_prompt(LLAMA2, CONVERSATION) == (
        "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi [/INST] Hello!</s>"
        "[INST] How are you? [/INST] "
    )


def test_llama2_legacy_prompt_prefills_a_final_assistant_message() -> None:
    conversation = [message("user", "Hi"), message("assistant", "Hel")]
    assert legacy_prompt(LLAMA2, conversation) == "[INST] Hi [/INST] Hel"


def test_llama2_legacy_template_without_response_gets_one_appended() -> None:
    template = parse("[INST] <<SYS>>{{ .System }}<</SYS>>\n\n{{ .Prompt }} [/INST]")
    assert not template.uses("Response") and not template.uses("Messages")
    completed = template.with_response_appended()
    assert completed.uses("Response")
    values = {"System": "S", "Prompt": "P", "Response": "R"}
    assert completed.execute(values) == "[INST] <<SYS>>S<</SYS>>\n\nP [/INST]R"
    assert completed.cut_after_response().execute(values) == "[INST] <<SYS>>S<</SYS>>\n\nP [/INST]R"


LLAMA3 = """{{- if or .System .Tools }}<|start_header_id|>system<|end_header_id|>
{{- if .System }}

{{ .System }}
{{- end }}
{{- if .Tools }}

You have access to the following functions:
{{- range .Tools }}
{{ json . }}
{{- end }}
{{- end }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>
{{- if .ToolCalls }}
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}
{{- else }}

{{ .Content }}
{{- end }}{{ if not $last }}<|eot_id|>{{ end }}
{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ .Content }}<|eot_id|>{{ if and $.Tools $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}"""


def test_llama3_with_tools_and_tool_calls() -> None:
    conversation = [
        message("system", "You are a bot."),
        message("user", "Weather in Paris?"),
        message("assistant", "", [tool_call("get_weather", {"unit": "celsius", "city": "Paris"})]),
        message("tool", "22 degrees"),
    ]
    assert render(LLAMA3, chat_values(conversation, "You are a bot.", tools())) == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a bot.\n\n"
        "You have access to the following functions:\n" + WEATHER_TOOL_JSON + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n"
        '{"name": "get_weather", "parameters": {"city":"Paris","unit":"celsius"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n22 degrees<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_plain_chat_without_system_or_tools() -> None:
    conversation = [message("user", "Hi"), message("assistant", "Hello"), message("user", "Bye")]
    assert render(LLAMA3, chat_values(conversation)) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


MISTRAL = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}
{{- if and $.Tools $last }}[AVAILABLE_TOOLS] {{ json $.Tools }}[/AVAILABLE_TOOLS]
{{- end }}[INST] {{ if and $.System $last }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}{{ if not $last }}</s>{{ end }}
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}
{{- end }}]</s>
{{- end }}
{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}} [/TOOL_RESULTS]
{{- end }}
{{- end }}"""


def test_mistral_puts_system_and_tools_on_the_last_user_turn() -> None:
    conversation = [
        message("system", "Be brief."), message("user", "Hi"), message("assistant", "Hello!"),
        message("user", "Weather?"),
    ]
    assert render(MISTRAL, chat_values(conversation, "Be brief.", tools())) == (
        "[INST] Hi[/INST] Hello!</s>"
        "[AVAILABLE_TOOLS] [" + WEATHER_TOOL_JSON + "][/AVAILABLE_TOOLS]"
        "[INST] Be brief.\n\nWeather?[/INST]"
    )


def test_mistral_tool_calls_and_results() -> None:
    conversation = [
        message("user", "Weather?"),
        message("assistant", "", [tool_call("get_weather", {"city": "Paris"})]),
        message("tool", "22"),
    ]
    assert render(MISTRAL, chat_values(conversation)) == (
        '[INST] Weather?[/INST][TOOL_CALLS] [{"name": "get_weather", "arguments": {"city":"Paris"}}]</s>'
        '[TOOL_RESULTS] {"content": 22} [/TOOL_RESULTS]'
    )


GEMMA = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def test_gemma() -> None:
    assert render(GEMMA, chat_values(CONVERSATION[1:])) == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_ending_with_assistant_leaves_the_turn_open() -> None:
    assert render(GEMMA, chat_values(CONVERSATION[1:3])) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
    )


PHI3 = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ if and (ne .Role "assistant") $last -}}
<|assistant|>
{{ end }}
{{- end }}"""


def test_phi3() -> None:
    assert render(PHI3, chat_values(CONVERSATION)) == (
        "<|system|>\nYou are helpful.<|end|>\n"
        "<|user|>\nHi<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nHow are you?<|end|>\n"
        "<|assistant|>\n"
    )


COMMAND_R = """{{- if or .Tools .System }}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>
{{- if .System }}{{ .System }}{{ end }}
{{- if .Tools }}

## Available Tools
{{- range $.Tools }}
- {{ .Function.Name }}: {{ .Function.Description }}
{{- range $name, $prop := .Function.Parameters.Properties }}
  - {{ $name }} ({{ toTypeScriptType $prop }}): {{ $prop.Description }}
{{- end }}
{{- end }}
{{- end }}<|END_OF_TURN_TOKEN|>
{{- end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{ .Content }}<|END_OF_TURN_TOKEN|>
{{- else if eq .Role "assistant" }}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{{ .Content }}<|END_OF_TURN_TOKEN|>
{{- end }}
{{- end }}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"""


def test_command_r_with_system_and_tools() -> None:
    assert render(COMMAND_R, chat_values(CONVERSATION, "Be brief.", tools())) == (
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.\n\n## Available Tools\n"
        "- get_weather: Get the weather\n"
        "  - city (string): City name\n"
        "  - unit (string): celsius or fahrenheit<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>How are you?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    )


def test_command_r_without_system_or_tools() -> None:
    assert render(COMMAND_R, chat_values([message("user", "Hi")])) == (
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    )


# ---------------------------------------------------------------------------------------------
# Text, trimming, comments


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("a  {{- 1 }}", "a1"),
        ("{{ 1 -}}  \t\r\n b", "1b"),
        ("a \t\r\n{{- 1 -}}\n\n b", "a1b"),
        ("a {{-3}} b", "a -3 b"),  # no space after '-': a negative number, not a trim marker
        ("a {{ 3 -}} b", "a 3b"),
        ("x\n{{- /* a comment */ -}}\ny", "xy"),
        ("x {{/* a\nmulti-line comment */}} y", "x  y"),
        ("x{{- /* c */}} y", "x y"),
        ("{{ \"a\" }}\u00a0{{- \"b\" }}", "a\u00a0b"),  # only ASCII space characters are trimmed
        ("", ""),
    ],
)
def test_trimming_and_comments(template: str, expected: str) -> None:
    assert render(template, {}) == expected


@given(st.text().filter(lambda text: "{{" not in text))
def test_text_without_actions_renders_to_itself(text: str) -> None:
    assert render(text, {}) == text


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_print_of_a_string_value_is_the_string(text: str) -> None:
    assert render("{{ .S }}|{{ print .S }}|{{ printf \"%s\" .S }}", {"S": text}) == f"{text}|{text}|{text}"


_TEMPLATE_PIECES = [
    "{{", "}}", "{{- ", " -}}", " ", "\n", ".", ".A", ".B.C", "$", "$x", ":=", "=", "|", "(", ")", ",", "if",
    "else", "end", "range", "with", "define", "template", "block", "break", "continue", '"s"', "`r`", "'c'",
    "1", "-2", "1.5", "0x1F", "nil", "true", "eq", "len", "index", "slice", "printf", '"%v"', "json", "and",
    "not", "/*", "*/", "x", "é", "\\",
]


@given(st.lists(st.sampled_from(_TEMPLATE_PIECES), max_size=20))
def test_any_text_parses_or_fails_with_a_template_error(pieces: list[str]) -> None:
    text = "".join(pieces)
    try:
        template = parse(text)
    except ParseError as error:
        assert str(error).startswith("template: :")
        return
    for candidate in (template, template.cut_after_response()):
        try:
            candidate.execute({"A": [1, "a"], "B": {"C": "c"}})
        except ExecError as error:
            assert str(error).startswith("template: ")


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


def _same_json(parsed: Any, original: Any) -> bool:
    # Go writes floats below 1e21 without an exponent (1e16 is "10000000000000000"), which
    # Python reads back as an int: compare numbers as floats.
    if isinstance(original, float):
        return isinstance(parsed, (int, float)) and float(parsed) == original
    if isinstance(original, list):
        return isinstance(parsed, list) and len(parsed) == len(original) and all(map(_same_json, parsed, original))
    if isinstance(original, dict):
        return isinstance(parsed, dict) and parsed.keys() == original.keys() and all(
            _same_json(parsed[key], original[key]) for key in original
        )
    return type(parsed) is type(original) and parsed == original


@given(_JSON_VALUES)
def test_json_output_parses_back_to_the_same_value(value: Any) -> None:
    assert _same_json(json.loads(render("{{ json .V }}", {"V": value})), value)


# ---------------------------------------------------------------------------------------------
# Values: printing, missing keys, structs


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ .Missing }}", "<no value>"),  # missingkey=zero on map[string]any: nil prints so
        ("{{ .Nil }}", "<no value>"),
        ("{{ print .Missing }}", "<nil>"),
        ("{{ printf \"%v\" .Missing }}", "<nil>"),
        ("{{ if .Missing }}yes{{ else }}no{{ end }}", "no"),
        ("{{ $x := .Missing }}{{ $x.Sub }}", "<no value>"),
        ("{{ true }} {{ false }} {{ 42 }} {{ -7 }}", "true false 42 -7"),
        ("{{ .Float }} {{ .Big }} {{ .Small }} {{ .Whole }} {{ .Tenth }}", "1.5 1e+06 1e-05 100000 0.1"),
        ("{{ .List }}", "[1 a <nil> [b] map[k:v]]"),
        ("{{ .Map }}", "map[a:1 b:map[c:true] z:[]]"),
        ("{{ .Args }}", '{"a":"\\u003cx\\u003e","b":2}'),
        ("{{ .Struct }}", "{user hi}"),
        ("{{ printf \"%+v\" .Struct }}", "{Role:user Content:hi}"),
    ],
)
def test_values_print_like_go(template: str, expected: str) -> None:
    values = {
        "Nil": None, "Float": 1.5, "Big": 1e6, "Small": 0.00001, "Whole": 100000.0, "Tenth": 0.1,
        "List": [1, "a", None, ["b"], {"k": "v"}],
        "Map": {"z": [], "b": {"c": True}, "a": 1},
        "Args": JSONValue({"b": 2, "a": "<x>"}),
        "Struct": GoStruct(Role="user", Content="hi"),
    }
    assert render(template, values) == expected


def test_missing_key_inside_a_field_chain_is_an_error() -> None:
    with pytest.raises(ExecError, match=r"nil pointer evaluating interface \{\}\.Sub"):
        render("{{ .Missing.Sub }}", {})


@dataclass
class _Message:
    Role: str
    Content: str
    Images: list[str] = field(default_factory=list)

    def Greeting(self, name: str) -> str:  # noqa: N802 - Go method names are exported
        return f"{self.Role} greets {name}"


def test_dataclasses_behave_like_go_structs() -> None:
    values = {"M": _Message("user", "hi")}
    assert render("{{ .M.Role }}/{{ .M.Content }}/{{ .M }}/{{ json .M }}", values) == (
        'user/hi/{user hi []}/{"Role":"user","Content":"hi","Images":[]}'
    )
    assert render('{{ .M.Greeting "bob" }}', values) == "user greets bob"
    assert render("{{ if .M }}struct is true{{ end }}", values) == "struct is true"
    with pytest.raises(ExecError, match="can't evaluate field Nope in type _Message"):
        render("{{ .M.Nope }}", values)
    with pytest.raises(ExecError, match="can't evaluate field Role in type string"):
        render("{{ .M.Role.Role }}", values)


def test_go_struct_fields_are_checked() -> None:
    with pytest.raises(ExecError, match=r"can't evaluate field ToolCallId in type \*template.templateMessage"):
        render("{{ range .Messages }}{{ .ToolCallId }}{{ end }}", chat_values(CONVERSATION))
    with pytest.raises(ExecError, match="Role has arguments but cannot be invoked as function"):
        render("{{ .M.Role 1 }}", {"M": GoStruct(Role="user")})
    with pytest.raises(ExecError, match="a is not a method but has arguments"):
        render("{{ .M.a 1 }}", {"M": {"a": 1}})


def test_json_value_is_transparent_except_when_printed() -> None:
    values = {"Args": JSONValue({"city": "Paris", "days": 3}), "Tools": tools()}
    assert render("{{ .Args.city }} {{ len .Args }} {{ index .Args \"days\" }}", values) == "Paris 2 3"
    assert render("{{ range $k, $v := .Args }}{{ $k }}={{ $v }};{{ end }}", values) == "city=Paris;days=3;"
    assert render("{{ .Args.String }}", values) == '{"city":"Paris","days":3}'
    assert render("{{ .Tools }}", values) == "[" + WEATHER_TOOL_JSON + "]"
    assert render("{{ range .Tools }}{{ .Function.Name }}{{ end }}", values) == "get_weather"
    assert render("{{ if .Empty }}x{{ else }}empty{{ end }}", {"Empty": JSONValue([])}) == "empty"


# ---------------------------------------------------------------------------------------------
# Literals


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ 0x1F }} {{ 0o17 }} {{ 017 }} {{ 0b101 }} {{ 1_000 }} {{ +5 }}", "31 15 15 5 1000 5"),
        ("{{ 1.0 }} {{ 1e3 }} {{ .5 }} {{ -2.5 }} {{ 0x1p4 }} {{ 1e21 }}", "1 1000 0.5 -2.5 16 1e+21"),
        ("{{ 'a' }} {{ '\\n' }} {{ '\\x41' }} {{ '\\u00e9' }} {{ 'é' }}", "97 10 65 233 233"),
        ("{{ 1+2i }} {{ 2i }}", "(1+2i) (0+2i)"),
        ('{{ "tab\\there" }}|{{ "\\u00e9\\x41\\101" }}|{{ "q\\"q" }}', "tab\there|éAA|q\"q"),
        ("{{ `raw \\n {{ not an action }}` }}", "raw \\n {{ not an action }}"),
        ("{{ `a\r\nb` }}", "a\nb"),  # Go drops carriage returns from raw strings
        ("{{ printf \"%v %v\" true nil }}", "true <nil>"),
    ],
)
def test_literals(template: str, expected: str) -> None:
    assert render(template, {}) == expected


# ---------------------------------------------------------------------------------------------
# Variables, control structures


def test_variables_declare_assign_and_root() -> None:
    template = (
        "{{ $x := 1 }}{{ $x }}{{ $x = 2 }}{{ $x }}"
        "{{ if true }}{{ $x = 3 }}{{ $y := 9 }}{{ $y }}{{ end }}{{ $x }}"
        "{{ range .L }}{{ $.Name }}{{ end }}{{ $ := 5 }}{{ $ }}"
    )
    assert render(template, {"L": [1, 2], "Name": "n"}) == "1293nn5"


@pytest.mark.parametrize(
    "template",
    [
        "{{ if true }}{{ $x := 1 }}{{ end }}{{ $x }}",
        "{{ range .L }}{{ $x := 1 }}{{ end }}{{ $x }}",
        "{{ range $i, $e := .L }}{{ end }}{{ $e }}",
        "{{ with $x := 1 }}{{ end }}{{ $x }}",
        '{{ define "t" }}{{ $x }}{{ end }}{{ $x := 1 }}',
    ],
)
def test_variables_are_scoped_to_their_block(template: str) -> None:
    with pytest.raises(ParseError, match=r'^template: :1: undefined variable "\$x"$|undefined variable "\$e"'):
        parse(template)


def test_called_templates_see_only_dollar() -> None:
    template = '{{ define "t" }}[{{ . }}|{{ $ }}]{{ end }}{{ $v := 7 }}{{ template "t" .A }}{{ template "t" }}'
    assert render(template, {"A": "a"}) == "[a|a][<no value>|<no value>]"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ range .L }}{{ . }},{{ end }}", "a,b,c,"),
        ("{{ range $i, $e := .L }}{{ $i }}={{ $e }};{{ end }}", "0=a;1=b;2=c;"),
        ("{{ range $e := .L }}{{ $e }}{{ end }}", "abc"),
        ("{{ $i := 0 }}{{ $e := 0 }}{{ range $i, $e = .L }}{{ end }}{{ $i }}{{ $e }}", "2c"),
        ("{{ range $k, $v := .M }}{{ $k }}:{{ $v }} {{ end }}", "a:1 b:2 c:3 "),
        ("{{ range .Empty }}x{{ else }}empty{{ end }}", "empty"),
        ("{{ range .EmptyMap }}x{{ else }}empty{{ end }}", "empty"),
        ("{{ range .Missing }}x{{ else }}nil{{ end }}", "nil"),
        ("{{ range 3 }}{{ . }}{{ end }}", "012"),
        ("{{ range 0 }}x{{ else }}none{{ end }}", "none"),
        ("{{ range .L }}{{ if eq . \"b\" }}{{ continue }}{{ end }}{{ . }}{{ end }}", "ac"),
        ("{{ range .L }}{{ if eq . \"b\" }}{{ break }}{{ end }}{{ . }}{{ end }}", "a"),
        ("{{ range .L }}{{ range $.N }}{{ break }}{{ end }}{{ . }}{{ end }}", "abc"),
        ("{{ with .S }}[{{ . }}]{{ end }}{{ with .Missing }}x{{ else }}none{{ end }}", "[s]none"),
        ("{{ with .Missing }}a{{ else with .S }}b={{ . }}{{ else }}c{{ end }}", "b=s"),
        ("{{ if .Missing }}a{{ else if .Empty }}b{{ else if .S }}c{{ else }}d{{ end }}", "c"),
        ("{{ if 0 }}a{{ else if 0.0 }}b{{ else if \"\" }}c{{ else if .EmptyMap }}d{{ else }}e{{ end }}", "e"),
    ],
)
def test_control_structures(template: str, expected: str) -> None:
    values = {"L": ["a", "b", "c"], "M": {"c": 3, "a": 1, "b": 2}, "Empty": [], "EmptyMap": {}, "S": "s", "N": [1]}
    assert render(template, values) == expected


def test_range_errors() -> None:
    with pytest.raises(ExecError, match="range can't iterate over hello"):
        render("{{ range .S }}{{ end }}", {"S": "hello"})
    with pytest.raises(ExecError, match="can't use 3 to iterate over more than one variable"):
        render("{{ range $i, $e := 3 }}{{ end }}", {})


def test_define_template_and_block() -> None:
    template = (
        '{{ define "turn" }}<{{ .Role }}>{{ .Content }}{{ end }}'
        '{{ range .Messages }}{{ template "turn" . }}{{ end }}'
        '{{ block "tail" .Tail }}[{{ . }}]{{ end }}'
    )
    values = {"Messages": CONVERSATION[1:3], "Tail": "end"}
    assert render(template, values) == "<user>Hi<assistant>Hello![end]"
    with pytest.raises(ExecError, match='template "nope" not defined'):
        render('{{ template "nope" }}', {})
    with pytest.raises(ExecError, match="exceeded maximum template depth"):
        render('{{ define "loop" }}{{ template "loop" }}{{ end }}{{ template "loop" }}', {})


# ---------------------------------------------------------------------------------------------
# Functions


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ and 1 0 2 }} {{ and 1 2 }} {{ or 0 \"\" .L }} {{ or 0 false }}", "0 2 [1 2 3] false"),
        ("{{ and false (index .L 10) }} {{ or true (index .L 10) }}", "false true"),  # short-circuit
        ("{{ not 0 }} {{ not .L }} {{ not .Missing }}", "true false true"),
        ("{{ len .S }} {{ len .L }} {{ len .M }} {{ len \"héllo\" }}", "3 3 2 6"),  # len counts bytes
        ("{{ index .L 0 }} {{ index .M \"b\" 1 }} {{ index .M \"zz\" }} {{ index .S 1 }} {{ index .L }}",
         "1 y <no value> 98 [1 2 3]"),
        ("{{ slice .L 1 }} {{ slice .L 0 2 }} {{ slice .L 1 2 3 }} {{ slice .L }} {{ slice .S 1 }} {{ slice .S 0 2 }}",
         "[2 3] [1 2] [2] [1 2 3] bc ab"),
        ("{{ eq 1 1 }} {{ eq \"a\" \"b\" \"a\" }} {{ eq .Missing nil }} {{ eq .S nil }} {{ eq .M nil }}",
         "true true true false false"),
        ("{{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt \"b\" \"a\" }} {{ ge 1.5 2.5 }}", "true true true true false"),
        ("{{ print 1 2 \"a\" \"b\" 3 nil }}|{{ println \"x\" 1 }}", "1 2ab3 <nil>|x 1\n"),
        ("{{ html \"<a href='x'>&\\\"\" }}", "&lt;a href=&#39;x&#39;&gt;&amp;&#34;"),
        ("{{ js \"it's <b>=\\\"\\n\" }}", "it\\'s \\u003Cb\\u003E\\u003D\\\"\\u000A"),
        ("{{ urlquery \"a b&c=é/\" }} {{ html .Missing }}", "a+b%26c%3D%C3%A9%2F &lt;no value&gt;"),
        ("{{ call .Double 21 }}", "42"),
        ("{{ .S | len }} {{ \"x\" | printf \"%s-%s\" \"y\" }} {{ 0 | index .M.b | print }}", "3 y-x x"),
        ("{{ (index .L 1) }} {{ (index .M \"b\") }} {{ (.M).a }}", "2 [x y] 1"),
    ],
)
def test_builtin_functions(template: str, expected: str) -> None:
    values = {"L": [1, 2, 3], "S": "abc", "M": {"a": 1, "b": ["x", "y"]}, "Double": lambda n: n * 2}
    assert render(template, values) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ eq 1 1.5 }}", "error calling eq: incompatible types for comparison: int and float64"),
        ("{{ eq \"a\" 1 }}", "error calling eq: incompatible types for comparison: string and int"),
        ("{{ eq .L .L }}", "error calling eq: non-comparable type"),
        ("{{ eq 1 }}", "error calling eq: missing argument for comparison"),
        ("{{ lt true false }}", "error calling lt: invalid type for comparison"),
        ("{{ lt .L 1 }}", "error calling lt: invalid type for comparison"),
        ("{{ gt 1 \"a\" }}", "error calling gt: incompatible types for comparison: int and string"),
        ("{{ len 3 }}", "error calling len: len of type int"),
        ("{{ len .Missing }}", "error calling len: len of nil pointer"),
        ("{{ index .L 5 }}", "error calling index: index out of range: 5"),
        ("{{ index .L \"a\" }}", "error calling index: cannot index slice/array with type string"),
        ("{{ index 3 0 }}", "error calling index: can't index item of type int"),
        ("{{ index .Missing 0 }}", "error calling index: index of untyped nil"),
        ("{{ slice .L 2 1 }}", "error calling slice: invalid slice index: 2 > 1"),
        ("{{ slice .S 0 1 2 }}", "error calling slice: cannot 3-index slice a string"),
        ("{{ slice .L 0 1 2 3 }}", "error calling slice: too many slice indexes: 4"),
        ("{{ slice .L 4 }}", "error calling slice: index out of range: 4"),
        ("{{ call .S }}", "error calling call: non-function .S of type string"),
        ("{{ len }}", "wrong number of args for len: want 1 got 0"),
        ("{{ ne 1 }}", "wrong number of args for ne: want 2 got 1"),
        ("{{ index }}", "wrong number of args for index: want at least 1 got 0"),
        ("{{ printf 1 }}", "expected string; found 1"),
        ("{{ printf .L }}", r"wrong type for value; expected string; got \[\]interface \{\}"),
        ("{{ .S 1 }}", "S is not a method but has arguments"),
        ("{{ 1 2 }}", "can't give argument to non-function 1"),
        ("{{ (slice .L 1).X }}", r"can't evaluate field X in type \[\]interface \{\}"),
        ("{{ nil }}", "nil is not a command"),
    ],
)
def test_function_errors(template: str, message: str) -> None:
    with pytest.raises(ExecError, match=message):
        render(template, {"L": [1, 2, 3], "S": "abc"})


def test_json_marshals_like_go() -> None:
    values = {
        "M": {"b": 1, "a": [True, None, 1.5, 1e21, 1e-7, 100.0], "<": "&"},
        "S": "tab\t\"quote\" <tag> \u2028 é \x01",
        "Struct": GoStruct(z=1, a=2),
        "NaN": float("nan"),
    }
    assert render("{{ json .M }}", values) == '{"\\u003c":"\\u0026","a":[true,null,1.5,1e+21,1e-7,100],"b":1}'
    assert render("{{ json .S }}", values) == '"tab\\t\\"quote\\" \\u003ctag\\u003e \\u2028 é \\u0001"'
    assert render("{{ json .Struct }} {{ json .Missing }} {{ json 3 }}", values) == '{"z":1,"a":2} null 3'
    assert render("[{{ json .NaN }}]", values) == "[]"  # Ollama ignores json.Marshal's error


def test_dates_are_local_iso_dates_and_accept_a_format_argument() -> None:
    today = datetime.date.today()
    rendered = render('{{ currentDate }} {{ currentDate "2006-01-02" }} {{ yesterdayDate }}', {})
    # Tolerate a run across midnight.
    assert rendered in {
        f"{day.isoformat()} {day.isoformat()} {(day - datetime.timedelta(days=1)).isoformat()}"
        for day in (today, today + datetime.timedelta(days=1))
    }
    with pytest.raises(ExecError, match="expected string; found 1"):
        render("{{ currentDate 1 }}", {})


@pytest.mark.parametrize(
    ("prop", "expected"),
    [
        ({"type": "string"}, "string"),
        ({"type": "integer"}, "number"),
        ({"type": "number"}, "number"),
        ({"type": "boolean"}, "boolean"),
        ({"type": "array", "items": {"type": "string"}}, "any[]"),
        ({"type": "object"}, "Record<string, any>"),
        ({"type": ["string", "null"]}, "string | null"),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "string | number"),
        ({"type": "string", "enum": ["a", "b"]}, "string"),
        ({"type": "mystery"}, "any"),
        ({}, "any"),
        (GoStruct(Type=["boolean"], Description="d"), "boolean"),
        ("not a property", "any"),
    ],
)
def test_to_typescript_type_matches_ollama(prop: Any, expected: str) -> None:
    assert render("{{ toTypeScriptType .P }}", {"P": prop}) == expected


# ---------------------------------------------------------------------------------------------
# printf


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ('{{ printf "%s|%v|%d|%t" "a" 1.5 42 true }}', "a|1.5|42|true"),
        ('{{ printf "%q|%q|%x|%X|%x" "hi\\n" 97 255 255 "hi" }}', "\"hi\\n\"|'a'|ff|FF|6869"),
        ('{{ printf "%5d|%-5d|%05d|%+d|% d" 42 42 -42 42 42 }}', "   42|42   |-0042|+42| 42"),
        ('{{ printf "%f|%.2f|%8.3f|%e|%g|%.3g|%g" 3.14159 3.14159 3.14159 1234.5678 0.000012 3.14159 100000.0 }}',
         "3.141590|3.14|   3.142|1.234568e+03|1.2e-05|3.14|100000"),
        ('{{ printf "%6s|%-6s|%.2s|%c|%U|%o|%b|%%" "ab" "ab" "abcdef" 65 65 8 5 }}',
         "    ab|ab    |ab|A|U+0041|10|101|%"),
        ('{{ printf "%v %v %v" .L .M .N }}', "[1 a] map[a:1] <nil>"),
        ('{{ printf "%s" .L }}', "[%!s(int=1) a]"),
        ('{{ printf "%d" "s" }}|{{ printf "%s %s" "a" }}|{{ printf "x" 1 "b" }}',
         "%!d(string=s)|a %!s(MISSING)|x%!(EXTRA int=1, string=b)"),
        ('{{ printf "%*d|%.*f" 4 7 1 2.25 }}', "   7|2.2"),
        ('{{ printf "%v|%s" .J .J }}', '{"a":1}|{"a":1}'),
        ('{{ printf "%T %T %T %T" 1 "s" .L .M }}', "int string []interface {} map[string]interface {}"),
    ],
)
def test_printf_verbs(template: str, expected: str) -> None:
    assert render(template, {"L": [1, "a"], "M": {"a": 1}, "N": None, "J": JSONValue({"a": 1})}) == expected


# ---------------------------------------------------------------------------------------------
# Errors carry Go's wording and line numbers


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("hello {{ .X", "template: :1: unclosed action"),
        ("line one\n{{ .X\n\n", "template: :4: unclosed action started at :2"),
        ("a\nb\n{{ nosuch .X }}", 'template: :3: function "nosuch" not defined'),
        ("a\n{{ end }}", "template: :2: unexpected {{end}}"),
        ("{{ else }}", "template: :1: unexpected {{else}}"),
        ("{{ if .X }}\nbody\n", "template: :3: unexpected EOF"),
        ("{{ range .X }}{{ else }}{{ else }}{{ end }}", "template: :1: expected end; found {{else}}"),
        ('{{ "abc }}', "template: :1: unterminated quoted string"),
        ("{{ $x }}", 'template: :1: undefined variable "$x"'),
        ("{{ /* no */ }}", "template: :1: unexpected \"/\" in command"),
        ("{{/* unclosed", "template: :1: unclosed comment"),
        ("{{/* c */ x}}", "template: :1: comment ends before closing delimiter"),
        ("{{ break }}", "template: :1: {{break}} outside {{range}}"),
        ("{{ range .L }}{{ continue 1 }}{{ end }}", 'template: :1: unexpected "1" in {{continue}}'),
        ("{{ 1.x }}", 'template: :1: bad number syntax: "1.x"'),
        ("{{ 08 }}", 'template: :1: integer overflow: "08"'),
        ("{{ (1 }}", "template: :1: unclosed left paren"),
        ("{{ 1) }}", "template: :1: unexpected right paren"),
        ("{{ }}", "template: :1: missing value for command"),
        ("{{ .X | 1 }}", "template: :1: non executable command in pipeline stage 2"),
        ("{{ if }}{{ end }}", "template: :1: missing value for if"),
        ("{{ template x }}", 'template: :1: unexpected "x" in template clause'),
        ("{{ .X.@ }}", "template: :1: bad character U+0040 '@'"),
        ('{{ "a".X }}', 'template: :1: unexpected . after term "\\"a\\""'),
        ("{{ $x, $y := 1 }}", "template: :1: too many declarations in command"),
        ('{{ define "a" }}x{{ end }}{{ define "a" }}y{{ end }}',
         'template: :1: template: multiple definition of template "a"'),
        ('{{ "\\q" }}', "template: :1: invalid syntax"),
    ],
)
def test_parse_errors(template: str, message: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse(template)
    assert str(caught.value) == message


def test_execution_errors_name_line_column_and_node() -> None:
    with pytest.raises(ExecError) as caught:
        render("first line\n  {{ eq .A 1.5 }}", {"A": 1})
    assert str(caught.value) == (
        'template: :2:5: executing "" at <eq .A 1.5>: '
        "error calling eq: incompatible types for comparison: int and float64"
    )
    with pytest.raises(ExecError) as caught:
        render('{{ define "t" }}{{ len 3 }}{{ end }}{{ template "t" }}', {})
    assert str(caught.value) == 'template: :1:19: executing "t" at <len 3>: error calling len: len of type int'
    assert issubclass(ExecError, TemplateError) and issubclass(ParseError, TemplateError)


# ---------------------------------------------------------------------------------------------
# Introspection and rewriting for Ollama's rules


def test_uses_and_identifiers() -> None:
    template = parse(
        '{{ define "d" }}{{ .Suffix }}{{ end }}'
        "{{ if .System }}{{ range $i, $m := .Messages }}{{ $m.Content }}{{ end }}{{ end }}"
        "{{ with (index .Tools 0) }}{{ end }}{{ (.Hidden).Chained }}"
    )
    for name in ("System", "Messages", "Content", "Tools", "Suffix", "$m"):
        assert template.uses(name), name
    # Case-sensitive; like Ollama's Identifiers(), declarations and (pipe).Field chains don't count.
    for name in ("messages", "Response", "Prompt", "Hidden", "Chained", "Role", "$i"):
        assert not template.uses(name), name
    assert {"System", "Messages", "Tools", "Suffix"} <= template.identifiers()


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # Everything after the first .Response goes, including text after it.
        ("<s>{{ .Prompt }}</s>{{ .Response }}<end>{{ .Prompt }}", "<s>P</s>R"),
        # Inside an if: the rest of the body and everything after the if are cut.
        ("{{ if .Prompt }}[{{ .Prompt }}]{{ .Response }}<eot>{{ end }}<after>", "[P]R"),
        # The if's own condition does not count (Ollama does not search branch pipelines).
        ("{{ if .Response }}yes{{ end }}<tail>{{ .Response }}<gone>", "yes<tail>R"),
        # Arguments after .Response in the same command are removed too.
        ('{{ print .Response "!" }}<gone>', "R"),
        # Inside range: $.Response is a variable, not a field, so only .Response cuts.
        ("{{ range .L }}{{ . }}{{ $.Response }}{{ .Response }}x{{ end }}y", "map[Response:]R"),
        # An else list after a cut in the body is dropped (Ollama would panic).
        ("{{ if .Prompt }}{{ .Response }}<a>{{ else }}<b>{{ end }}<c>", "R"),
        # No .Response at all: nothing is cut.
        ("{{ .Prompt }}<end>", "P<end>"),
    ],
)
def test_cut_after_response(template: str, expected: str) -> None:
    values = {"Prompt": "P", "Response": "R", "L": [{"Response": ""}]}
    assert parse(template).cut_after_response().execute(values) == expected


def test_cut_after_response_keeps_the_original_and_defined_templates() -> None:
    template = parse('{{ define "sys" }}<{{ . }}>{{ end }}{{ template "sys" .System }}{{ .Response }}</s>')
    cut = template.cut_after_response()
    assert isinstance(cut, Template) and cut is not template
    assert cut.execute({"System": "S", "Response": "R"}) == "<S>R"
    assert template.execute({"System": "S", "Response": "R"}) == "<S>R</s>"


def test_parse_is_cached_and_templates_are_reusable() -> None:
    assert parse(CHATML) is parse(CHATML)
    template = parse("{{ range .L }}{{ . }}{{ end }}")
    assert template.execute({"L": [1]}) == "1"
    assert template.execute({"L": [2, 3]}) == "23"
    assert template.source == "{{ range .L }}{{ . }}{{ end }}"
