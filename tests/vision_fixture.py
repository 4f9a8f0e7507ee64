"""A FAKE vision projector for tests: a tiny random-weight "mmproj" GGUF, and a PNG writer.

No small real vision model can be installed here, so the projector path is exercised with this
stand-in: a LLaVA-1.5-layout ("mlp") vision tower of a few hundred KB with random weights. libmtmd
loads it with the real Gemma 3 270M text model, decodes real PNG bytes, runs the ViT and the MLP
projector and evaluates 16 image embeddings per image; the text model cannot make sense of them,
so tests check the plumbing (loading, image count, positions, errors), never what is said.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

IMAGE_SIZE = 56  # images are resized to this; 56 / 14 = 4 patches a side
PATCH_SIZE = 14
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
VISION_WIDTH = 64
VISION_FF = 128  # must differ from VISION_WIDTH: clip.cpp swaps up/down when ffn_down's input is the width
VISION_HEADS = 2
VISION_BLOCKS = 2  # the LLaVA graph runs all but the last block
PROJECTOR_HIDDEN = 128


def write_fake_projector(path: Path, text_width: int) -> Path:
    """A projector whose output width is the text model's embedding width (640 for Gemma 3 270M)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(1234)

    def random(*shape: int) -> "np.ndarray":
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> "np.ndarray":
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> "np.ndarray":
        return np.zeros(n, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), arch="clip")
    writer.add_string("general.name", "fake test projector")
    writer.add_uint32("general.file_type", 0)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    for key, value in (("image_size", IMAGE_SIZE), ("patch_size", PATCH_SIZE), ("embedding_length", VISION_WIDTH),
                       ("feed_forward_length", VISION_FF), ("block_count", VISION_BLOCKS),
                       ("projection_dim", text_width), ("attention.head_count", VISION_HEADS)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    # numpy shapes are ggml's dimensions reversed.
    writer.add_tensor("v.patch_embd.weight", random(VISION_WIDTH, 3, PATCH_SIZE, PATCH_SIZE))
    writer.add_tensor("v.patch_embd.bias", zeros(VISION_WIDTH))
    writer.add_tensor("v.position_embd.weight", random(TOKENS_PER_IMAGE, VISION_WIDTH))
    writer.add_tensor("v.pre_ln.weight", ones(VISION_WIDTH))
    writer.add_tensor("v.pre_ln.bias", zeros(VISION_WIDTH))
    for block in range(VISION_BLOCKS):
        prefix = f"v.blk.{block}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{prefix}.{name}.weight", random(VISION_WIDTH, VISION_WIDTH))
            writer.add_tensor(f"{prefix}.{name}.bias", zeros(VISION_WIDTH))
        for norm in ("ln1", "ln2"):
            writer.add_tensor(f"{prefix}.{norm}.weight", ones(VISION_WIDTH))
            writer.add_tensor(f"{prefix}.{norm}.bias", zeros(VISION_WIDTH))
        writer.add_tensor(f"{prefix}.ffn_up.weight", random(VISION_FF, VISION_WIDTH))
        writer.add_tensor(f"{prefix}.ffn_up.bias", zeros(VISION_FF))
        writer.add_tensor(f"{prefix}.ffn_down.weight", random(VISION_WIDTH, VISION_FF))
        writer.add_tensor(f"{prefix}.ffn_down.bias", zeros(VISION_WIDTH))
    writer.add_tensor("mm.0.weight", random(PROJECTOR_HIDDEN, VISION_WIDTH))
    writer.add_tensor("mm.0.bias", zeros(PROJECTOR_HIDDEN))
    writer.add_tensor("mm.2.weight", random(text_width, PROJECTOR_HIDDEN))
    writer.add_tensor("mm.2.bias", zeros(text_width))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def png(width: int, height: int, shade: int = 128) -> bytes:
    """An 8-bit RGB PNG of a colour gradient (written by hand: no imaging library needed)."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(((x * 4) & 255, (y * 4) & 255, shade))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows)))
            + chunk(b"IEND", b""))
