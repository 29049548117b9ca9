"""Retained messages of the embedded broker, kept on disk across restarts: one file per topic.

A file in the store folder is named for the SHA-256 of its topic (a topic may hold
any character, a file name may not) and holds:

    offset  size  field
    0       4     b"MBR1"                  magic and format version 1
    4       1     QoS                      0, 1 or 2
    5       2     topic length N           big-endian
    7       N     topic                    UTF-8
    7 + N   rest  payload

Each message is written to a temporary file, fsynced, renamed over the old one and the
folder fsynced, so a crash at any instant leaves the old message or the new one, never
part of one. An empty payload clears the topic (MQTT 3.1.1, 3.3.1.3) and removes the
file. One file per topic: publishing a 4 MiB package writes 4 MiB, not every other
retained message again.

`RetainedStorePlugin` connects the store to an amqtt broker: it restores the store
before the listeners open and saves every change of a topic's retained message.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from amqtt.broker import BrokerContext, RetainedApplicationMessage
from amqtt.plugins.base import BasePlugin

MAGIC = b"MBR1"
HEADER = struct.Struct(">4sBH")
SUFFIX = ".retained"
TEMP_SUFFIX = ".tmp"

log = logging.getLogger(__name__)


class RetainedStore:
    """The folder of retained messages (synchronous: the plugin runs it in a thread)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def path_for(self, topic: str) -> Path:
        return self.dir / (hashlib.sha256(topic.encode()).hexdigest() + SUFFIX)

    def put(self, topic: str, payload: bytes | bytearray, qos: int) -> None:
        """Keep `payload` as the retained message of `topic`; empty clears the topic."""
        if not payload:
            self.delete(topic)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        encoded = topic.encode()
        path = self.path_for(topic)
        temp = path.with_name(path.name + TEMP_SUFFIX)
        with open(temp, "wb") as f:
            f.write(HEADER.pack(MAGIC, qos, len(encoded)))
            f.write(encoded)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        self._sync_dir()

    def delete(self, topic: str) -> None:
        try:
            self.path_for(topic).unlink()
        except FileNotFoundError:
            return
        self._sync_dir()

    def load(self) -> Iterator[tuple[str, bytes, int]]:
        """Every kept message as (topic, payload, qos); leftovers of a crash are removed."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.iterdir()):
            if path.name.endswith(TEMP_SUFFIX):
                path.unlink(missing_ok=True)  # a write that never completed
                continue
            if not path.name.endswith(SUFFIX):
                continue
            data = path.read_bytes()
            if len(data) < HEADER.size:
                log.warning("%s: truncated, ignored", path)
                continue
            magic, qos, length = HEADER.unpack_from(data)
            if magic != MAGIC or qos > 2 or len(data) < HEADER.size + length:
                log.warning("%s: not a retained message of this format, ignored", path)
                continue
            topic = data[HEADER.size : HEADER.size + length].decode()
            yield topic, data[HEADER.size + length :], qos

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class RetainedStorePlugin(BasePlugin[BrokerContext]):
    """amqtt plugin: the broker's retained messages restored from and saved to a folder."""

    @dataclass
    class Config:
        directory: str

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self.store = RetainedStore(self.config.directory)
        # Writes run in a thread, one at a time and in the order the broker made the
        # changes (asyncio.Lock wakes its waiters first come, first served).
        self._lock = asyncio.Lock()
        # Messages put back at start, whose "retained" events must not write them again;
        # held here until their event has run, so that no other message takes their id.
        self._restored: dict[int, RetainedApplicationMessage] = {}

    async def on_broker_pre_start(self) -> None:
        started = time.monotonic()
        count = size = 0
        for topic, payload, qos in await asyncio.to_thread(lambda: list(self.store.load())):
            await self.context.retain_message(topic, payload, qos)
            message = self.context.retained_messages[topic]
            self._restored[id(message)] = message
            count += 1
            size += len(payload)
        log.info(
            "restored %d retained messages (%.1f MiB) from %s in %.3f s",
            count,
            size / 2**20,
            self.store.dir,
            time.monotonic() - started,
        )

    async def on_broker_retained_message(
        self, *, client_id: str | None, retained_message: RetainedApplicationMessage
    ) -> None:
        if client_id is not None:
            return  # queued for an offline session: not the topic's retained message
        restored = self._restored.pop(id(retained_message), None) is retained_message
        if restored and retained_message.data:
            return  # read from the store at start: already there
        topic, data, qos = retained_message.topic, retained_message.data, retained_message.qos
        async with self._lock:
            try:
                await asyncio.to_thread(self.store.put, topic, bytes(data), qos or 0)
            except OSError as e:
                log.error("retained message of %r not saved: %s", topic, e)
