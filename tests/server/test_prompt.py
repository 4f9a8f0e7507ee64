"""Tests for server/prompt.py: message lists, Ollama's chat templating, image tags, suffix mode
and truncation. Expected prompts are written out by hand from the spec's rules (§2.2, §6)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.registry.errors import InvalidInput
from berth.server.prompt import (
    ChatMessage,
    PromptError,
    PromptModel,
    RenderedPrompt,
    chat_messages,
    fit_messages,
    fit_messages_async,
    generate_messages,
    render_chat,
    render_suffix,
)
from berth.server.tools import ToolCall

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""

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

LLAMA2 = "[INST] <<SYS>>{{ .System }}<</SYS>> {{ .Prompt }} [/INST] {{ .Response }}</s>"

QWEN_TOOLS = """{{- if or .System .Tools }}<|im_start|>system
{{ .System }}
{{- if .Tools }}
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>
{{- end }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}{{ else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}<|im_end|>
{{ else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"unit": {"type": "string"}, "city": {"type": "string", "description": "City"}},
        },
    },
}


def user(content: str, *images: bytes) -> ChatMessage:
    return ChatMessage(role="user", content=content, images=images)


def assistant(content: str, *tool_calls: ToolCall) -> ChatMessage:
    return ChatMessage(role="assistant", content=content, tool_calls=tool_calls)


def system(content: str) -> ChatMessage:
    return ChatMessage(role="system", content=content)


# ---------------------------------------------------------------------------------------------
# Building the message list


def test_model_system_is_prepended_when_the_request_does_not_start_with_system() -> None:
    model = PromptModel(template=CHATML, system="Model says.", messages=(user("Old"), assistant("Reply")))
    assert chat_messages(model, [user("Hi")]) == [system("Model says."), user("Old"), assistant("Reply"), user("Hi")]


def test_request_system_first_replaces_the_model_system() -> None:
    model = PromptModel(template=CHATML, system="Model says.", messages=(user("Old"),))
    assert chat_messages(model, [system("Mine."), user("Hi")]) == [user("Old"), system("Mine."), user("Hi")]


def test_system_in_history_does_not_stop_the_model_system() -> None:
    # Ollama only looks at the first request message; both system texts reach the template.
    model = PromptModel(template=CHATML, system="Model says.", messages=(system("History says."), user("Old")))
    messages = chat_messages(model, [user("Hi")])
    assert messages == [system("Model says."), system("History says."), user("Old"), user("Hi")]
    assert render_chat(CHATML, messages).text == (
        "<|im_start|>system\nModel says.\n\nHistory says.<|im_end|>\n"
        "<|im_start|>user\nOld\n\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_model_system_adds_nothing() -> None:
    assert chat_messages(PromptModel(system=""), [user("Hi")]) == [user("Hi")]
    assert chat_messages(PromptModel(), [user("Hi")]) == [user("Hi")]


def test_generate_messages() -> None:
    model = PromptModel(system="Model says.", messages=(user("Old"), assistant("Reply")))
    assert generate_messages(model, "Go", images=[b"png"]) == [
        system("Model says."), user("Old"), assistant("Reply"), user("Go", b"png"),
    ]
    assert generate_messages(model, "Go", system="Mine.", use_history=False) == [system("Mine."), user("Go")]
    assert generate_messages(PromptModel(), "Go") == [user("Go")]


# ---------------------------------------------------------------------------------------------
# Messages mode (§6.2)

CONVERSATION = [system("Be brief."), user("Hi"), assistant("Hello!"), user("How are you?")]


def test_chatml_multi_turn() -> None:
    assert render_chat(CHATML, CONVERSATION) == RenderedPrompt(
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_gemma_multi_turn_with_system_rendered_as_a_user_turn() -> None:
    assert render_chat(GEMMA, CONVERSATION).text == (
        "<start_of_turn>user\nBe brief.<end_of_turn>\n"
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_ending_with_assistant_leaves_its_turn_open() -> None:
    assert render_chat(GEMMA, [user("Hi"), assistant("Hel")]).text == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHel"
    )


def test_consecutive_messages_of_one_role_are_collated_but_tool_results_are_not() -> None:
    template = "{{ .System }}|{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}"
    messages = [
        system("A"), system("B"), user("1"), user("2"), ChatMessage(role="tool", content="t1"),
        ChatMessage(role="tool", content="t2"), assistant("x"), assistant("y"), system("C"),
    ]
    assert render_chat(template, messages).text == (
        "A\n\nB\n\nC|[system:A\n\nB][user:1\n\n2][tool:t1][tool:t2][assistant:x\n\ny][system:C]"
    )


def test_message_fields_and_tool_calls_reach_the_template() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments={"unit": "c", "city": "Paris"}, index=0)
    messages = [
        user("Weather?"),
        ChatMessage(role="assistant", content="", tool_calls=(call,), thinking="hmm"),
        ChatMessage(role="tool", content="22", tool_name="get_weather", tool_call_id="call_1"),
    ]
    template = (
        "{{ range .Messages }}{{ .Role }}:{{ .Thinking }}:{{ range .ToolCalls }}{{ .ID }} {{ .Function.Index }} "
        "{{ .Function.Name }} {{ .Function.Arguments }}{{ end }}:{{ .ToolName }}:{{ .ToolCallID }};{{ end }}"
    )
    assert render_chat(template, messages).text == (
        "user::::;assistant:hmm:call_1 0 get_weather {\"city\":\"Paris\",\"unit\":\"c\"}::;tool:::get_weather:call_1;"
    )


def test_tools_render_as_ollama_json() -> None:
    call = ToolCall(id="", name="get_weather", arguments={"city": "Paris"}, index=0)
    messages = [system("Be brief."), user("Weather?"), assistant("", call), ChatMessage(role="tool", content="22")]
    assert render_chat(QWEN_TOOLS, messages, tools=[WEATHER_TOOL]).text == (
        "<|im_start|>system\nBe brief.\n<tools>\n"
        '{"type": "function", "function": {"name":"get_weather","description":"Get the weather",'
        '"parameters":{"type":"object","required":["city"],"properties":{'
        '"city":{"type":"string","description":"City"},"unit":{"type":"string"}}}}}\n'
        "</tools><|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("think", "expected"),
    [
        (None, "false||false"),
        (True, "true|medium|true"),
        (False, "false||true"),
        ("high", "true|high|true"),
    ],
)
def test_think_values(think: bool | str | None, expected: str) -> None:
    template = "{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}{{ range .Messages }}{{ end }}"
    assert render_chat(template, [user("Hi")], think=think).text == expected
    legacy = "{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}{{ .Response }}"
    assert render_chat(legacy, [user("Hi")], think=think).text == expected
    assert render_suffix("{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}{{ .Suffix }}", "p", "s", think=think) == (
        expected + "s"
    )


def test_prompt_and_suffix_are_not_set_in_messages_mode() -> None:
    assert render_chat("{{ .Prompt }}{{ range .Messages }}{{ .Content }}{{ end }}", [user("Hi")]).text == (
        "<no value>Hi"
    )


# ---------------------------------------------------------------------------------------------
# Legacy mode (§6.4)


def test_llama2_legacy_multi_turn() -> None:
    assert render_chat(LLAMA2, CONVERSATION).text == (
        "[INST] <<SYS>>Be brief.<</SYS>> Hi [/INST] Hello!</s>"
        "[INST] <<SYS>><</SYS>> How are you? [/INST] "
    )


def test_llama2_legacy_prefills_a_final_assistant_message() -> None:
    assert render_chat(LLAMA2, CONVERSATION[:3]).text == "[INST] <<SYS>>Be brief.<</SYS>> Hi [/INST] Hello!"


def test_legacy_system_after_a_turn_starts_a_new_render_and_tools_are_ignored() -> None:
    messages = [
        user("Hi"), assistant("Hello!"), system("New rules."), ChatMessage(role="tool", content="ignored"),
        user("Again"),
    ]
    assert render_chat(LLAMA2, messages).text == (
        "[INST] <<SYS>><</SYS>> Hi [/INST] Hello!</s>"
        "[INST] <<SYS>>New rules.<</SYS>> Again [/INST] "
    )


def test_legacy_user_without_reply_is_overwritten_by_the_next_collated_user() -> None:
    # Consecutive user messages are collated first, so both texts reach one Prompt slot.
    assert render_chat(LLAMA2, [user("a"), user("b")]).text == "[INST] <<SYS>><</SYS>> a\n\nb [/INST] "


def test_default_template_gets_response_appended() -> None:
    assert render_chat("{{ .Prompt }}", [user("Hi")]).text == "Hi"
    assert render_chat("{{ .Prompt }}", [user("Hi"), assistant("Hel")]).text == "HiHel"
    assert render_chat("{{ .Prompt }}", [user("Hi"), assistant("Hello"), user("Bye")]).text == "HiHelloBye"
    # A template mentioning Response (any case) is left alone.
    assert render_chat("{{ .Prompt }}{{ if .response }}{{ end }}", [user("Hi"), assistant("x")]).text == "Hi"


# ---------------------------------------------------------------------------------------------
# Images (§6.5)


def test_image_tags_are_prefixed_or_replace_placeholders_in_order() -> None:
    messages = [user("Look", b"a"), assistant("Nice"), user("Compare [img] with [img]", b"b", b"c", b"d")]
    rendered = render_chat(CHATML, messages)
    assert rendered.images == (b"a", b"b", b"c", b"d")
    assert rendered.text == (
        "<|im_start|>user\n[img-0]Look<|im_end|>\n"
        "<|im_start|>assistant\nNice<|im_end|>\n"
        "<|im_start|>user\n[img-3]Compare [img-1] with [img-2]<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_image_tags_in_legacy_mode() -> None:
    rendered = render_chat(LLAMA2, generate_messages(PromptModel(), "What is this?", images=[b"x", b"y"]))
    assert rendered == RenderedPrompt("[INST] <<SYS>><</SYS>> [img-0][img-1]What is this? [/INST] ", (b"x", b"y"))


# ---------------------------------------------------------------------------------------------
# Suffix mode (§6.3)

FIM = "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{ else }}{{ .Prompt }}{{ end }}"


def test_suffix_mode() -> None:
    assert render_suffix(FIM, "def add(a, b):", "    return c") == "<PRE> def add(a, b): <SUF>    return c <MID>"


def test_suffix_mode_needs_both_prompt_and_suffix() -> None:
    # Without a suffix Ollama renders the conversation path, here with no messages at all.
    assert render_suffix(FIM, "def add(a, b):", "") == ""


# ---------------------------------------------------------------------------------------------
# Errors


def test_template_errors_are_invalid_input() -> None:
    with pytest.raises(PromptError, match=r"^template error: template: :1: unexpected EOF") as parse_error:
        render_chat("{{ if .Messages }}", [user("Hi")])
    assert isinstance(parse_error.value, InvalidInput)
    with pytest.raises(PromptError, match=r"^template error: template: :1:\d+: executing .*can't evaluate field Nope"):
        render_chat("{{ range .Messages }}{{ .Nope }}{{ end }}", [user("Hi")])
    with pytest.raises(PromptError):
        render_suffix("{{ .Prompt.X.Y }}", "a", "b")


def test_bad_tools_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="tools"):
        render_chat(QWEN_TOOLS, [user("Hi")], tools=["not a tool"])


# ---------------------------------------------------------------------------------------------
# Truncation (§6.6)


def word_count(text: str) -> int:
    return len(text.split())


class CountingTokenizer:
    """Counts words, and remembers how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str) -> int:
        self.calls += 1
        return word_count(text)


LONG_CHAT = [
    system("You are terse."),
    user("one two three four five"),
    assistant("six seven eight nine ten"),
    user("eleven twelve thirteen"),
    assistant("fourteen fifteen"),
    user("last question here"),
]


def rendered_words(messages: list[ChatMessage]) -> int:
    return word_count(render_chat(CHATML, messages).text)


def test_everything_fits_with_one_count() -> None:
    counter = CountingTokenizer()
    assert fit_messages(CHATML, LONG_CHAT, num_ctx=1000, count_tokens=counter) == LONG_CHAT
    assert counter.calls == 1


def test_oldest_messages_drop_while_system_and_last_stay() -> None:
    budget = rendered_words([LONG_CHAT[0], *LONG_CHAT[3:]])
    assert budget < rendered_words(LONG_CHAT[:1] + LONG_CHAT[2:])
    kept = fit_messages(CHATML, LONG_CHAT, num_ctx=budget, count_tokens=word_count)
    assert kept == [LONG_CHAT[0], *LONG_CHAT[3:]]
    assert render_chat(CHATML, kept).text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\neleven")


def test_last_message_is_kept_even_when_it_alone_is_too_long() -> None:
    assert fit_messages(CHATML, LONG_CHAT, num_ctx=1, count_tokens=word_count) == [LONG_CHAT[0], LONG_CHAT[-1]]
    assert fit_messages(CHATML, [user("far too long for it")], num_ctx=1, count_tokens=word_count) == [
        user("far too long for it")
    ]
    assert fit_messages(CHATML, [], num_ctx=1, count_tokens=word_count) == []


def test_system_messages_among_dropped_ones_are_carried_forward() -> None:
    messages = [user("a b c d e f"), system("Later rule."), user("g h i j"), assistant("k"), user("l")]
    budget = rendered_words([messages[1], *messages[3:]])
    assert fit_messages(CHATML, messages, num_ctx=budget, count_tokens=word_count) == [messages[1], *messages[3:]]


def test_images_cost_image_tokens_each() -> None:
    messages = [user("old words here"), assistant("ok"), user("what is it", b"img")]
    text_only = rendered_words(messages)
    assert fit_messages(CHATML, messages, num_ctx=text_only, count_tokens=word_count, image_tokens=0) == messages
    kept = fit_messages(CHATML, messages, num_ctx=text_only + 100, count_tokens=word_count, image_tokens=768)
    assert kept == [messages[-1]]
    assert fit_messages(CHATML, messages, num_ctx=text_only + 10, count_tokens=word_count, image_tokens=10) == messages


def test_tools_count_towards_the_budget() -> None:
    messages = [user("a"), assistant("b"), user("c")]
    plain = fit_messages(QWEN_TOOLS, messages, num_ctx=rendered_words(messages) + 5, count_tokens=word_count)
    assert plain == messages
    with_tools = fit_messages(
        QWEN_TOOLS, messages, num_ctx=rendered_words(messages) + 5, count_tokens=word_count, tools=[WEATHER_TOOL],
    )
    assert with_tools == [messages[-1]]


def linear_fit(messages: list[ChatMessage], num_ctx: int) -> list[ChatMessage]:
    """The spec's definition, literally: the first start whose candidate fits."""
    for start in range(len(messages)):
        candidate = [m for m in messages[:start] if m.role == "system"] + messages[start:]
        if start == len(messages) - 1 or word_count(render_chat(CHATML, candidate).text) <= num_ctx:
            return candidate
    return []


words = st.text(alphabet="abc ", min_size=1, max_size=12)
chat_message = st.builds(ChatMessage, role=st.sampled_from(["system", "user", "assistant", "tool"]), content=words)


@given(messages=st.lists(chat_message, max_size=12), num_ctx=st.integers(0, 120))
def test_bisection_finds_the_same_start_as_the_linear_scan(messages: list[ChatMessage], num_ctx: int) -> None:
    assert fit_messages(CHATML, messages, num_ctx=num_ctx, count_tokens=word_count) == linear_fit(messages, num_ctx)


@given(messages=st.lists(chat_message, max_size=8), num_ctx=st.integers(0, 80))
def test_async_fit_matches_sync_fit(messages: list[ChatMessage], num_ctx: int) -> None:
    async def count(text: str) -> int:
        await asyncio.sleep(0)
        return word_count(text)

    expected = fit_messages(GEMMA, messages, num_ctx=num_ctx, count_tokens=word_count)
    assert asyncio.run(fit_messages_async(GEMMA, messages, num_ctx=num_ctx, count_tokens=count)) == expected


@given(messages=st.lists(chat_message, max_size=10), num_ctx=st.integers(0, 80))
def test_the_chosen_start_fits_unless_only_the_last_message_is_left(messages: list[ChatMessage], num_ctx: int) -> None:
    # Holds for legacy templates too, where dropping a turn can lengthen the prompt.
    kept = fit_messages(LLAMA2, messages, num_ctx=num_ctx, count_tokens=word_count)
    if messages:
        assert kept[-1] is messages[-1]
        fits = word_count(render_chat(LLAMA2, kept).text) <= num_ctx
        assert fits or kept == [m for m in messages[:-1] if m.role == "system"] + messages[-1:]
