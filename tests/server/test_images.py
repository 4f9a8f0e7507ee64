"""Images are checked from their headers before any reaches a runner."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from berth.registry.errors import InvalidField
from berth.server import images
from tests.vision_fixture import png


def png_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))


def jpeg_of(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


def test_sizes_from_headers() -> None:
    assert images.image_size(png(64, 32)) == (64, 32)
    assert images.image_size(jpeg_of(640, 480)) == (640, 480)
    assert images.image_size(b"GIF89a" + struct.pack("<HH", 10, 20) + b"\x00" * 10) == (10, 20)
    bmp = b"BM" + b"\x00" * 16 + struct.pack("<ii", 30, -40) + b"\x00" * 28
    assert images.image_size(bmp) == (30, 40)
    assert images.image_size(b"not an image") is None
    assert images.image_size(b"\xff\xd8\xff\xe0\x00\x01") is None  # a segment shorter than its own length field


@pytest.mark.parametrize("data", [png_claiming(65535, 65535), png_claiming(20000, 10), jpeg_of(9000, 9000),
                                  png_claiming(0, 10)])
def test_images_too_large_for_any_encoder_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidField, match="pixels") as error:
        images.check_images((png(8, 8), data))
    assert error.value.field == "images.1"


def test_unknown_formats_are_refused() -> None:
    with pytest.raises(InvalidField, match="is not a PNG, JPEG, GIF or BMP image"):
        images.check_images((b"RIFF....WEBPVP8 ",))


def test_decoding_names_the_bad_image_and_bounds_the_count() -> None:
    good = base64.b64encode(png(8, 8)).decode()
    assert images.decode_images([good]) == (png(8, 8),)
    with pytest.raises(InvalidField, match="image 1 is not valid base64") as error:
        images.decode_images([good, "***"], "messages.3.images")
    assert error.value.field == "messages.3.images.1"
    with pytest.raises(InvalidField, match=f"at most {images.MAX_IMAGES}"):
        images.decode_images([good] * (images.MAX_IMAGES + 1))
