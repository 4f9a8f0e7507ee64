"""The runner process: owns one loaded model and answers the API process over a pipe
(messages in berth.server.runner.protocol).

Inside the runner one thread owns the `Llama` objects (they are not thread-safe); a reader
thread only receives messages, so a cancel can arrive while a generation runs.
"""

from __future__ import annotations

import codecs
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from berth.server.runner.generation import logprob_entry, shifted, split_at_stop
from berth.server.runner.placement import (
    available_memory,
    gpu_layers,
    kv_slots_that_fit,
    offloaded_share,
    physical_cores,
    repacked_weights,
)
from berth.server.runner.protocol import AUTO_SLOTS, InputError, LoadSpec, SamplingOptions, take_logprobs


@dataclass
class _Stats:
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    tokens: list[int] = field(default_factory=list)


class _Runner:
    def __init__(self, conn: Connection, spec: LoadSpec) -> None:
        import llama_cpp

        self.conn = conn
        self.spec = spec
        self.llama_cpp = llama_cpp
        self.supports_gpu = bool(llama_cpp.llama_supports_gpu_offload())
        self.n_gpu_layers = gpu_layers(spec, self.supports_gpu)
        threads = spec.num_thread if spec.num_thread > 0 else physical_cores()
        self.threads = threads
        self.flash_attn = spec.flash_attn and not spec.deterministic
        with repacked_weights(llama_cpp, not spec.deterministic):
            self.llm = llama_cpp.Llama(
                model_path=spec.model_path,
                n_ctx=spec.num_ctx,
                n_batch=spec.num_batch,
                n_gpu_layers=self.n_gpu_layers,
                main_gpu=spec.main_gpu,
                use_mmap=spec.use_mmap if spec.use_mmap is not None else True,
                n_threads=threads,
                n_threads_batch=threads,
                lora_path=spec.adapter_paths[0] if spec.adapter_paths else None,
                flash_attn=self.flash_attn,
                verbose=False,
            )
        self.embedder: Any = None
        self.cancelled: set[int] = set()
        # Ids received and not yet answered: a cancel for any other id (it crossed the request's
        # end on the pipe) is dropped, not kept for ever.
        self.live: set[int] = set()
        self.cancel_lock = threading.Lock()
        # The batch engine's thread sends too, and a Connection is not thread-safe.
        self.send_lock = threading.Lock()
        # What the engine's callbacks say during one step, sent as one message after it: one pipe
        # write and one wake-up of the server per step, not one per sequence.
        self.outbox: list[dict[str, Any]] = []
        self.jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.engine: Any = None
        self.projector: Any = None
        self.on_gpu = self.supports_gpu and self.n_gpu_layers != 0
        if spec.projector_path:
            from berth.server.runner.vision import Projector

            self.projector = Projector(spec.projector_path, self.llm.model, use_gpu=self.on_gpu,
                                       n_threads=threads)
        # Adapters are applied by llama-cpp-python's own path only. Images go through the batch
        # engine, so a model with a projector always has one (a single slot when batching is off).
        wanted = self._wanted_slots()
        if not spec.adapter_paths and (wanted > 1 or self.projector is not None):
            self.engine = self._start_engine(max(wanted, 1))

    def _wanted_slots(self) -> int:
        """BERTH_NUM_PARALLEL's count, or by hardware: 4 on a GPU, 2 on the CPU capped by the memory
        their KV caches need; 0 or 1 when batching is off."""
        spec = self.spec
        if spec.batch_slots != AUTO_SLOTS:
            return spec.batch_slots
        if self.on_gpu:
            return 4  # a context that does not fit is halved in _start_engine
        return min(2, kv_slots_that_fit(self.llm.metadata, spec.num_ctx, available_memory()))

    def _start_engine(self, slots: int) -> Any:
        """The batch engine with `slots` slots, halved while llama.cpp cannot make room for their KV
        caches. With a projector it is needed down to one slot (images go through it); without,
        fewer than two is no batching: None, and generations go one at a time."""
        from berth.server.runner.batch_engine import BatchEngine

        spec = self.spec
        minimum = 1 if self.projector is not None else 2
        while True:
            try:
                # A second context on the same weights: the model is in memory (and on the GPU) once.
                return BatchEngine(spec.model_path, n_ctx_per_slot=spec.num_ctx, slots=slots, n_batch=spec.num_batch,
                                   n_threads=self.threads, flash_attn=self.flash_attn, model=self.llm.model,
                                   projector=self.projector, batch_invariant=spec.deterministic)
            except ValueError:
                if slots <= minimum:
                    if self.projector is not None:
                        raise  # images cannot be read without it: the load fails with the reason
                    return None
                slots = max(minimum, slots // 2)

    @property
    def slots(self) -> int:
        return len(self.engine._slots) if self.engine is not None else 1  # noqa: SLF001

    # -- messaging ------------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        with self.send_lock:
            self.conn.send(message)

    def flush_outbox(self) -> None:
        """Send what the engine's last step produced (engine thread)."""
        if self.outbox:
            messages, self.outbox = self.outbox, []
            self.send(messages[0] if len(messages) == 1 else {"type": "many", "messages": messages})

    def read_loop(self) -> None:
        """Reader thread: route cancels at once, queue everything else for the owner thread."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.jobs.put(None)  # the parent is gone: stop
                return
            if message.get("op") == "cancel":
                with self.cancel_lock:
                    if message["id"] in self.live:
                        self.cancelled.add(message["id"])
                        if self.engine is not None:
                            self.engine.cancel(message["id"])
            elif message.get("op") == "shutdown":
                self.jobs.put(None)
                return
            elif message.get("op") in ("tokenize", "detokenize"):
                # Answered here at once, not behind a generation on the owner thread (one at a time
                # without batching): the server counts a chat's tokens before the request takes a
                # place in its bounded queue, so waiting here would let a burst pile up unbounded.
                # llama.cpp's vocabulary is read-only once loaded (its server tokenizes on its HTTP
                # threads too).
                self.run_job(message)
            else:
                with self.cancel_lock:
                    self.live.add(message.get("id", -1))
                self.jobs.put(message)

    def is_cancelled(self, job_id: int) -> bool:
        with self.cancel_lock:
            return job_id in self.cancelled

    def forget(self, job_id: int) -> None:
        with self.cancel_lock:
            self.cancelled.discard(job_id)
            self.live.discard(job_id)

    def serve(self) -> None:
        threading.Thread(target=self.read_loop, name="runner-reader", daemon=True).start()
        if self.engine is not None:
            threading.Thread(target=self.engine.run_forever, kwargs={"after_step": self.flush_outbox},
                             name="batch-engine", daemon=True).start()
        # Embeddings run on a thread (and context) of their own, one request at a time: a long
        # embedding batch, or loading that context, must not keep new generations from the engine.
        embeds: queue.Queue[dict[str, Any] | None] = queue.Queue()
        embedder = threading.Thread(target=self._serve_embeds, args=(embeds,), name="runner-embed", daemon=True)
        embedder.start()
        while (message := self.jobs.get()) is not None:
            if message.get("op") == "generate" and self.engine is not None:
                self.submit_batched(message)
            elif message.get("op") == "embed":
                embeds.put(message)
            else:
                self.run_job(message)
        embeds.put(None)
        if self.engine is not None:
            self.engine.stop()
        embedder.join()

    def _serve_embeds(self, embeds: "queue.Queue[dict[str, Any] | None]") -> None:
        while (message := embeds.get()) is not None:
            self.run_job(message)

    def run_job(self, message: dict[str, Any]) -> None:
        """One request handled on the calling thread, answered with its result or its error."""
        job_id = message.get("id", -1)
        try:
            op = message.get("op")
            if op == "generate":
                self.generate(message)
            elif op == "embed":
                self.embed(message)
            elif op == "tokenize":
                tokens = self.llm.tokenize(message["text"].encode(errors="replace"),
                                           add_bos=message.get("add_bos", True), special=True)
                self.send({"id": job_id, "type": "result", "tokens": list(tokens)})
            elif op == "detokenize":
                text = self.llm.detokenize(self.known_tokens(message["tokens"])).decode("utf-8", errors="replace")
                self.send({"id": job_id, "type": "result", "text": text})
            else:
                self.send({"id": job_id, "type": "error", "message": f"unknown runner operation {op!r}"})
        except InputError as exc:
            self.send({"id": job_id, "type": "error", "kind": "input", "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the runner
            self.send({"id": job_id, "type": "error", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            self.forget(job_id)

    def submit_batched(self, message: dict[str, Any]) -> None:
        """Hand a generation to the batch engine, which streams it back from its own thread."""
        job_id: int = message["id"]
        try:
            if message.get("tokens") is not None:
                tokens = self.known_tokens(message["tokens"])
            else:
                tokens = list(self.llm.tokenize(message["prompt"].encode(errors="replace"),
                                                add_bos=message.get("add_bos", True), special=True))
            grammar = self.grammar_for(message.get("format"))
        except InputError as exc:
            self.send({"id": job_id, "type": "error", "kind": "input", "message": str(exc)})
            self.forget(job_id)
            return

        # These run on the engine thread, during a step: their messages wait in the outbox.
        def on_piece(text: str, logprobs: list[dict[str, Any]]) -> None:
            self.outbox.append({"id": job_id, "type": "token", "text": text, **take_logprobs(logprobs)})

        def on_done(stats: dict[str, Any]) -> None:
            self.forget(job_id)
            self.outbox.append({"id": job_id, "type": "done", **stats})

        def on_error(exc: Exception) -> None:
            self.forget(job_id)
            kind = {"kind": "input"} if isinstance(exc, InputError) else {}
            self.outbox.append({"id": job_id, "type": "error", **kind, "message": str(exc)})

        # Under cancel_lock a cancel either came first (seen here) or finds the job in the engine.
        with self.cancel_lock:
            self.engine.submit(job_id, tokens, message.get("options", {}),
                               grammar._grammar if grammar is not None else None, on_piece, on_done, on_error,
                               shift=message.get("shift", True) is not False, text=message.get("prompt", ""),
                               images=message.get("images") or (), top_logprobs=message.get("logprobs"))
            if job_id in self.cancelled:
                self.engine.cancel(job_id)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, message: dict[str, Any]) -> None:
        llama_cpp = self.llama_cpp
        llm = self.llm
        job_id: int = message["id"]
        opts: dict[str, Any] = message.get("options", {})
        if message.get("images"):
            raise InputError("images cannot be read by this runner (a model with an adapter layer reads text only)")
        if message.get("tokens") is not None:
            tokens = self.known_tokens(message["tokens"])
        else:
            tokens = list(llm.tokenize(message["prompt"].encode(errors="replace"),
                                       add_bos=message.get("add_bos", True), special=True))
        n_ctx = llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise InputError(
                f"the prompt is {len(tokens)} tokens, which does not fit the context of {n_ctx}; "
                "raise num_ctx or shorten the prompt"
            )
        grammar = self.grammar_for(message.get("format"))
        sampling = SamplingOptions.from_options(opts)
        llm.set_seed(sampling.sampler_seed())
        num_predict = sampling.num_predict
        stops = list(sampling.stop)
        repeat_last_n = sampling.repeat_last_n
        llm.last_n_tokens_size = n_ctx if repeat_last_n < 0 else repeat_last_n  # type: ignore[attr-defined]

        eog = llm._model.token_eos()  # noqa: SLF001
        vocab = llm._model.vocab if hasattr(llm._model, "vocab") else None  # noqa: SLF001
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""  # decoded text held back because it may be the start of a stop string
        top_n: int | None = message.get("logprobs")  # None: no logprobs; else alternatives per token
        logprobs: list[dict[str, Any]] = []  # of tokens whose text has not been sent yet
        # A shift restarts `Llama.generate`, which would restart a grammar from its first rule too: a
        # constrained answer stops at a full context instead (the batch engine keeps the grammar going).
        shift = message.get("shift", True) is not False and grammar is None
        stats = _Stats()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        started = time.perf_counter_ns()
        first_token_at = started
        reason = "stop"
        window = list(tokens)  # what the context holds: the prompt, then generated tokens, less any shifts
        generating = True
        while generating:
            generating = False
            generator = llm.generate(
                window,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                min_p=sampling.min_p,
                typical_p=sampling.typical_p,
                temp=sampling.temperature,
                repeat_penalty=sampling.repeat_penalty,
                frequency_penalty=sampling.frequency_penalty,
                presence_penalty=sampling.presence_penalty,
                grammar=grammar,
                reset=True,
            )
            try:
                for token in generator:
                    if stats.eval_count == 0:
                        first_token_at = time.perf_counter_ns()
                    if self.is_cancelled(job_id):
                        reason = "cancel"
                        break
                    if token == eog or (vocab is not None and llama_cpp.llama_vocab_is_eog(vocab, token)):
                        break
                    if top_n is not None:
                        logprobs.append(self.token_logprobs(token, top_n))  # before the next eval replaces the logits
                    stats.eval_count += 1
                    stats.tokens.append(token)
                    window.append(token)
                    piece = llm.detokenize([token], prev_tokens=tokens + stats.tokens[:-1])
                    pending += decoder.decode(piece)
                    emit, pending, hit = split_at_stop(pending, stops)
                    if emit:
                        self.send({"id": job_id, "type": "token", "text": emit, **take_logprobs(logprobs)})
                    if hit:
                        pending = ""
                        logprobs.clear()  # the stop string's tokens are not part of the answer
                        break
                    if 0 <= num_predict <= stats.eval_count:
                        reason = "length"
                        break
                    if len(window) >= n_ctx:
                        if not shift:
                            reason = "length"
                            break
                        window = shifted(window, sampling.num_keep, bos=bool(message.get("add_bos", True)))
                        generating = True  # go on from the shortened window (its kept tail is re-read)
                        break
            finally:
                generator.close()
        finished = time.perf_counter_ns()
        tail = pending + decoder.decode(b"", final=True)
        if (tail or logprobs) and reason != "cancel":
            self.send({"id": job_id, "type": "token", "text": tail, **take_logprobs(logprobs)})
        perf = llama_cpp.llama_perf_context(llm.ctx)
        self.send({
            "id": job_id,
            "type": "done",
            "done_reason": reason,
            "prompt_eval_count": max(int(perf.n_p_eval), 1) if tokens else 0,
            "prompt_tokens": len(tokens),
            "prompt_eval_duration": first_token_at - started,
            "eval_count": stats.eval_count,
            "eval_duration": finished - first_token_at,
            "tokens": tokens + stats.tokens,
        })

    def known_tokens(self, tokens: Any) -> list[int]:
        """Token ids a request gave, each checked against the vocabulary: llama.cpp aborts the
        process on an id it does not have (the API checks first; this holds for any caller)."""
        n_vocab = self.llm.n_vocab()
        checked = [token for token in tokens if isinstance(token, int) and 0 <= token < n_vocab]
        if len(checked) != len(tokens):
            raise InputError(f"token ids must be between 0 and {n_vocab - 1}, this model's vocabulary")
        return checked

    def token_logprobs(self, token: int, top_n: int) -> dict[str, Any]:
        """The logprob entry of the token just sampled, from the last logits row."""
        llm = self.llm
        return logprob_entry(self.llama_cpp.llama_get_logits_ith(llm.ctx, -1), llm.n_vocab(), token, top_n,
                             lambda t: bytes(llm.detokenize([t], special=True)))

    def grammar_for(self, fmt: Any) -> Any:
        """`format` "json" or a JSON Schema object, as a llama.cpp grammar (None for free text)."""
        if not fmt:
            return None
        from llama_cpp import llama_grammar

        try:
            if fmt == "json":
                return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
            return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds for bad schemas
            raise InputError(f"invalid format: the JSON schema cannot be turned into a grammar: {exc}") from None

    # -- embeddings -----------------------------------------------------------------------------

    def embed(self, message: dict[str, Any]) -> None:
        embedder = self.embedding_model()
        limit = embedder.n_ctx()
        vectors: list[list[float]] = []
        counts = 0
        started = time.perf_counter_ns()
        for text in message["inputs"]:
            tokens = embedder.tokenize(text.encode(errors="replace"), add_bos=True, special=True)
            if len(tokens) > limit:
                if not message.get("truncate", True):
                    raise InputError("the input length exceeds the context length")
                tokens = tokens[:limit]
                text = embedder.detokenize(tokens[1:]).decode("utf-8", errors="replace")
            counts += len(tokens)
            vector = embedder.embed(text, normalize=False, truncate=True)
            vectors.append([float(x) for x in vector])
        self.send({"id": message["id"], "type": "result", "embeddings": vectors, "prompt_eval_count": counts,
                   "duration": time.perf_counter_ns() - started})

    def embedding_model(self) -> Any:
        """A second context over the same weights (mmap shares them) made for pooled embeddings."""
        if self.embedder is None:
            llama_cpp = self.llama_cpp
            arch = self.llm.metadata.get("general.architecture", "")
            declared = self.llm.metadata.get(f"{arch}.pooling_type")
            # Generative models declare no pooling; mean pooling gives one vector per input.
            pooling = int(declared) if declared not in (None, "0") else llama_cpp.LLAMA_POOLING_TYPE_MEAN
            self.embedder = llama_cpp.Llama(
                model_path=self.spec.model_path,
                n_ctx=self.spec.num_ctx,
                n_batch=self.spec.num_ctx,
                n_ubatch=self.spec.num_ctx,
                n_gpu_layers=self.n_gpu_layers,
                n_threads=self.threads,
                embedding=True,
                pooling_type=pooling,
                verbose=False,
            )
        return self.embedder


def _token_text(llm: Any, token: int) -> str:
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def runner_main(conn: Connection, spec: LoadSpec) -> None:
    """Entry point of the runner process."""
    # OpenMP's own default (spin briefly at a barrier, then sleep) is kept on purpose: PASSIVE
    # (sleep at once) made two-thread decoding on two cores ~45% slower once the API server and
    # its clients woke up between tokens; ACTIVE (spin for ever) burns a core while idle.
    try:
        runner = _Runner(conn, spec)
    except Exception as exc:  # noqa: BLE001 - report any load failure to the parent
        conn.send({"type": "load_error", "message": f"{type(exc).__name__}: {exc}"})
        return
    llm = runner.llm
    conn.send({
        "type": "ready",
        "n_ctx": llm.n_ctx(),
        # For models without a TEMPLATE layer the server renders the GGUF's own chat template.
        "chat_template": llm.metadata.get("tokenizer.chat_template"),
        "bos_token": _token_text(llm, llm.token_bos()),
        "eos_token": _token_text(llm, llm.token_eos()),
        # 0 on the CPU: without a GPU backend no layer is offloaded (see gpu_layers).
        "gpu_share": offloaded_share(runner.n_gpu_layers, runner.llama_cpp.llama_model_n_layer(llm.model)),
        "vision": runner.projector is not None,
        "n_gpu_layers": runner.n_gpu_layers,
        "slots": runner.slots,  # generations served at once (the scheduler admits this many)
        "pid": os.getpid(),
        "n_vocab": llm.n_vocab(),  # token ids a request may carry (generate's context)
    })
    runner.serve()
