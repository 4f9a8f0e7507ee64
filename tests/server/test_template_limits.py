"""Hostile templates: every limit of server/template.py and server/jinja_prompt.py, and the
create-time check in server/prompt.py.

Templates come from API clients and model files, so no text and no values may make rendering
raise RecursionError or MemoryError, hang, or fill memory: each case below must fail fast with a
TemplateError (Go) or PromptError (Jinja, prompts) that names the limit it passed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from berth.registry.errors import InvalidInput
from berth.server import jinja_prompt, prompt
from berth.server import template as go
from berth.server.prompt import ChatMessage, PromptError, render_chat, render_suffix
from berth.server.template import ExecError, ParseError, parse, render
from berth.server.tools import ToolCall

MESSAGES = [
    ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"),
    ChatMessage("user", "Weather in Paris?"),
]


@pytest.fixture(autouse=True)
def _no_jinja_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jinja renders also stop at a clock (MAX_JINJA_SECONDS); the tests check the counted limits,
    which a slow machine must not reach the clock before."""
    monkeypatch.setattr(jinja_prompt, "MAX_JINJA_SECONDS", 60.0)


def nested(opening: str, closing: str, levels: int, inner: str = "x") -> str:
    return opening * levels + inner + closing * levels


def fails_with_limit(error: BaseException, name: str) -> bool:
    """The error names the limit, with its value, and carries its name."""
    limit = getattr(go, name, None) or getattr(jinja_prompt, name)
    return name in str(error) and str(limit) in str(error) and getattr(error, "limit", name) == name


# ---------------------------------------------------------------------------------------------
# Go templates: parsing


@pytest.mark.parametrize(
    "text",
    [
        nested("{{ if 1 }}", "{{ end }}", 300),  # the reported template
        nested("{{ with 1 }}", "{{ end }}", 300),
        nested("{{ range 1 }}", "{{ end }}", 300),
        "{{ if 0 }}" + "{{ else if 0 }}" * 300 + "{{ end }}",
        "{{ with 0 }}" + "{{ else with 0 }}" * 300 + "{{ end }}",
        nested('{{ block "b" . }}', "{{ end }}", 300),
        '{{ define "d" }}' + nested("{{ if 1 }}", "{{ end }}", 300) + "{{ end }}",
        "{{ " + nested("(", ")", 300, "1") + " }}",
        "{{ print " + nested("(print ", ")", 300, "1") + " }}",
        "{{ " + nested("(", ").X", 300, ".") + " }}",
        nested("{{ if 1 }}", "{{ end }}", 60, "{{ " + nested("(", ")", 60, "1") + " }}"),
        nested("{{ if 1 }}", "{{ end }}", 5000),
    ],
    ids=["if", "with", "range", "else-if", "else-with", "block", "define", "parens", "call-args", "chain",
         "parens-inside-ifs", "if-5000"],
)
def test_deep_nesting_is_a_parse_error_naming_the_limit(text: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse(text)
    assert fails_with_limit(caught.value, "MAX_TEMPLATE_DEPTH"), caught.value


def test_nesting_up_to_the_limit_parses_and_runs() -> None:
    assert render(nested("{{ if 1 }}", "{{ end }}", 100), {}) == "x"
    assert render("{{ " + nested("(", ")", 99, "1") + " }}", {}) == "1"


def test_oversized_text_is_a_parse_error_naming_the_limit() -> None:
    assert parse("x" * go.MAX_TEMPLATE_SIZE).execute({}) == "x" * go.MAX_TEMPLATE_SIZE
    with pytest.raises(ParseError) as caught:
        parse("x" * (go.MAX_TEMPLATE_SIZE + 1))
    assert fails_with_limit(caught.value, "MAX_TEMPLATE_SIZE")
    with pytest.raises(ParseError):  # counted in UTF-8 bytes, not characters
        parse("é" * (go.MAX_TEMPLATE_SIZE // 2 + 1))


# ---------------------------------------------------------------------------------------------
# Go templates: execution


def test_a_template_that_calls_itself_stops_at_the_call_depth_limit() -> None:
    with pytest.raises(ExecError, match="exceeded maximum template depth") as caught:
        render('{{define "a"}}{{template "a" .}}{{end}}{{template "a" .}}', {})
    assert fails_with_limit(caught.value, "MAX_TEMPLATE_CALL_DEPTH")


def test_template_calls_count_towards_the_nesting_limit() -> None:
    # Each template nests 40 deep, within the parse limit; called in a chain they nest 200 deep.
    def link(i: int) -> str:
        call_next = '{{ template "t%d" }}' % (i + 1)
        return '{{ define "t%d" }}' % i + nested("{{ if 1 }}", "{{ end }}", 40, call_next) + "{{ end }}"

    chain = "".join(map(link, range(5)))
    with pytest.raises(ExecError) as caught:
        render(chain + '{{ define "t5" }}x{{ end }}{{ template "t0" }}', {})
    assert fails_with_limit(caught.value, "MAX_TEMPLATE_DEPTH")


@pytest.mark.parametrize(
    "text",
    [
        nested("{{ range $.M }}", "{{ end }}", 6, ""),  # 40**6 iterations
        "{{ range 1000000000 }}{{ end }}",
        "{{ range 100000 }}{{ range $.Map }}{{ break }}{{ end }}{{ end }}",  # sorting the keys each time
        "{{ range 100000 }}{{ len $.Long }}{{ end }}",  # len walks the string each time
        "{{ $a := 1 }}" * 2000 + "{{ range 100000 }}{{ if $ }}{{ end }}{{ end }}",  # a long variable stack
        "{{ range 100000 }}{{ $x := $.Loop" + ".A" * 100 + " }}{{ end }}",  # long field chains
        '{{ $x := "ab" }}{{ range 64 }}{{ $x = printf "%s%s" $x $x }}{{ end }}',  # doubling, never printed
        "{{ range 100000 }}{{ $x := $.Tools.String }}{{ end }}",  # JSON built each time
        "{{ range 100000 }}{{ $.M }}{{ end }}",  # a list formatted each time
    ],
    ids=["nested-range", "range-int", "range-copies", "string-walks", "variable-scans", "field-chain", "doubling",
         "method-results", "formatting"],
)
def test_execution_is_bounded_in_steps(text: str) -> None:
    started = time.perf_counter()
    loop: dict[str, Any] = {}
    loop["A"] = loop
    values = {
        "M": list(range(40)), "Map": dict.fromkeys(map(str, range(100_000))), "Long": "é" * 100_000, "Loop": loop,
        "Tools": go.JSONValue(["x" * 1000]),
    }
    with pytest.raises(ExecError) as caught:
        parse(text).execute(values)
    assert fails_with_limit(caught.value, "MAX_TEMPLATE_STEPS")
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "text", ["{{ range 100000 }}{{ $.Big }}{{ end }}", "{{ range 1000000 }}" + "x" * 500 + "{{ end }}"]
)
def test_output_is_bounded(text: str) -> None:
    with pytest.raises(ExecError) as caught:
        parse(text).execute({"Big": "x" * 1000})
    assert fails_with_limit(caught.value, "MAX_TEMPLATE_OUTPUT")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Go's fmt refuses widths and precisions beyond 1e6 (tooLarge), so neither can be huge.
        ('{{ printf "%0999999999d" 1 }}', "%!(NOVERB)%!(EXTRA int=1)"),
        ('{{ printf "%.999999999f" 1.5 }}', "%!(NOVERB)%!(EXTRA float64=1.5)"),
        ('{{ printf "%0*d" 999999999 1 }}', "%!(BADWIDTH)1"),
        ('{{ printf "%.*f" 999999999 1.5 }}', "%!(BADPREC)1.500000"),
        ('{{ printf "%-*d|" -3 1 }}', "1  |"),
        ('{{ printf "%05d" 42 }}', "00042"),
    ],
)
def test_printf_widths_and_precisions_are_bounded_as_in_go(text: str, expected: str) -> None:
    assert render(text, {}) == expected


def test_one_budget_spans_the_executions_of_one_prompt() -> None:
    template = parse("{{ range 60 }}{{ end }}")  # 63 steps
    budget = go.Budget(steps=100)
    template.execute({}, budget)
    with pytest.raises(ExecError) as caught:
        template.execute({}, budget)
    assert "MAX_TEMPLATE_STEPS" in str(caught.value)
    template.execute({})  # without one, each execution has the full budget


def test_deeply_nested_or_cyclic_values_are_an_error() -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    for text in ("{{ .V }}", "{{ json .V }}", '{{ printf "%v" .V }}'):
        for value in (deep, cyclic):
            with pytest.raises(ExecError) as caught:
                render(text, {"V": value})
            assert fails_with_limit(caught.value, "MAX_VALUE_DEPTH")


# ---------------------------------------------------------------------------------------------
# Prompts: the create-time check and request-time errors

LEGACY = "[INST] <<SYS>>{{ .System }}<</SYS>> {{ .Prompt }} [/INST] {{ .Response }}</s>"
TOOLS = """{{- if .Tools }}<tools>{{ .Tools }}</tools>{{ end }}
{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}
{{- range .ToolCalls }}{{ .Function.Name }}{{ .Function.Arguments }}{{ end }}
{{- if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ end }}{{ if .Think }}<think>{{ end }}"""
FIM = "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{ else }}{{ .Prompt }}{{ end }}"


@pytest.mark.parametrize("text", ["{{ .Prompt }}", LEGACY, TOOLS, FIM, "{{ .Messages.Nope }}"])
def test_check_template_accepts_templates_that_render_within_the_limits(text: str) -> None:
    # A template that merely fails on some values is accepted, as Ollama does; chat reports it.
    started = time.perf_counter()
    prompt.check_template(text)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        (nested("{{ if 1 }}", "{{ end }}", 300), "MAX_TEMPLATE_DEPTH"),
        ('{{define "a"}}{{template "a" .}}{{end}}{{template "a" .}}', "MAX_TEMPLATE_CALL_DEPTH"),
        (nested("{{ range $.Messages }}", "{{ end }}", 12, ""), "MAX_TEMPLATE_STEPS"),
        ("{{ if .Tools }}{{ range 100000000 }}{{ end }}{{ end }}{{ range .Messages }}{{ end }}", "MAX_TEMPLATE_STEPS"),
        ("{{ if .Think }}{{ range 100000000 }}{{ end }}{{ end }}{{ .Prompt }}", "MAX_TEMPLATE_STEPS"),
        ("{{ if .Suffix }}{{ range 100000000 }}{{ end }}{{ end }}{{ .Prompt }}", "MAX_TEMPLATE_STEPS"),
        ("{{ range 1000000 }}{{ $.Prompt }}" + "x" * 200 + "{{ end }}", "MAX_TEMPLATE_OUTPUT"),
        ("x" * (256 * 1024 + 1), "MAX_TEMPLATE_SIZE"),
    ],
    ids=["depth", "calls", "steps", "steps-with-tools", "steps-when-thinking", "steps-with-suffix", "output",
         "size"],
)
def test_check_template_refuses_templates_over_a_limit(text: str, limit: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidInput) as caught:
        prompt.check_template(text)
    assert fails_with_limit(caught.value, limit), caught.value
    assert time.perf_counter() - started < 10


def test_check_template_refuses_templates_that_do_not_parse() -> None:
    with pytest.raises(InvalidInput, match="unexpected EOF"):
        prompt.check_template("{{ if .Messages }}")


def test_a_stored_template_over_a_limit_is_a_prompt_error_at_request_time() -> None:
    with pytest.raises(PromptError) as caught:
        render_chat(nested("{{ if 1 }}", "{{ end }}", 300), MESSAGES)
    assert fails_with_limit(caught.value, "MAX_TEMPLATE_DEPTH")
    # Passes the create-time check (3 levels over a few messages) but not over a long chat.
    cubic = nested("{{ range $.Messages }}", "{{ end }}", 4, "") + "{{ range .Messages }}{{ .Content }}{{ end }}"
    prompt.check_template(cubic)
    with pytest.raises(PromptError) as caught:
        render_chat(cubic, [ChatMessage(("user", "assistant")[i % 2], str(i)) for i in range(60)])
    assert fails_with_limit(caught.value, "MAX_TEMPLATE_STEPS")
    with pytest.raises(PromptError):
        render_suffix("{{ range 100000000 }}{{ end }}{{ .Suffix }}", "a", "b")


def test_a_legacy_prompt_shares_one_budget_across_its_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "{{ range 400 }}{{ end }}" + LEGACY
    turns = [ChatMessage("user", "a"), ChatMessage("assistant", "b")] * 3
    render_chat(text, turns[:2])
    monkeypatch.setattr(go, "MAX_TEMPLATE_STEPS", 1000)
    render_chat(text, turns[:2])  # one turn fits
    with pytest.raises(PromptError, match="MAX_TEMPLATE_STEPS"):
        render_chat(text, turns)  # three do not


def test_templates_render_as_before_with_tool_calls_and_thinking() -> None:
    call = ToolCall(id="", name="get_weather", arguments={"city": "Paris"})
    messages = [*MESSAGES[:2], ChatMessage("assistant", "", tool_calls=(call,), thinking="hm"),
                ChatMessage("tool", "22", tool_name="get_weather")]
    rendered = render_chat(TOOLS, messages, tools=[{"type": "function", "function": {"name": "get_weather"}}],
                           think=True)
    assert rendered.text == (
        '<tools>[{"type":"function","function":{"name":"get_weather","parameters":{"type":"","properties":null}}}]'
        "</tools><|system|>Be brief.<|user|>Hi"
        '<|assistant|>get_weather{"city":"Paris"}<think>hm</think><|tool|>22<think>'
    )


# ---------------------------------------------------------------------------------------------
# Jinja templates (the GGUF's chat template)


def jinja_fails(source: str, name: str, messages: list[ChatMessage] = MESSAGES) -> None:
    started = time.perf_counter()
    with pytest.raises(PromptError) as caught:
        jinja_prompt.render(source, messages)
    assert fails_with_limit(caught.value, name), caught.value
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "source",
    [
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "{% for a in messages %}" * 12 + "{% endfor %}" * 12,
        "{% for a in range(100000) %}{% for c in messages[0].content * 1000 %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
        "{% for a in range(100000) %}{{ range(100000)|join|length }}{% endfor %}",
        "{% for a in range(100000) %}{{ [1]|batch(100000, 0)|list|length }}{% endfor %}",
    ],
    ids=["nested-range", "nested-messages", "string-iteration", "binary-recursion", "range-join", "batch"],
)
def test_jinja_work_is_bounded(source: str) -> None:
    jinja_fails(source, "MAX_JINJA_STEPS")


@pytest.mark.parametrize(
    "source",
    [
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{{ 'a' * 10**10 }}",
        "{{ ('a' * 100000) * 100000 }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '{:0999999999}'.format(1) }}",
        "{{ '{:{w}}'.format(1, w=999999999) }}",
        "{{ 'a'|center(999999999) }}",
        "{{ 'a'.ljust(999999999) }}",
        "{{ ('\n' * 100000)|indent(100000) }}",
        "{{ ('a' * 100000)|replace('a', 'a' * 100000) }}",
        "{{ (['a' * 100000] * 100000)|join }}",
        "{{ '%0999999999d'|format(1) }}",
        "{% set many = messages * 1000 %}{% for i in range(1000) %}{% set x = many|tojson %}{% endfor %}",
    ],
    ids=["concat-doubling", "plus-doubling", "multiply", "multiply-twice", "percent-width", "format-width",
         "nested-format-width", "center", "ljust", "indent", "replace", "join", "format-filter", "tojson-loop"],
)
def test_jinja_strings_are_bounded(source: str) -> None:
    jinja_fails(source, "MAX_JINJA_CHARACTERS")


def test_jinja_renders_stop_at_the_clock_for_work_no_count_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jinja_prompt, "MAX_JINJA_SECONDS", 0.5)
    jinja_fails("{% set big = 'a' * 10000000 %}{% for i in range(100000) %}{% if 'zz' in big %}{% endif %}"
                "{% endfor %}", "MAX_JINJA_SECONDS")


def test_jinja_output_is_bounded() -> None:
    jinja_fails("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "MAX_JINJA_OUTPUT")


def test_jinja_source_size_is_bounded() -> None:
    jinja_fails("x" * (jinja_prompt.MAX_JINJA_TEMPLATE_SIZE + 1), "MAX_JINJA_TEMPLATE_SIZE")


@pytest.mark.parametrize(
    "source",
    [
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",  # RecursionError inside jinja
        "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",  # recursion while compiling
        "{% if 1 %}" * 200 + "{% endif %}" * 200,  # "too many statically nested blocks" in Python
        "{{ 2 ** 100000000 }}",
        "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
        "{{ 1 / 0 }}",
        "{{ 'a' + 1 }}",
    ],
    ids=["self-calling-macro", "deep-parentheses", "deep-blocks", "huge-power", "squaring", "zero-division",
         "type-error"],
)
def test_jinja_failures_are_prompt_errors(source: str) -> None:
    started = time.perf_counter()
    with pytest.raises(PromptError, match="^template error: "):
        jinja_prompt.render(source, MESSAGES)
    assert time.perf_counter() - started < 10


QWEN_JINJA = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}You are helpful.{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(count=0) %}
{%- for message in messages %}
    {%- set ns.count = ns.count + 1 %}
    {%- if message.role == "user" or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.function.name }}{{- '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' ~ message.content ~ '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
    {%- if loop.last %}{{ '<!-- %d messages, %s -->' % (ns.count, '{:>5}'.format('x')) }}{{ 'é'|center(5) }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


def test_jinja_templates_render_as_the_plain_sandbox_renders_them() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"})
    messages = [*MESSAGES, ChatMessage("assistant", "", tool_calls=(call,)),
                ChatMessage("tool", "22", tool_call_id="call_1")]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    plain.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    expected = plain.from_string(QWEN_JINJA).render(
        messages=[jinja_prompt._message_value(m) for m in messages], tools=tools, add_generation_prompt=True,
        bos_token="", eos_token="")
    assert jinja_prompt.render(QWEN_JINJA, messages, tools=tools) == expected
    assert "<!-- 6 messages,     x -->  é  <|im_start|>assistant\n" in expected
