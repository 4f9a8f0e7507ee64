"""Images a request carries, checked before any reaches a runner.

A runner decodes images with stb_image inside libmtmd, which allocates width x height x channels
bytes as the file's header states them: a few bytes claiming 65535 x 65535 pixels would make it
allocate gigabytes, or fail where nothing catches it. So the API reads each image's format and
size from its header first and refuses what is not one of the formats models are used with, or
is larger than any vision encoder needs (encoders scale images down to well under 1024 pixels a
side).
"""

from __future__ import annotations

import base64
import binascii
import struct

from berth.registry.errors import InvalidField

MAX_IMAGES = 32  # per request
MAX_SIDE = 16384  # pixels
MAX_PIXELS = 64 * 1024 * 1024
FORMATS = "PNG, JPEG, GIF or BMP"

# JPEG markers that start a frame and carry its size: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC).
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers that stand alone, without a length: TEM, RST0-7, SOI, EOI.
_JPEG_BARE = {0x01, *range(0xD0, 0xDA)}


def decode_images(images: list[str] | None, field: str = "images") -> tuple[bytes, ...]:
    """Base64 images as bytes; InvalidField naming the bad one. Their content is checked by
    `check_images` once the model is known to read images (Ollama names a text model's lack of
    vision first, whatever the bytes)."""
    images = images or []
    if len(images) > MAX_IMAGES:
        raise InvalidField(field, f'"{field}" has {len(images)} images; a request may carry at most {MAX_IMAGES}')
    out: list[bytes] = []
    for index, text in enumerate(images):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidField(f"{field}.{index}", f"image {index} is not valid base64") from None
        out.append(data)
    return tuple(out)


def check_images(images: tuple[bytes, ...], field: str = "images") -> None:
    for index, data in enumerate(images):
        check_image(data, f"{field}.{index}", f"image {index}")


def check_image(data: bytes, field: str, label: str) -> None:
    """InvalidField unless `data` is a PNG, JPEG, GIF or BMP image within MAX_SIDE and MAX_PIXELS."""
    size = image_size(data)
    if size is None:
        raise InvalidField(field, f"{label} is not a {FORMATS} image (or its header is damaged); send one of those")
    width, height = size
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE and width * height <= MAX_PIXELS):
        raise InvalidField(field, f"{label} is {width} x {height} pixels; the limit is {MAX_SIDE} a side and "
                                  f"{MAX_PIXELS // (1024 * 1024)} megapixels: scale it down")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF or BMP header; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return width, height
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)  # a negative height means rows are stored top-down
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The size in the first frame header, walking the markers' segments (each names its length)."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_BARE:
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        if marker in _JPEG_FRAMES:
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        if length < 2:
            return None
        at += 2 + length
    return None
