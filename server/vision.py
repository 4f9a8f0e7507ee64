"""Images for models with a vision projector layer, through llama.cpp's libmtmd (runner side).

The prompt arrives rendered, with Ollama's `[img-N]` tags where image N goes (server/prompt.py
puts them there). Each tag becomes libmtmd's media marker; libmtmd decodes the image bytes (PNG,
JPEG, BMP, GIF...), encodes them with the projector and evaluates text and image embeddings into
one sequence of the runner's context. Images no tag names go first, in order, as Ollama's
templates do with `[img-N]` prefixes.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any, Sequence

from server.runner import InputError

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


class Projector:
    """A libmtmd context on a loaded text model; used on the thread that owns the llama context."""

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

    def prefill(self, lctx: Any, text: str, images: Sequence[bytes], seq_id: int, n_batch: int, limit: int) -> int:
        """Evaluate `text` and its images into sequence `seq_id` from position 0, with logits for
        the last position; returns the positions used. InputError for undecodable images or a
        prompt that would not fit `limit` positions (checked before anything is evaluated)."""
        mtmd = self._mtmd
        prompt, order = with_markers(text, len(images), self.marker)
        bitmaps: list[Any] = []
        chunks = mtmd.mtmd_input_chunks_init()
        if not chunks:
            raise MemoryError("libmtmd could not allocate input chunks")
        try:
            for index in order:
                data = images[index]
                buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
                bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self._ctx, buffer, len(data), False)
                if not bitmap:
                    raise InputError(f"image {index} could not be decoded; send PNG, JPEG, BMP or GIF data "
                                     "as base64")
                bitmaps.append(bitmap)
            encoded = prompt.encode()
            request = mtmd.mtmd_input_text()
            request.text = encoded
            request.text_len = len(encoded)
            request.add_special = True
            request.parse_special = True
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            status = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(request), array, len(bitmaps))
            if status != 0:
                raise InputError(f"the prompt and its {len(bitmaps)} image(s) could not be tokenized together "
                                 f"(libmtmd status {status})")
            positions = int(mtmd.mtmd_helper_get_n_pos(chunks))
            if positions >= limit:
                raise InputError(f"the prompt with its images is {positions} positions, which does not fit the "
                                 f"context of {limit}; raise num_ctx or send fewer or smaller images")
            reached = ctypes.c_int32(0)
            status = mtmd.mtmd_helper_eval_chunks(self._ctx, lctx, chunks, 0, seq_id, n_batch, True,
                                                  ctypes.byref(reached))
            if status != 0:
                raise RuntimeError(f"evaluating the prompt and its images failed (libmtmd status {status})")
            return int(reached.value)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
