"""The options table: JSON typing, text typing, layering and `/api/show`'s parameters text."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.registry import options
from berth.registry.errors import InvalidInput
from berth.registry.options import (
    DEPRECATED_OPTIONS,
    OPTION_SPECS,
    RUNNER_OPTIONS,
    InvalidOption,
    OptionKind,
    OptionValues,
    ParsedOptions,
    default_options,
    format_parameter_value,
    format_parameters,
    merge,
    parse_options,
    parse_parameter,
    runner_options,
)

CURRENT = (
    "num_keep seed num_predict top_k top_p min_p typical_p repeat_last_n temperature repeat_penalty "
    "presence_penalty frequency_penalty stop num_ctx num_batch num_gpu main_gpu use_mmap num_thread "
    "draft_num_predict"
).split()
FLOAT_NAMES = [name for name, spec in OPTION_SPECS.items() if spec.kind is OptionKind.FLOAT]
INT_NAMES = [name for name, spec in OPTION_SPECS.items() if spec.kind is OptionKind.INT]


# --- the table ---------------------------------------------------------------------------------


def test_table_holds_exactly_ollamas_current_options() -> None:
    assert list(OPTION_SPECS) == CURRENT
    assert all(spec.name == name for name, spec in OPTION_SPECS.items())


def test_runner_options_are_the_load_time_ones() -> None:
    load_time = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict"}
    assert RUNNER_OPTIONS == load_time


@pytest.mark.parametrize(
    "name,kind,default",
    [
        ("num_keep", OptionKind.INT, 4),
        ("seed", OptionKind.INT, -1),
        ("num_predict", OptionKind.INT, -1),
        ("top_k", OptionKind.INT, 40),
        ("top_p", OptionKind.FLOAT, 0.9),
        ("min_p", OptionKind.FLOAT, 0.0),
        ("typical_p", OptionKind.FLOAT, 1.0),
        ("repeat_last_n", OptionKind.INT, 64),
        ("temperature", OptionKind.FLOAT, 0.8),
        ("repeat_penalty", OptionKind.FLOAT, 1.0),
        ("stop", OptionKind.STRING_LIST, ()),
        ("num_ctx", OptionKind.INT, None),
        ("num_batch", OptionKind.INT, 512),
        ("num_gpu", OptionKind.INT, -1),
        ("main_gpu", OptionKind.INT, None),
        ("use_mmap", OptionKind.BOOL, None),
        ("num_thread", OptionKind.INT, 0),
        ("draft_num_predict", OptionKind.INT, 4),
    ],
)
def test_kinds_and_defaults(name: str, kind: OptionKind, default: object) -> None:
    assert OPTION_SPECS[name].kind is kind
    assert OPTION_SPECS[name].default == default


def test_retired_options_are_known_and_not_current() -> None:
    ollama_deprecated = {
        "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
        "mirostat", "mirostat_tau", "mirostat_eta",
    }  # fmt: skip
    assert ollama_deprecated <= DEPRECATED_OPTIONS
    assert {"tfs_z", "numa", "num_gqa", "rope_frequency_base", "rope_frequency_scale"} <= DEPRECATED_OPTIONS
    assert not DEPRECATED_OPTIONS & set(OPTION_SPECS)


def test_table_cannot_be_changed() -> None:
    with pytest.raises(TypeError):
        OPTION_SPECS["temperature"] = OPTION_SPECS["top_p"]  # type: ignore[index]


def test_default_options_leave_out_load_time_decisions() -> None:
    defaults = default_options()
    assert defaults["temperature"] == 0.8 and defaults["stop"] == ()
    assert not {"num_ctx", "main_gpu", "use_mmap"} & set(defaults)


# --- JSON options ------------------------------------------------------------------------------

JSON_VALID = [
    ({"top_k": 40}, {"top_k": 40}),
    ({"top_k": 40.9}, {"top_k": 40}),  # truncated, like Go's int64(float64)
    ({"seed": -3.7}, {"seed": -3}),  # toward zero
    ({"temperature": 1}, {"temperature": 1.0}),
    ({"temperature": 0.1234567891234}, {"temperature": 0.12345679}),  # float32 precision
    ({"use_mmap": False}, {"use_mmap": False}),
    ({"stop": ["a", "b"]}, {"stop": ("a", "b")}),
    ({"stop": "</s>"}, {"stop": ("</s>",)}),
    ({"stop": []}, {"stop": ()}),
    ({"num_ctx": None, "top_p": 0.5}, {"top_p": 0.5}),
    ({}, {}),
]


@pytest.mark.parametrize("raw,expected", JSON_VALID)
def test_json_values_are_typed(raw: dict[str, object], expected: dict[str, object]) -> None:
    parsed = parse_options(raw)
    assert parsed.values == expected
    for name, value in parsed.values.items():
        assert type(value) is type(expected[name])
    assert parsed.ignored == ()


def test_none_means_no_options() -> None:
    assert parse_options(None) == ParsedOptions()


def test_unknown_and_retired_keys_are_ignored_not_rejected() -> None:
    parsed = parse_options({"mirostat": 2, "temperature": 0.5, "bogus": "x", "tfs_z": None})
    assert parsed.values == {"temperature": 0.5}
    assert parsed.ignored == ("mirostat", "bogus", "tfs_z")
    assert parsed.deprecated == ("mirostat", "tfs_z")


JSON_INVALID = [
    ({"top_k": "40"}, 'option "top_k" must be of type integer'),
    ({"top_k": True}, 'option "top_k" must be of type integer'),
    ({"top_k": float("nan")}, 'option "top_k" must be of type integer'),
    ({"seed": 2**64}, 'option "seed" must be of type integer'),
    ({"temperature": "hot"}, 'option "temperature" must be of type float32'),
    ({"temperature": False}, 'option "temperature" must be of type float32'),
    ({"temperature": 1e39}, 'option "temperature" must be of type float32'),
    ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
    ({"use_mmap": "true"}, 'option "use_mmap" must be of type boolean'),
    ({"stop": 5}, 'option "stop" must be of type array'),
    ({"stop": {"a": 1}}, 'option "stop" must be of type array'),
    ({"stop": ["a", 1]}, 'option "stop" must be of an array of strings'),
]


@pytest.mark.parametrize("raw,message", JSON_INVALID)
def test_json_type_errors_use_ollamas_text(raw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOption) as info:
        parse_options(raw)
    assert info.value.message.startswith(message)
    assert info.value.option == next(iter(raw))
    assert isinstance(info.value, InvalidInput)


def test_options_must_be_an_object() -> None:
    with pytest.raises(InvalidInput, match="JSON object"):
        parse_options(["temperature"])  # type: ignore[arg-type]


def test_parsed_values_are_a_read_only_dict() -> None:
    values = parse_options({"temperature": 0.5, "stop": ["x"]}).values
    assert isinstance(values, dict)
    for mutate in (
        lambda: values.__setitem__("temperature", 1.0),
        lambda: values.__delitem__("temperature"),
        lambda: values.update(top_k=1),
        lambda: values.pop("temperature"),
        values.clear,
        values.popitem,
        lambda: values.setdefault("top_k", 1),
        lambda: values.__ior__({"top_k": 1}),
    ):
        with pytest.raises(TypeError):
            mutate()
    assert values == {"temperature": 0.5, "stop": ("x",)}
    assert json.loads(json.dumps(values)) == {"temperature": 0.5, "stop": ["x"]}
    assert pickle.loads(pickle.dumps(values)) == values
    assert copy.deepcopy(values) == values and copy.copy(values) is values


# --- layering ----------------------------------------------------------------------------------


def test_merge_layers_later_wins_and_none_never_hides() -> None:
    model = {"temperature": 0.2, "stop": ("<|eot_id|>",), "num_ctx": 8192}
    request = {"temperature": 0.9, "num_ctx": None, "stop": ("END",)}
    merged = merge(default_options(), model, request)
    assert merged["temperature"] == 0.9
    assert merged["num_ctx"] == 8192
    assert merged["stop"] == ("END",)  # a request's stop list replaces the model's
    assert merged["top_k"] == 40
    assert isinstance(merged, OptionValues)


def test_merge_of_two_layers() -> None:
    assert merge({"top_k": 1, "seed": 3}, {"top_k": 2}) == {"top_k": 2, "seed": 3}


def test_runner_options_pick_the_load_time_subset() -> None:
    values = {"num_ctx": 4096, "temperature": 0.1, "use_mmap": False}
    assert runner_options(values) == {"num_ctx": 4096, "use_mmap": False}


# --- text parameters ---------------------------------------------------------------------------

TEXT_VALID = [
    ("num_ctx", "4096", 4096),
    ("seed", "-1", -1),
    ("seed", "+5", 5),
    ("seed", "-0", 0),
    ("seed", "9223372036854775807", 2**63 - 1),
    ("temperature", "1", 1.0),
    ("temperature", "0.7", 0.7),
    ("temperature", ".5", 0.5),
    ("temperature", "5.", 5.0),
    ("temperature", "1e-3", 0.001),
    ("temperature", "1E+2", 100.0),
    ("temperature", "-0.25", -0.25),
    ("temperature", "0x1p-2", 0.25),
    ("temperature", "1e-50", 0.0),  # underflows to zero without error, as in Go
    ("top_p", "0.1234567891234", 0.12345679),
    ("stop", "<|im_end|>", ("<|im_end|>",)),
    ("stop", "", ("",)),
    ("use_mmap", "false", False),
] + [("use_mmap", text, True) for text in ("1", "t", "T", "TRUE", "true", "True")] + [
    ("use_mmap", text, False) for text in ("0", "f", "F", "FALSE", "false", "False")
]


@pytest.mark.parametrize("name,text,expected", TEXT_VALID)
def test_text_values_are_typed(name: str, text: str, expected: object) -> None:
    value = parse_parameter(name, text)
    assert value == expected
    assert type(value) is type(expected)


TEXT_INVALID = [
    ("num_ctx", "1.0", "invalid int value [1.0]"),
    ("num_ctx", "1_000", "invalid int value [1_000]"),
    ("num_ctx", " 1", "invalid int value [ 1]"),
    ("num_ctx", "", "invalid int value []"),
    ("num_ctx", "٣", "invalid int value [٣]"),  # Python's int() takes any Unicode digit; Go does not
    ("seed", "9223372036854775808", "invalid int value [9223372036854775808]"),
    ("num_gpu", "all", "invalid int value [all]"),
    ("temperature", "warm", "invalid float value [warm]"),
    ("temperature", "inf", "invalid float value [inf]"),
    ("temperature", "NaN", "invalid float value [NaN]"),
    ("temperature", "1e39", "invalid float value [1e39]"),
    ("temperature", "1_0.5", "invalid float value [1_0.5]"),
    ("temperature", "0x1", "invalid float value [0x1]"),
    ("temperature", "1 ", "invalid float value [1 ]"),
    ("temperature", "", "invalid float value []"),
    ("use_mmap", "yes", "invalid bool value [yes]"),
    ("use_mmap", "tRUE", "invalid bool value [tRUE]"),
    ("use_mmap", "", "invalid bool value []"),
    ("Temperature", "1", "unknown parameter 'Temperature'"),
    ("bogus", "1", "unknown parameter 'bogus'"),
    ("mirostat", "1", "parameter 'mirostat' is deprecated"),
]


@pytest.mark.parametrize("name,text,message", TEXT_INVALID)
def test_text_errors_use_ollamas_text(name: str, text: str, message: str) -> None:
    with pytest.raises(InvalidOption) as info:
        parse_parameter(name, text)
    assert info.value.message.startswith(message)
    assert info.value.option == name


@given(st.data(), st.sampled_from(FLOAT_NAMES))
def test_float_text_round_trips(data: st.DataObject, name: str) -> None:
    spec = OPTION_SPECS[name]
    number = data.draw(st.floats(width=32, min_value=spec.low, max_value=spec.high, allow_nan=False,
                                 allow_infinity=False))
    value = parse_parameter(name, repr(number))
    assert parse_parameter(name, format_parameter_value(value)) == value
    # The stored form is a fixed point: typing it again changes nothing.
    assert parse_options({name: value}).values[name] == value


@given(st.data(), st.sampled_from(INT_NAMES))
def test_int_text_round_trips(data: st.DataObject, name: str) -> None:
    spec = OPTION_SPECS[name]
    low, high = -(2**63) if spec.low is None else spec.low, 2**63 - 1 if spec.high is None else spec.high
    number = data.draw(st.integers(int(low), int(high)))
    assert parse_parameter(name, format_parameter_value(number)) == number


def test_parameter_value_text() -> None:
    assert format_parameter_value(1048576) == "1048576"  # not Go's 1.048576e+06, which would not read back
    assert format_parameter_value(True) == "true"
    assert format_parameter_value(0.7) == "0.7"
    assert format_parameter_value(1e6) == "1e+06"
    assert format_parameter_value("</s>") == "</s>"


# --- /api/show parameters ----------------------------------------------------------------------


def test_show_parameters_text() -> None:
    text = format_parameters(
        {"temperature": 0.7, "stop": ("<|start_header_id|>", "<|eot_id|>"), "num_ctx": 4096, "use_mmap": False}
    )
    assert text == "\n".join(
        [
            'num_ctx                        4096',
            'stop                           "<|start_header_id|>"',
            'stop                           "<|eot_id|>"',
            'temperature                    0.7',
            'use_mmap                       false',
        ]
    )


def test_show_parameters_pads_keys_to_30_columns() -> None:
    line = format_parameters({"stop": ["<|eot_id|>"]})
    assert line == "stop" + " " * 27 + '"<|eot_id|>"'
    assert line.index('"') == 31
    long_key = "k" * 35
    assert format_parameters({long_key: 1}) == long_key + " 1"


@pytest.mark.parametrize(
    "value,shown",
    [
        (0, "0"),
        (-0.0, "-0"),
        (1.0, "1"),
        (0.7, "0.7"),
        (123456, "123456"),
        (1048576, "1.048576e+06"),  # Ollama prints the float64 it decoded from the params blob
        (1e6, "1e+06"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (-2.5, "-2.5"),
        (1e21, "1e+21"),
        (True, "true"),
        ("a\"b\\c", r'"a\"b\\c"'),
        ("tab\tnew\nline\r", r'"tab\tnew\nline\r"'),
        ("\x00\x1b\x7f", r'"\x00\x1b\x7f"'),
        ("\u00a0\u200b", r'"\u00a0\u200b"'),
        ("héllo 👋", '"héllo 👋"'),
    ],
)
def test_show_parameters_prints_values_as_go_does(value: object, shown: str) -> None:
    assert format_parameters({"x": value}) == f"{'x':<30} {shown}"


def test_show_parameters_skips_none_and_empty_lists() -> None:
    assert format_parameters({"num_ctx": None, "stop": []}) == ""


@pytest.mark.parametrize("name,value", [
    ("num_ctx", -1), ("num_ctx", 1 << 30), ("num_batch", 0), ("num_predict", -3), ("top_k", -1),
    ("top_k", 2**40), ("num_keep", -5), ("repeat_last_n", -2), ("num_thread", 100_000), ("main_gpu", -1),
    ("num_gpu", -7), ("top_p", 1.5), ("min_p", -0.1), ("typical_p", 2.0),
])
def test_values_llama_cpp_cannot_take_are_refused_by_name(name: str, value: int | float) -> None:
    with pytest.raises(options.InvalidOption, match=f'option "{name}" is') as error:
        options.parse_options({name: value})
    assert error.value.field == f"options.{name}"
    with pytest.raises(options.InvalidOption, match=f'option "{name}" is'):
        options.parse_parameter(name, str(value))


@pytest.mark.parametrize("name,value", [
    ("num_ctx", 0), ("num_predict", -2), ("num_predict", -1), ("top_k", 0), ("num_keep", -1), ("num_gpu", -1),
    ("repeat_last_n", -1), ("seed", -(2**63)), ("seed", 2**63 - 1), ("temperature", -1.0), ("top_p", 1.0),
])
def test_edge_values_within_range_are_kept(name: str, value: int | float) -> None:
    assert options.parse_options({name: value}).values[name] == value


def test_stop_strings_are_bounded() -> None:
    assert options.parse_options({"stop": ["a"] * options.MAX_STOPS}).values["stop"] == ("a",) * options.MAX_STOPS
    with pytest.raises(options.InvalidOption, match="at most"):
        options.parse_options({"stop": ["a"] * (options.MAX_STOPS + 1)})
    with pytest.raises(options.InvalidOption, match="at most"):
        options.parse_options({"stop": ["a" * (options.MAX_STOP_LENGTH + 1)]})
