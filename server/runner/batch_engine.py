"""Continuous batching for one loaded model over llama.cpp's low-level API.

`Llama.generate` runs one request at a time. This engine owns one llama.cpp context with
`slots` sequences and, on every `step()`, puts the next token of every generating sequence plus
a share of the pending prompt tokens into ONE `llama_decode`, so N users cost close to one
user's decode time instead of N times it.

- Each slot is a llama.cpp sequence id with its own sampler chain. The slots share one unified
  KV buffer of `n_ctx_per_slot * slots` cells, and no sequence may grow past `n_ctx_per_slot`, so
  every slot gets the full num_ctx. A burst of prompts of different lengths is then prefilled in
  one pass (separate KV streams make llama.cpp split it into one pass per distinct length: ~40%
  slower to the first tokens of 8 prompts here), and decode steps are ~10% faster.
- Like llama-server's, the default engine is not batch-invariant: flash attention's tiles,
  repacked weights' row groups and cells placed among the neighbours' make a sequence's numbers
  round differently in another batch, so the same seeded request can answer differently alone and
  among others. `batch_invariant=True` (Berth's BERTH_DETERMINISTIC) trades ~15% of the throughput
  for output that does not depend on the others: no flash attention, no repacking, one KV stream
  per slot, each prompt evaluated in its own `llama_decode` calls in fixed `n_batch` chunks from
  its start, and no reuse of cached prefixes (a reused prefix changes how the prompt is cut).
- Prompts are evaluated in chunks: decode tokens go first, prefills share what is left of
  `n_batch`, so a long prompt never stalls the others' next token by more than one chunk.
- New requests join between steps; a cancelled or failed sequence has its KV range removed at
  once. A finished one keeps its tokens so that a request which extends them (a chat that goes
  on) only evaluates the new suffix, and a request that starts like any sequence held (a system
  prompt many users share) takes that sequence's cells for the common part.

- A request with images first goes through the vision encoder on a thread of its own (a real
  projector takes seconds on a CPU, which every sequence would otherwise wait out), then joins the
  line; its text and image embeddings go into its sequence in one go when it reaches a slot.

Threading: `submit` and `cancel` may be called from any thread; `step` / `run_forever` and every
callback run on the one thread that owns the context (llama.cpp contexts are not thread-safe). The
encoder thread only runs the projector's `encode` and hands the request back to that thread.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from berth.server.runner.generation import logprob_entry, shifted, split_at_stop
from berth.server.runner.placement import physical_cores
from berth.server.runner.protocol import InputError, SamplingOptions

log = logging.getLogger("berth.batch_engine")

# A prompt takes another sequence's cells for a common prefix at least this long (shorter ones,
# such as a lone BOS, save nothing worth it).
SHARE_MIN_TOKENS = 4

# A piece of text, and the logprob entries of the tokens it completes (empty unless asked for).
PieceCallback = Callable[[str, list[dict[str, Any]]], None]
DoneCallback = Callable[[dict[str, Any]], None]
ErrorCallback = Callable[[Exception], None]


class EngineError(RuntimeError):
    """llama.cpp failed while decoding a batch (the sequences in it are ended with this error)."""


@dataclass
class _Job:
    job_id: int
    prompt: list[int]
    options: SamplingOptions
    grammar: str | None
    on_piece: PieceCallback
    on_done: DoneCallback
    on_error: ErrorCallback
    shift: bool = True  # at a full context, drop older tokens (keeping num_keep) and go on
    # With images: the rendered prompt (its `[img-N]` tags name them), evaluated through the projector.
    text: str = ""
    images: tuple[bytes, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives per token
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    # Set by the encoder thread: the images through the vision encoder, or why that failed.
    encoded: Any = None
    error: Exception | None = None

    def release_images(self) -> None:
        """Free what the encoder made for this request, if anything (libmtmd memory)."""
        if self.encoded is not None:
            self.encoded.close()
            self.encoded = None


@dataclass
class _Slot:
    """One sequence id and the request running on it (if any)."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V this sequence holds, in order
    job: _Job | None = None
    sampler: Any = None
    to_prefill: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    next_token: int | None = None  # sampled, to be decoded in the next step
    batch_index: int = -1  # where this slot's logits are in the current batch, -1 = none
    generated: list[int] = field(default_factory=list)
    decoder: Any = None
    pending_text: str = ""  # decoded text held back because it may start a stop string
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # entries of tokens not sent yet
    prompt_eval_count: int = 0
    started_ns: int = 0
    first_token_ns: int = 0
    # KV cells held beyond `cached`'s positions: an image on an M-RoPE model (Qwen2-VL and
    # later) fills one cell per embedding but advances the position by less.
    extra_cells: int = 0


class BatchEngine:
    """Continuous batching over one llama.cpp context; see the module docstring."""

    def __init__(self, model_path: str, n_ctx_per_slot: int, slots: int, n_batch: int = 512,
                 n_threads: int = 0, n_gpu_layers: int = 0, use_mmap: bool = True,
                 flash_attn: bool = True, batch_invariant: bool = False, model: Any = None,
                 projector: Any = None) -> None:
        """`model`: an already loaded `llama_model *` to add a context to (the runner's, so the
        weights are in memory once); it stays its owner's. Otherwise `model_path` is loaded.
        `projector`: a vision.Projector on that model, for requests with images.
        `batch_invariant`: a sequence's output does not depend on the others (see the module
        docstring); a given `model` must then have been loaded without repacked weights."""
        import llama_cpp

        if slots < 1:
            raise ValueError("slots must be at least 1")
        if n_batch < slots:
            raise ValueError(f"n_batch ({n_batch}) must hold one token per slot ({slots})")
        self._llama = llama_cpp
        self._projector = projector
        llama_cpp.llama_backend_init()
        self._owns_model = model is None
        if model is None:
            params = model_params(llama_cpp, n_gpu_layers, use_mmap, batch_invariant)
            model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
            if not model:
                raise ValueError(f"failed to load model from {model_path}")
        self._model = model
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx_per_slot * slots
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = slots
        ctx_params.kv_unified = not batch_invariant
        # The runner passes the thread count its `Llama` uses, so both paths run alike.
        threads = n_threads if n_threads > 0 else physical_cores()
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.no_perf = False
        # The unbatched runner passes the same flag to `Llama`, so both paths give equal output.
        # Flash attention's CPU kernel tiles query rows by the batch's shape: not batch-invariant.
        ctx_params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn and not batch_invariant
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            if self._owns_model:
                llama_cpp.llama_model_free(self._model)
            raise ValueError("failed to create the llama.cpp context (not enough memory for the KV cache?)")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._n_swa = int(llama_cpp.llama_model_n_swa(self._model))
        # A recurrent state (Mamba, RWKV; hybrids such as Jamba or Granite 4 hold one beside their
        # KV cells) is one per sequence and has no ranges: copying "the first n positions" of a
        # donor copies its whole state, so sequences share no prefixes there.
        self._shares_cells = not (llama_cpp.llama_model_is_recurrent(self._model)
                                  or llama_cpp.llama_model_is_hybrid(self._model))
        # Unified, llama.cpp lets one sequence have every cell; the engine holds each to its share.
        self.n_ctx_per_slot = min(n_ctx_per_slot, int(llama_cpp.llama_n_ctx_seq(self._ctx)))
        self.n_batch = n_batch
        self.batch_invariant = batch_invariant
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._slots = [_Slot(seq_id=i) for i in range(slots)]
        self._piece_buffer = ctypes.create_string_buffer(64)
        self._candidates: Any = None  # token data for sampling with a grammar, made on first use
        self._candidate_view: Any = None
        self._token_ids: Any = None
        # Shared with submitting threads: guarded by _lock; _wake tells the owner thread.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Job] = deque()
        self._cancelled: set[int] = set()
        self._closed = False
        # Requests with images go through the vision encoder on a thread of its own first (seconds
        # for a real projector on a CPU, during which every other sequence would wait), then join
        # `_waiting` from the owner thread. Guarded by _lock too.
        self._encoder_wake = threading.Condition(self._lock)
        self._to_encode: deque[_Job] = deque()
        self._encoded: deque[_Job] = deque()
        self._encoding: set[int] = set()  # ids of jobs queued for or in the encoder
        self._cancel_on_arrival: set[int] = set()
        self._encoder: threading.Thread | None = None
        if projector is not None:
            self._encoder = threading.Thread(target=self._encode_loop, daemon=True, name="engine-encoder")
            self._encoder.start()

    # -- any thread -----------------------------------------------------------------------------

    def submit(self, job_id: int, prompt_tokens: Sequence[int], options: Mapping[str, Any],
               grammar_text: str | None, on_piece: PieceCallback, on_done: DoneCallback,
               on_error: ErrorCallback, shift: bool = True, text: str = "",
               images: Sequence[bytes] = (), top_logprobs: int | None = None) -> None:
        """Queue a generation. Callbacks run on the engine thread: `on_piece(text, logprobs)` zero
        or more times, then exactly one of `on_done(stats)` or `on_error(exc)` (InputError = bad
        request). With `images`, `text` (the rendered prompt) is what is evaluated, through the
        projector. With `top_logprobs` (0-20), each generated token's logprob entry comes with the
        piece that completes its text."""
        job = _Job(job_id, list(prompt_tokens), SamplingOptions.from_options(options), grammar_text,
                   on_piece, on_done, on_error, shift, text, tuple(images), top_logprobs)
        with self._wake:
            if job.images and self._encoder is not None:
                self._to_encode.append(job)
                self._encoding.add(job_id)
                self._encoder_wake.notify()
            else:
                self._waiting.append(job)
                self._wake.notify()

    def cancel(self, job_id: int) -> None:
        """Stop a request, waiting or running; it ends with on_done(done_reason="cancel")."""
        with self._wake:
            self._cancelled.add(job_id)
            self._wake.notify()

    def stop(self) -> None:
        """Ask `run_forever` (and the encoder thread) to return after the current step."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            self._encoder_wake.notify()

    def _encode_loop(self) -> None:
        """The encoder thread: each image request's images through the vision encoder, in order."""
        assert self._projector is not None
        while True:
            with self._encoder_wake:
                while not self._to_encode and not self._closed:
                    self._encoder_wake.wait()
                if self._closed:
                    return
                job = self._to_encode.popleft()
                cancelled = job.job_id in self._cancel_on_arrival
            if not cancelled:
                try:
                    job.encoded = self._projector.encode(job.text, job.images, self.n_ctx_per_slot)
                except Exception as exc:  # noqa: BLE001 - reported to the request by the owner thread
                    job.error = exc
            with self._wake:
                self._encoded.append(job)
                self._wake.notify()

    # -- owner thread ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        with self._lock:
            waiting = bool(self._waiting or self._encoding)
        return waiting or any(slot.job is not None for slot in self._slots)

    def active_jobs(self) -> int:
        return sum(slot.job is not None for slot in self._slots)

    def run_forever(self, idle_wait: float = 0.5, after_step: Callable[[], None] = lambda: None) -> None:
        """Step until `stop()`; sleeps on a condition while there is nothing to do. `after_step`
        runs after every step (the runner sends the step's messages together from there)."""
        while True:
            with self._wake:
                if self._closed:
                    return
                if not self._waiting and not self._cancelled and not self._encoded and self.active_jobs() == 0:
                    self._wake.wait(idle_wait)
                    continue
            try:
                self.step()
            finally:
                after_step()

    def step(self) -> bool:
        """Admit, cancel, run one decode for every active sequence, sample. False when idle."""
        self._take_encoded()
        self._apply_cancels()
        self._admit()
        if not self.batch_invariant:
            return self._decode(self._slots, prefill_room=self.n_batch)
        # Decode tokens together (one row each, however many there are), each prompt chunk alone.
        ran = self._decode(self._slots, prefill_room=0)
        for slot in self._slots:
            if slot.job is not None and slot.to_prefill:
                ran = self._decode([slot], prefill_room=self.n_batch) or ran
        return ran

    def _decode(self, slots: Sequence[_Slot], prefill_room: int) -> bool:
        """One `llama_decode` of the slots' next tokens and up to `prefill_room` prompt tokens,
        then sampling where a sequence's logits came out. False when there was nothing to decode."""
        batched = self._fill_batch(slots, prefill_room)
        if not batched:
            return False
        status = self._llama.llama_decode(self._ctx, self._batch)
        if status != 0:
            # 1 = no KV room (cannot happen with cells sized to the prompt check), 2 = aborted,
            # negative = error. Either way the sequences in this batch are lost; the others are not.
            self._fail_batch(EngineError(f"llama_decode failed with status {status}"), batched)
            return True
        for slot in slots:
            if slot.job is not None and slot.batch_index >= 0:
                self._sample(slot)
        return True

    def forget_prefixes(self) -> None:
        """Drop the cached tokens of idle slots (owner thread), e.g. to give every request the
        same starting point: a reused prefix changes how the prompt is batched, hence rounding."""
        for slot in self._slots:
            if slot.job is None:
                self._drop_kv(slot)

    def close(self) -> None:
        """Free llama.cpp objects; the engine cannot be used afterwards."""
        if self._encoder is not None:
            self.stop()
            self._encoder.join()  # it may be using the projector, which its owner frees after this
            with self._lock:
                for job in (*self._waiting, *self._encoded):
                    job.release_images()
        llama_cpp = self._llama
        for slot in self._slots:
            self._free_sampler(slot)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model and self._owns_model:
            llama_cpp.llama_model_free(self._model)
        self._model = None

    # -- scheduling -----------------------------------------------------------------------------

    def _take_encoded(self) -> None:
        """Requests back from the encoder: ready ones go first in line (they have waited longest),
        failed ones get their error, cancelled ones end."""
        with self._lock:
            if not self._encoded:
                return
            arrived, self._encoded = list(self._encoded), deque()
            self._encoding.difference_update(job.job_id for job in arrived)
            dropped = {job.job_id for job in arrived} & self._cancel_on_arrival
            self._cancel_on_arrival -= dropped
            self._waiting.extendleft(reversed([job for job in arrived
                                               if job.job_id not in dropped and job.error is None]))
        for job in arrived:
            if job.job_id in dropped:
                job.release_images()
                _notify(job.on_done, _never_started(job))
            elif job.error is not None:
                _notify(job.on_error, job.error)

    def _apply_cancels(self) -> None:
        with self._lock:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
            still_waiting = deque(job for job in self._waiting if job.job_id not in cancelled)
            dropped = [job for job in self._waiting if job.job_id in cancelled]
            self._waiting = still_waiting
            # Ended when the encoder hands them back (it skips those it has not started).
            self._cancel_on_arrival.update(cancelled & self._encoding)
        for job in dropped:
            job.release_images()
            _notify(job.on_done, _never_started(job))
        for slot in self._slots:
            if slot.job is not None and slot.job.job_id in cancelled:
                self._finish(slot, "cancel")

    def _admit(self) -> None:
        while True:
            free = [slot for slot in self._slots if slot.job is None]
            if not free:
                return
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            try:
                self._start(job, free)
            except Exception as exc:  # noqa: BLE001 - a bad request must not stop the others
                job.release_images()  # refused before its images went in
                _notify(job.on_error, exc)

    def _start(self, job: _Job, free: list[_Slot]) -> None:
        if not job.prompt:
            raise InputError("the prompt is empty")
        if len(job.prompt) >= self.n_ctx_per_slot:
            raise InputError(
                f"the prompt is {len(job.prompt)} tokens, which does not fit the context of "
                f"{self.n_ctx_per_slot}; raise num_ctx or shorten the prompt")
        if job.images and self._projector is None:
            raise InputError("this model has no vision projector, so it cannot read images")
        sampler = self._build_sampler(job.options, job.grammar)
        if job.images:
            self._start_with_images(job, free[0], sampler)
            return
        # How much of the prompt each sequence holds; the free slot that holds the most takes it,
        # so a continuing chat lands where its history already is.
        held = {s.seq_id: _common_prefix(s.cached, job.prompt) for s in self._slots}
        slot = max(free, key=lambda s: held[s.seq_id])
        reuse = self._reusable_prefix(slot, job.prompt, held)
        self._assign(slot, job, sampler, cached=job.prompt[:reuse], to_prefill=job.prompt[reuse:])

    def _start_with_images(self, job: _Job, slot: _Slot, sampler: Any) -> None:
        """Text and image embeddings (encoded already, on the encoder thread) go in through
        libmtmd, in one go and outside the shared batch; the first token is sampled at once and the
        sequence then joins the batched decoding like any other."""
        assert job.encoded is not None, "an image request reaches a slot only through the encoder"
        self._drop_kv(slot)
        cells = job.encoded.cells
        try:
            positions = self._projector.evaluate(self._ctx, job.encoded, slot.seq_id, self.n_batch)
        except BaseException:
            self._llama.llama_sampler_free(sampler)
            self._drop_kv(slot)
            raise
        finally:
            job.release_images()
        # Placeholders, one per position: no later prompt's tokens match them, so nothing reuses a
        # prefix that runs into an image.
        self._assign(slot, job, sampler, cached=[-1] * positions, to_prefill=[], evaluated=positions,
                     extra_cells=max(0, cells - positions))
        try:
            self._sample(slot)  # the projector's evaluation left the logits of the last position (index -1)
        except Exception as exc:  # noqa: BLE001 - the slot is this request's now: free it with the error
            self._fail(slot, exc)

    @staticmethod
    def _assign(slot: _Slot, job: _Job, sampler: Any, cached: list[int], to_prefill: list[int],
                evaluated: int | None = None, extra_cells: int = 0) -> None:
        """Put `job` on `slot`: its KV holds `cached`, `to_prefill` is still to be decoded; the
        prompt evaluation counts `evaluated` positions (default: the tokens still to prefill)."""
        slot.job = job
        slot.sampler = sampler
        slot.cached = cached
        slot.to_prefill = to_prefill
        slot.prompt_eval_count = len(to_prefill) if evaluated is None else evaluated
        slot.next_token = None
        slot.batch_index = -1
        slot.generated = []
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.pending_text = ""
        slot.logprobs = []
        slot.started_ns = time.perf_counter_ns()
        slot.first_token_ns = slot.started_ns
        slot.extra_cells = extra_cells

    def _reusable_prefix(self, slot: _Slot, prompt: list[int], held: Mapping[int, int]) -> int:
        """How many leading prompt tokens `slot`'s sequence holds for `prompt` (the rest of its KV
        is dropped); `held`: each sequence's common prefix with `prompt`, by seq_id. Its own cached
        tokens, unless another sequence holds a longer prefix (a system prompt or chat template many
        users share): then that one's cells join `slot`'s sequence, shared without copying in the
        unified buffer; a shared cell is freed when no sequence holds it (a context shift drops and
        re-evaluates a sequence's cells, never moves them). None in the batch-invariant
        configuration, which evaluates every prompt from its start."""
        llama_cpp = self._llama
        # At least the last prompt token is always evaluated: its logits give the first token.
        limit = 0 if self.batch_invariant else len(prompt) - 1
        reuse = min(held[slot.seq_id], limit)
        donor = max(self._slots, key=lambda s: held[s.seq_id])
        shared = min(held[donor.seq_id], limit)
        if (shared > reuse and shared >= SHARE_MIN_TOKENS and self._shares_cells
                and self._window_holds(donor, shared)):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, 0, shared)
            return shared
        if reuse > 0 and not self._window_holds(slot, reuse):
            reuse = 0
        if reuse > 0 and not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, reuse, -1):
            reuse = 0  # e.g. recurrent models cannot drop a tail: evaluate the whole prompt
        if reuse == 0:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        return reuse

    def _window_holds(self, slot: _Slot, prefix: int) -> bool:
        """Whether `slot`'s sequence still has what a token after its first `prefix` must see: a
        sliding-window cache has already dropped positions older than the window."""
        return self._n_swa <= 0 or \
            self._llama.llama_memory_seq_pos_min(self._memory, slot.seq_id) <= max(0, prefix - self._n_swa)

    def _build_sampler(self, options: SamplingOptions, grammar: str | None) -> Any:
        """The same chain `Llama._init_sampler` builds, so a seed gives the same text batched or not:
        penalties -> grammar -> greedy (temperature 0) or top_k -> typical -> top_p -> min_p -> temp -> dist."""
        llama_cpp = self._llama
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        last_n = self.n_ctx_per_slot if options.repeat_last_n < 0 else options.repeat_last_n
        add(chain, llama_cpp.llama_sampler_init_penalties(self._n_vocab, last_n, options.repeat_penalty,
                                                          options.frequency_penalty, options.presence_penalty))
        if grammar:
            grammar_sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not grammar_sampler:  # llama.cpp returns NULL for a grammar it cannot parse
                llama_cpp.llama_sampler_free(chain)
                raise InputError("invalid format: the grammar could not be parsed")
            add(chain, grammar_sampler)
        if options.temperature == 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            seed = options.sampler_seed()
            add(chain, llama_cpp.llama_sampler_init_top_k(options.top_k))
            add(chain, llama_cpp.llama_sampler_init_typical(options.typical_p, 1))
            add(chain, llama_cpp.llama_sampler_init_top_p(options.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(options.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(options.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _fill_batch(self, slots: Sequence[_Slot], prefill_room: int) -> list[_Slot]:
        """Next tokens of generating slots first, then prompt chunks in the room that is left of
        `prefill_room`; the slots that have tokens in the batch."""
        batch = self._batch
        count = 0
        batched: list[_Slot] = []

        def put(slot: _Slot, token: int, wants_logits: bool) -> None:
            nonlocal count
            batch.token[count] = token
            batch.pos[count] = len(slot.cached)
            batch.n_seq_id[count] = 1
            batch.seq_id[count][0] = slot.seq_id
            batch.logits[count] = wants_logits
            if wants_logits:
                slot.batch_index = count
            if not batched or batched[-1] is not slot:
                batched.append(slot)
            slot.cached.append(token)
            count += 1

        for slot in slots:
            slot.batch_index = -1
            if slot.job is not None and slot.next_token is not None:
                put(slot, slot.next_token, True)
                slot.next_token = None
        # Oldest request first, so a burst of prompts is served in arrival order.
        prefilling = sorted((s for s in slots if s.job is not None and s.to_prefill),
                            key=lambda s: s.started_ns)
        for slot in prefilling:
            room = min(prefill_room, self.n_batch - count)
            if room <= 0:
                break
            chunk, slot.to_prefill = slot.to_prefill[:room], slot.to_prefill[room:]
            for index, token in enumerate(chunk):
                put(slot, token, not slot.to_prefill and index == len(chunk) - 1)
        batch.n_tokens = count
        return batched

    def _sample(self, slot: _Slot) -> None:
        llama_cpp = self._llama
        job = slot.job
        assert job is not None
        options = job.options
        if job.grammar:
            token = self._sample_constrained(slot)
            if token is None:
                self._fail(slot, InputError(
                    "the output can no longer match the requested format: its grammar allows no next token"))
                return
        else:
            token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, slot.batch_index)
        if not slot.generated:
            slot.first_token_ns = time.perf_counter_ns()
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        slot.generated.append(token)
        if job.top_logprobs is not None:  # from this step's logits, before the next step replaces them
            slot.logprobs.append(logprob_entry(llama_cpp.llama_get_logits_ith(self._ctx, slot.batch_index),
                                               self._n_vocab, token, job.top_logprobs,
                                               lambda t: self._piece(t, special=True)))
        slot.pending_text += slot.decoder.decode(self._piece(token))
        emit, slot.pending_text, hit = split_at_stop(slot.pending_text, list(options.stop))
        if emit:
            self._send_piece(slot, emit)
        if hit:
            slot.pending_text = ""
            slot.logprobs.clear()  # the stop string's tokens are not part of the answer
            self._finish(slot, "stop")
        elif 0 <= options.num_predict <= len(slot.generated):
            self._finish(slot, "length")
        elif len(slot.cached) + slot.extra_cells + 1 >= self.n_ctx_per_slot:
            # The next token would not fit this slot's context. (A window with images cannot be
            # evaluated again from tokens, so such a sequence stops instead of shifting.)
            if job.shift and not job.images:
                self._shift(slot, token)
            else:
                self._finish(slot, "length")
        else:
            slot.next_token = token

    def _shift(self, slot: _Slot, token: int) -> None:
        """Context shift: keep BOS and num_keep tokens, drop the older half of the rest, and go on
        from the shorter window, which is evaluated again like a prompt (its last token is `token`)."""
        assert slot.job is not None
        window = shifted(slot.cached + [token], slot.job.options.num_keep, bos=True)
        self._drop_kv(slot)
        slot.to_prefill = window
        slot.next_token = None

    def _sample_constrained(self, slot: _Slot) -> int | None:
        """`llama_sampler_sample` in steps, for a chain with a grammar: when the grammar rejects
        every token, llama.cpp would pick one anyway and then throw from `accept`, a C++ exception
        that ends the whole runner; here that sequence alone ends with an error instead."""
        import numpy as np

        llama_cpp = self._llama
        if self._candidates is None:
            self._candidates = (llama_cpp.llama_token_data * self._n_vocab)()
            fields = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            self._candidate_view = np.frombuffer(self._candidates, dtype=fields)
            self._token_ids = np.arange(self._n_vocab, dtype=np.int32)
        view = self._candidate_view
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, slot.batch_index),
                                       shape=(self._n_vocab,))
        view["id"] = self._token_ids  # samplers reorder the array in place
        view["logit"] = logits
        view["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._candidates, llama_cpp.llama_token_data_p), size=self._n_vocab, selected=-1,
            sorted=False)
        llama_cpp.llama_sampler_apply(slot.sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            return None
        chosen = array.data[array.selected]
        if not math.isfinite(chosen.logit):
            return None  # every candidate was ruled out
        llama_cpp.llama_sampler_accept(slot.sampler, chosen.id)
        return int(chosen.id)

    def _fail(self, slot: _Slot, error: Exception) -> None:
        """End one sequence with an error; the others go on."""
        job = slot.job
        assert job is not None
        self._drop_kv(slot)
        self._release(slot)
        _notify(job.on_error, error)

    def _piece(self, token: int, special: bool = False) -> bytes:
        """The token's bytes, as `Llama.detokenize([token])` gives them (special tokens hidden
        unless `special`)."""
        size = self._llama.llama_token_to_piece(self._vocab, token, self._piece_buffer,
                                                len(self._piece_buffer), 0, special)
        if size < 0:  # the buffer is too small: llama.cpp says how much it needs
            self._piece_buffer = ctypes.create_string_buffer(-size)
            size = self._llama.llama_token_to_piece(self._vocab, token, self._piece_buffer,
                                                    len(self._piece_buffer), 0, special)
        return self._piece_buffer.raw[:size]

    @staticmethod
    def _send_piece(slot: _Slot, text: str) -> None:
        assert slot.job is not None
        entries, slot.logprobs = slot.logprobs, []
        _notify(slot.job.on_piece, text, entries)

    def _finish(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        finished = time.perf_counter_ns()
        tail = slot.pending_text + slot.decoder.decode(b"", final=True)
        if (tail or slot.logprobs) and reason != "cancel":
            self._send_piece(slot, tail)
        if reason == "cancel":
            self._drop_kv(slot)
        # A finished sequence keeps its KV for prefix reuse: with one stream per slot those
        # cells belong to this slot anyway, so keeping them takes no room from anyone.
        self._release(slot)
        _notify(job.on_done, _stats(reason, job.prompt, slot.prompt_eval_count, slot.started_ns,
                                    slot.first_token_ns, finished, slot.generated))

    def _fail_batch(self, error: Exception, slots: Sequence[_Slot]) -> None:
        # After a failed decode the KV content of its sequences is unknown: end them all.
        for slot in slots:
            if slot.job is not None:
                self._fail(slot, error)

    def _drop_kv(self, slot: _Slot) -> None:
        self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cached = []

    def _release(self, slot: _Slot) -> None:
        self._free_sampler(slot)
        slot.job = None
        slot.to_prefill = []
        slot.next_token = None
        slot.batch_index = -1

    def _free_sampler(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            self._llama.llama_sampler_free(slot.sampler)
            slot.sampler = None


def model_params(llama_cpp: Any, n_gpu_layers: int, use_mmap: bool, batch_invariant: bool) -> Any:
    """llama.cpp's model parameters for a model the engine loads itself, set as llama-cpp-python's
    `Llama` sets them, so both load a model alike."""
    params = llama_cpp.llama_model_default_params()
    # llama.cpp reads INT32_MAX as "all layers"; -1 is Berth's spelling of that.
    params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
    # Explicit, as `Llama` makes it: llama.cpp's default (AUTO) may read the file into buffers
    # instead, depending on the devices found.
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
    # Repacked CPU weights are faster, but their kernels treat a row differently depending on
    # where it falls in the batch (4-row groups), so output can change with the batch.
    params.use_extra_bufts = not batch_invariant
    return params


def _notify(callback: Callable[..., None], *values: Any) -> None:
    """Run a request's callback; one that raises (say, a closed pipe) must not stop the others."""
    try:
        callback(*values)
    except Exception:  # noqa: BLE001
        log.exception("a batch engine callback failed")


def _never_started(job: _Job) -> dict[str, Any]:
    """The final stats of a request cancelled before it reached a slot."""
    return _stats("cancel", job.prompt, prompt_eval_count=0, started=job.submitted_ns, first=job.submitted_ns,
                  finished=job.submitted_ns, generated=[])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _stats(reason: str, prompt: list[int], prompt_eval_count: int, started: int, first: int, finished: int,
           generated: list[int]) -> dict[str, Any]:
    """The final message body, in the shape `_Runner.generate` sends (without id and type)."""
    return {
        "done_reason": reason,
        "prompt_eval_count": max(prompt_eval_count, 1) if prompt else 0,
        "prompt_tokens": len(prompt),
        "prompt_eval_duration": first - started,
        "eval_count": len(generated),
        "eval_duration": finished - first,
        "tokens": prompt + generated,
    }
