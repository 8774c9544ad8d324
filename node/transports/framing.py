"""Peer frames in one byte string, for transports that carry bytes, not frames.

The peer protocol (``protocols/peer.py``) is a list of frames, as ZeroMQ carries
them.  A stream or a request body carries bytes, so the bridges (QUIC, HTTP/2) put
a message in this form, byte for byte the same frames on both ends::

    u8 count, then count times: u32 length (big-endian), that many bytes

Bounds are checked before anything is allocated: at most ``FRAMES_MAX`` frames and
``MESSAGE_BYTES_MAX`` bytes in all (a REPL body's 32 MiB plus its other frames).
"""

from __future__ import annotations

import struct
from typing import Sequence

FRAMES_MAX = 16
MESSAGE_BYTES_MAX = (32 << 20) + 65536
_LEN = struct.Struct(">I")


class FramingError(ValueError):
    """Bytes that are not one framed peer message within the bounds."""


def encode_frames(frames: Sequence[bytes]) -> bytes:
    if not 0 < len(frames) <= FRAMES_MAX:
        raise FramingError(f"a peer message has 1..{FRAMES_MAX} frames, got {len(frames)}")
    parts = [bytes((len(frames),))]
    for frame in frames:
        parts.append(_LEN.pack(len(frame)))
        parts.append(frame)
    out = b"".join(parts)
    if len(out) > MESSAGE_BYTES_MAX:
        raise FramingError(f"a peer message of {len(out)} bytes exceeds {MESSAGE_BYTES_MAX}")
    return out


def decode_frames(data: bytes) -> list[bytes]:
    if not data or len(data) > MESSAGE_BYTES_MAX:
        raise FramingError(f"a framed peer message has 1..{MESSAGE_BYTES_MAX} bytes")
    count, pos = data[0], 1
    if not 0 < count <= FRAMES_MAX:
        raise FramingError(f"a peer message has 1..{FRAMES_MAX} frames, got {count}")
    frames = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise FramingError("framed peer message cut short")
        (size,) = _LEN.unpack_from(data, pos)
        pos += 4
        if pos + size > len(data):
            raise FramingError("framed peer message cut short")
        frames.append(data[pos:pos + size])
        pos += size
    if pos != len(data):
        raise FramingError(f"{len(data) - pos} bytes after the last frame")
    return frames
