"""Image dimensions from the first bytes of an encoded file, without decoding it.

A 300 KB PNG can claim 10000 x 10000 pixels and cost gigabytes once decoded; the
server reads the header first and refuses images above a pixel budget.
"""

from __future__ import annotations

import struct

#: JPEG start-of-frame markers (they carry the frame size); C4, C8 and CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: JPEG markers without a length field.
_JPEG_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    i = 2  # after SOI (FF D8)
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not at a marker: corrupt, let the decoder say so
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` read from a PNG, JPEG, GIF or BMP header; None if unknown.

    ``None`` means the header could not be read (truncated, unknown format): the caller
    lets the decoder report the error. Only the first bytes are read (the JPEG frame
    header is searched for, skipping the segments before it).
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        return None
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg_dimensions(data)
    if data.startswith((b"GIF87a", b"GIF89a")):
        if len(data) >= 10:
            return struct.unpack("<HH", data[6:10])
        return None
    if data.startswith(b"BM"):
        if len(data) >= 26:
            (header_size,) = struct.unpack("<I", data[14:18])
            if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
                width, height = struct.unpack("<HH", data[18:22])
            else:
                width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)  # height < 0 means top-down rows
        return None
    return None
