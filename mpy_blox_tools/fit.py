"""Fitting a release to a broker: which packages go out as chunks, and whether every
message of it fits the broker's limit (issue 15; docs/workstation.md, "Chunks and
broker limits").

    cuts = [cut(p, chunk_size) for p in packages]        # a Cut: entry and messages
    check_sizes([m for c in cuts for m in c.messages], mqtt.broker_limits(client), ...)

The chunk size is --chunk-size (`parse_chunk_size`), else the default lowered to the
Maximum Packet Size the broker states in its MQTT 5 CONNACK (`chunk_size_to_use`).
Each message is measured as the PUBLISH packet that carries it (`mqtt.packet_size`),
as MQTT 5 counts that limit; one too large refuses the release before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpy_blox.update import manifest
from mpy_blox_tools import chunks, mqtt
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.micropython import format_size, parse_size

if TYPE_CHECKING:
    from mpy_blox_tools.publish import Package


def parse_chunk_size(text: str | int) -> int:
    """--chunk-size: bytes (`64K`, `1M`, `65536`), or 0 for `0` and `off` (one message
    a package)."""
    if isinstance(text, str) and text.strip().lower() in ("0", "off"):
        return 0
    if text == 0:
        return 0
    try:
        size = parse_size(text)
    except MpyBloxError:
        size = None
    if size is None or not manifest.MIN_CHUNK <= size <= manifest.MAX_CHUNK:
        raise MpyBloxError(
            f"--chunk-size {text!r}: from 1K to 16M (what a device takes), "
            "or 0 or off for one message a package"
        )
    return size


@dataclass(frozen=True)
class Message:
    """One retained message of a release, with what it carries (for messages)."""

    topic: str
    payload: bytes
    what: str  # "package user_main.py", "chunk 3 of mpy-blox 0.7.0", "the list"


@dataclass(frozen=True)
class Cut:
    """A package as it goes out: its list entry and its messages."""

    package: Package
    entry: dict  # the package's entry, with the chunk fields when chunked
    messages: list[Message]

    @property
    def chunked(self) -> bool:
        return "chunks" in self.entry


def cut(package: Package, chunk_size: int) -> Cut:
    """`package` as one message, or as chunks when it is larger than `chunk_size` (0: never)."""
    if not chunk_size or len(package.data) <= chunk_size:
        what = f"package {package.label}"
        return Cut(package, package.entry, [Message(package.topic, package.data, what)])
    try:
        done = chunks.chunk(package.entry, package.data, chunk_size)
    except ValueError as e:
        raise MpyBloxError(f"package {package.label}: {e}") from None
    n = len(done.chunks)
    messages = [
        Message(topic, payload, f"chunk {k} of {n} of {package.label}")
        for k, (topic, payload) in enumerate(done.messages()[:-1])
    ]
    topic, payload = done.messages()[-1]
    messages.append(Message(topic, payload, f"the hash list of {package.label}"))
    return Cut(package, done.entry, messages)


def chunk_size_to_use(requested: int | None, limits: mqtt.BrokerLimits) -> tuple[int, str]:
    """The chunk size (0: none) and why, from --chunk-size and what the broker said."""
    if requested is not None:
        return requested, "--chunk-size" if requested else "--chunk-size off"
    size = chunks.chunk_size_for(limits.max_packet_size)
    if size < manifest.MIN_CHUNK:
        raise MpyBloxError(
            f"the broker takes packets of at most {limits.max_packet_size} bytes "
            f"({limits.describe()}): too small even for chunks of 1K, the smallest a "
            "device takes"
        )
    if size == chunks.DEFAULT_CHUNK_SIZE:
        return size, f"the default; {limits.describe()}"
    return size, f"to fit the broker's limit of {limits.max_packet_size} bytes"


def check_sizes(
    messages: Sequence[Message], limits: mqtt.BrokerLimits, expiry: set[str], broker
) -> None:
    """Refuse, before anything is sent, a message larger than the broker takes."""
    limit = limits.max_packet_size
    if not limit:
        return
    for m in messages:
        size = mqtt.packet_size(m.topic, len(m.payload), limits.mqtt5, m.topic in expiry)
        if size <= limit:
            continue
        fit = chunks.chunk_size_for(limit)
        hint = (
            f"publish with a smaller --chunk-size, e.g. --chunk-size {format_size(fit)}"
            if m.what != "the list" and fit >= manifest.MIN_CHUNK
            else "publish fewer packages at a time"
        )
        raise MpyBloxError(
            f"{m.what}: a {size}-byte message on {m.topic} is larger than the broker at "
            f"{broker} takes, {limit} bytes ({limits.describe()}); nothing was published: "
            f"{hint}"
        )


def hung_up(e: mqtt.HungUp, m: Message, limits: mqtt.BrokerLimits) -> str:
    # Said when the broker drops the connection on a message: the release stops
    # there, before its list, so no device sees it.
    said = f"while taking {m.what}, a message of {len(m.payload)} bytes on {m.topic}; " + (
        "the lists after it were not published"
        if m.what == "the list"
        else "the list was not published: no device sees this release"
    )
    if limits.max_packet_size:
        return f"{e} {said}"
    big = len(m.payload)
    fit = chunks.DEFAULT_CHUNK_SIZE if big > chunks.DEFAULT_CHUNK_SIZE else big // 2048 * 1024
    return (
        f"{e} {said}. It says no limit ({limits.describe()}), but that is how a broker "
        "refuses a packet larger than it takes (Mosquitto's max_packet_size, a hosted "
        "broker's message size limit): publish with a smaller --chunk-size, e.g. "
        f"--chunk-size {format_size(max(fit, manifest.MIN_CHUNK))}"
    )
