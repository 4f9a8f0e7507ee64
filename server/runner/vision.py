"""Images for models with a vision projector layer, through llama.cpp's libmtmd (runner side).

The prompt arrives rendered, with Ollama's `[img-N]` tags where image N goes (server/prompt.py
puts them there). Each tag becomes libmtmd's media marker; libmtmd decodes the image bytes (PNG,
JPEG, BMP, GIF...), encodes them with the projector (`Projector.encode`, on any thread: the batch
engine runs it on a thread of its own, so a slow vision encoder holds up no other request) and
evaluates text and image embeddings into one sequence of the runner's context
(`Projector.evaluate`, on the context's thread). Images no tag names go first, in order, as
Ollama's templates do with `[img-N]` prefixes.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from berth.server.runner.protocol import InputError

IMAGE_TAG = re.compile(r"\[img-(\d+)\]")


def with_markers(text: str, count: int, marker: str) -> tuple[str, list[int]]:
    """`text` with each `[img-N]` (N < count) replaced by `marker`, and the image indexes in the
    order the markers now appear; images no tag names are put first."""
    order: list[int] = []

    def replace(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index >= count:
            return match.group(0)  # not an image of this request: plain text, as in Ollama
        order.append(index)
        return marker

    replaced = IMAGE_TAG.sub(replace, text)
    missing = [i for i in range(count) if i not in order]
    return marker * len(missing) + replaced, missing + order


TEXT_CHUNK = 0  # MTMD_INPUT_CHUNK_TYPE_TEXT


@dataclass
class Encoded:
    """A request's text and images after the vision encoder: libmtmd's chunks, and the embeddings
    of each image chunk (by chunk index). Owns libmtmd memory: `close` frees it."""

    mtmd: Any
    chunks: Any
    positions: int = 0  # what the sequence's position advances by
    cells: int = 0  # KV cells it fills: more than `positions` on M-RoPE models (an image's rows share one)
    embeddings: dict[int, Any] = field(default_factory=dict)

    def close(self) -> None:
        if self.chunks:
            self.mtmd.mtmd_input_chunks_free(self.chunks)
            self.chunks = None
        self.embeddings.clear()


class Projector:
    """A libmtmd context on a loaded text model: `encode` on any thread, `evaluate` on the thread
    that owns the llama context."""

    def __init__(self, path: str, model: Any, use_gpu: bool, n_threads: int) -> None:
        from llama_cpp import mtmd_cpp

        self._mtmd = mtmd_cpp
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        if n_threads > 0:
            params.n_threads = n_threads
        params.print_timings = False
        ctx = mtmd_cpp.mtmd_init_from_file(path.encode(), model, params)
        if not ctx:
            raise ValueError(f"the vision projector layer ({path}) could not be loaded for this model: "
                             "is it the projector made for this model's weights?")
        if not mtmd_cpp.mtmd_support_vision(ctx):
            mtmd_cpp.mtmd_free(ctx)
            raise ValueError("the projector layer has no vision encoder, so it cannot read images")
        self._ctx = ctx
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        # The width of an image embedding: what the text model takes as input.
        import llama_cpp

        self._n_embd = int(llama_cpp.llama_model_n_embd_inp(model))
        self._no_callback = mtmd_cpp.mtmd_helper_post_decode_callback()  # NULL: no post-decode hook
        self._lock = threading.Lock()

    def encode(self, text: str, images: Sequence[bytes], limit: int) -> "Encoded":
        """Decode the images, tokenize `text` around them and run the vision encoder on each, on
        any thread (one at a time: a libmtmd context is not re-entrant). The encoder is the slow
        part of an image request (seconds for a real projector on a CPU), so the batch engine runs
        it off its own thread; `evaluate` then puts the result into a sequence. InputError for
        undecodable images or a prompt that would not fit `limit` positions."""
        mtmd = self._mtmd
        prompt, order = with_markers(text, len(images), self.marker)
        with self._lock:
            bitmaps: list[Any] = []
            chunks = mtmd.mtmd_input_chunks_init()
            if not chunks:
                raise MemoryError("libmtmd could not allocate input chunks")
            encoded = Encoded(mtmd, chunks)
            try:
                for index in order:
                    data = images[index]
                    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
                    bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self._ctx, buffer, len(data), False)
                    if not bitmap:
                        raise InputError(f"image {index} could not be decoded; send PNG, JPEG, BMP or GIF data "
                                         "as base64")
                    bitmaps.append(bitmap)
                raw = prompt.encode(errors="replace")
                request = mtmd.mtmd_input_text()
                request.text = raw
                request.text_len = len(raw)
                request.add_special = True
                request.parse_special = True
                array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
                status = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(request), array, len(bitmaps))
                if status != 0:
                    raise InputError(f"the prompt and its {len(bitmaps)} image(s) could not be tokenized "
                                     f"together (libmtmd status {status})")
                encoded.positions = int(mtmd.mtmd_helper_get_n_pos(chunks))
                encoded.cells = int(mtmd.mtmd_helper_get_n_tokens(chunks))
                size = max(encoded.positions, encoded.cells)
                if size >= limit:
                    raise InputError(f"the prompt with its images is {size} tokens, which does not fit the "
                                     f"context of {limit}; raise num_ctx or send fewer or smaller images")
                parts = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(int(mtmd.mtmd_input_chunks_size(chunks)))]
                if parts and mtmd.mtmd_input_chunk_get_type(parts[-1]) != TEXT_CHUNK:
                    # The first token is sampled from the last position's logits, which only a
                    # text chunk gives (models that close an image with text of their own, such as
                    # Gemma 3, never end here).
                    raise InputError("the prompt ends with an image, and this model needs text after its last "
                                     "image: add the question or instruction after it")
                for index, chunk in enumerate(parts):
                    if mtmd.mtmd_input_chunk_get_type(chunk) == TEXT_CHUNK:
                        continue
                    if mtmd.mtmd_encode_chunk(self._ctx, chunk) != 0:
                        raise RuntimeError("the vision encoder failed on an image of this request")
                    # The output buffer is the context's, overwritten by the next encode: copied.
                    count = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)) * self._n_embd
                    embeddings = (ctypes.c_float * count)()
                    ctypes.memmove(embeddings, mtmd.mtmd_get_output_embd(self._ctx),
                                   count * ctypes.sizeof(ctypes.c_float))
                    encoded.embeddings[index] = embeddings
            except BaseException:
                encoded.close()
                raise
            finally:
                for bitmap in bitmaps:
                    mtmd.mtmd_bitmap_free(bitmap)
            return encoded

    def evaluate(self, lctx: Any, encoded: "Encoded", seq_id: int, n_batch: int) -> int:
        """Evaluate encoded text and images into sequence `seq_id` from position 0, with logits for
        the last position, on the thread that owns `lctx`; returns the positions used."""
        mtmd = self._mtmd
        count = int(mtmd.mtmd_input_chunks_size(encoded.chunks))
        reached = 0
        for index in range(count):
            chunk = mtmd.mtmd_input_chunks_get(encoded.chunks, index)
            after = ctypes.c_int32(reached)  # the text helper adds to it, the image one sets it
            if index in encoded.embeddings:
                status = mtmd.mtmd_helper_decode_image_chunk(self._ctx, lctx, chunk, encoded.embeddings[index],
                                                             reached, seq_id, n_batch, ctypes.byref(after),
                                                             self._no_callback, None)
            else:
                status = mtmd.mtmd_helper_eval_chunk_single(self._ctx, lctx, chunk, reached, seq_id, n_batch,
                                                            index == count - 1, ctypes.byref(after))
            if status != 0:
                raise RuntimeError(f"evaluating the prompt and its images failed (libmtmd status {status})")
            reached = int(after.value)
        return reached

    def close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
