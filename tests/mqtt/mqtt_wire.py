"""MQTT framing on the test side: what the scripted fake broker reads and writes."""

from __future__ import annotations

import socket


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_packet(conn: socket.socket) -> tuple[int, bytes]:
    """(first byte, body) of one packet from the client."""
    first = conn.recv(1)
    if not first:
        raise EOFError
    length, shift = 0, 0
    while True:
        b = conn.recv(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise EOFError
        body += chunk
    return first[0], body
