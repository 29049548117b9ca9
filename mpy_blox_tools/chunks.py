"""Cutting a package into chunks (docs/protocol.md, "Chunked packages").

The wire format is checked by the device's own code (`manifest.check_entry`): a
chunked entry this module makes is one the device accepts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mpy_blox import topics
from mpy_blox.update import manifest

# Without --chunk-size and without a limit from the broker: a chunk and its
# PUBLISH header fit AWS IoT Core's 128 KB, the smallest common hosted limit.
DEFAULT_CHUNK_SIZE = 64 * 1024
# What a PUBLISH adds to its payload, at most: fixed header (5), topic length (2),
# the longest package topic (mpypi/packages/src/ + a 255-byte path + / + 64 hex +
# /16777216/hashes), packet id (2), MQTT 5 properties (message expiry and their length).
PUBLISH_OVERHEAD = 512


@dataclass(frozen=True)
class Chunked:
    """A package's entry with its chunk fields, and the messages that carry it."""

    entry: dict
    hashes: bytes  # the hash list: each chunk's raw SHA256, in order
    chunks: list[bytes]

    def messages(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of every retained message, the hash list last."""
        out = [(topics.chunk_topic(self.entry, k), c) for k, c in enumerate(self.chunks)]
        out.append((topics.chunk_topic(self.entry, None), self.hashes))
        return out


def chunk(entry: dict, data: bytes, chunk_size: int) -> Chunked:
    """`entry` (for `data`) with chunk fields for pieces of `chunk_size` bytes.

    ValueError when the device would refuse the result (chunk size out of
    1 KiB..16 MiB, more chunks than chunk_size // 32)."""
    n = max(1, -(-len(data) // chunk_size))
    chunks = [data[k * chunk_size : (k + 1) * chunk_size] for k in range(n)]
    hashes = b"".join(hashlib.sha256(c).digest() for c in chunks)
    out = dict(entry)
    out.update(
        chunk_size=chunk_size,
        chunks=n,
        chunks_sha256=hashlib.sha256(hashes).hexdigest(),
    )
    try:
        manifest.check_entry(out, True)
    except manifest.InvalidUpdate as e:
        raise ValueError(f"cannot cut {len(data)} bytes into {chunk_size}-byte chunks: {e}") from e
    return Chunked(out, hashes, chunks)


def chunk_size_for(max_packet_size: int | None, requested: int | None = None) -> int:
    """The chunk size to publish with: `requested` (--chunk-size) if given, else the
    default, lowered to fit `max_packet_size` (the broker's, from CONNACK) with its
    PUBLISH overhead, in whole KiB."""
    size = requested or DEFAULT_CHUNK_SIZE
    if requested is None and max_packet_size:
        size = min(size, (max_packet_size - PUBLISH_OVERHEAD) // 1024 * 1024)
    return size
