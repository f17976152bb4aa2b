"""Image dimensions, and the memory decoding will take, from an encoded file without decoding it.

A 300 KB PNG can claim 10000 x 10000 pixels and cost gigabytes once decoded; the
server reads the header first and refuses images above a pixel budget. A header does not
always bound the decode: `decoded_pixels` counts what TensorFlow's decoder allocates.

What ``tf.io.decode_image`` (``channels=3``, ``expand_animations=False``) allocates, in
RGB-pixel units (3 bytes):

- PNG, BMP, baseline JPEG: the output, ``width x height`` of the header (PNG's IHDR, BMP's
  info header, the JPEG frame header).
- Progressive JPEG: libjpeg also keeps every DCT coefficient of the whole image (2 bytes per
  coefficient, up to 3 components: up to 6 bytes per pixel), counted as ``3 x width x height``.
- GIF: giflib's ``DGifSlurp`` reads *every* frame (1 byte per pixel each) before TensorFlow
  decodes the first at the *largest frame's* size (not the logical screen's), so
  ``max frame area + sum of frame areas / 3`` (the largest frame, or the logical screen
  if larger: older TensorFlow allocated the screen). A screen that says 1 x 1 bounds
  nothing: such a GIF may hold a 12000 x 12000 frame.
- WebP and other formats: the server refuses them before decoding (not counted here).
"""

from __future__ import annotations

import struct

#: JPEG start-of-frame markers (they carry the frame size); C4, C8 and CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: JPEG markers without a length field.
_JPEG_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}


#: Progressive JPEG frames (SOF2, SOF6, SOF10, SOF14): the decoder buffers all coefficients.
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, SOF marker)`` of a JPEG's frame header."""
    i = 2  # after SOI (FF D8)
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:  # extraneous bytes: libjpeg skips to the next marker, and so do we
            i += 1
            continue
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
            return width, height, marker
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
        frame = _jpeg_frame(data)
        return frame[:2] if frame else None
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


def _gif_frames(data: bytes) -> list[tuple[int, int]]:
    """``(width, height)`` of every image descriptor of a GIF (walks the block structure)."""
    n = len(data)
    if n < 13:
        return []
    packed = data[10]
    i = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)  # global colour table
    frames = []
    while i < n:
        block = data[i]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then data sub-blocks
            i += 2
        elif block == 0x2C:  # image descriptor: left, top, width, height, packed
            if i + 10 > n:
                break
            width, height = struct.unpack("<HH", data[i + 5 : i + 9])
            frames.append((width, height))
            local = data[i + 9]
            i += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1  # + LZW minimum code size
        else:
            break  # giflib stops here too
        while i < n and data[i]:  # sub-blocks up to the terminator
            i += data[i] + 1
        i += 1
    return frames


def decoded_pixels(data: bytes) -> tuple[int, str] | None:
    """``(pixels, description)``: what decoding `data` allocates, in RGB pixels (see the module
    docstring), and a short description for messages; None if the header cannot be read."""
    if data.startswith((b"GIF87a", b"GIF89a")):
        frames = _gif_frames(data)
        if not frames:
            return None
        screen = struct.unpack("<HH", data[6:10])  # older TensorFlow allocated the screen's size
        width = max([screen[0]] + [w for w, _ in frames])
        height = max([screen[1]] + [h for _, h in frames])
        pixels = width * height + sum(w * h for w, h in frames) // 3
        if len(frames) == 1:
            return pixels, f"a {width}x{height} GIF"
        return pixels, f"a GIF of {len(frames)} frames up to {width}x{height}"
    if data.startswith(b"\xff\xd8\xff"):
        frame = _jpeg_frame(data)
        if frame is None:
            return None
        width, height, marker = frame
        if marker in _JPEG_PROGRESSIVE:
            return 3 * width * height, f"a {width}x{height} progressive JPEG"
        return width * height, f"a {width}x{height} image"
    size = image_dimensions(data)
    if size is None:
        return None
    return size[0] * size[1], f"a {size[0]}x{size[1]} image"
