"""Chunked packages on the device (issue 15): downloaded chunk by chunk, each checked
against the hash list, and resumed from the last chunk verified on flash after a
broken link, a broker restart or a power cut.

App-managed virtual boards against a real Mosquitto (and the embedded broker), the
chunks cut by the publisher's own code (mpy_blox_tools.chunks).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time

import pytest
from test_update_agent import Watcher, publish
from test_update_installboot import (
    HEAP,
    KEY,
    USER_V1,
    USER_V2,
    app_board,
    channel,
    pending,
    wait_info,
)
from update_kit import make_src, make_wheel, sha256

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import chunks
from mpy_blox_tools.broker import EmbeddedBroker, amqtt_installed

__all__ = ["app_board", "channel"]  # fixtures, used by name

K = 1024
# A shorter stall than the 30 s default (update.stall_s), for the missing pieces.
STALL_S = 3


def settings(broker, channel, **update) -> dict:
    return {
        "mqtt": {"server": broker.host, "port": broker.port},
        "update": {"channel": channel, "healthy_after_s": 1, "stall_s": STALL_S, **update},
    }


def cut(pkg, chunk_size: int) -> chunks.Chunked:
    return chunks.chunk(pkg.entry, pkg.data, chunk_size)


def publish_chunked(client, c: chunks.Chunked, skip=(), replace=None) -> None:
    """Every message of `c` but the chunks in `skip` (k, or "hashes"); `replace`:
    {k or "hashes": payload} published instead."""
    for topic, payload in c.messages():
        k = topic.rsplit("/", 1)[1]
        k = k if k == "hashes" else int(k)
        if k in skip:
            continue
        publish(client, topic, (replace or {}).get(k, payload))


def publish_list(client, channel, entries, seq) -> None:
    to = f"channels/{channel}"
    publish(client, "mpypi/" + to, manifest.encode_list(entries, seq, KEY, to))


def start_v1(app_board, boards, mqtt_client, broker, channel, *, lane=None, heap=None, **kw):
    board = app_board(settings(broker, channel), **kw)
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=heap or HEAP, lane=lane)
    rb.wait_for("USER v1", timeout=30)
    return board, watch, rb


def dl_files(board) -> list[str]:
    return [p for p in board.ls() if p.startswith(".mpypi/dl/")]


def stage_files(board) -> list[str]:
    return [p for p in board.ls() if p.startswith(".mpypi/stage/")]


def big_wheel(size: int, name: str = "big", version: str = "1.0"):
    # Incompressible: the wheel is as big as its file.
    return make_wheel(
        name, version, {"big/__init__.py": b"OK = 1\n", "big/blob.bin": os.urandom(size)}
    )


def test_a_chunked_wheel_and_a_chunked_src_file_install_at_the_board_heap(
    lane, app_board, boards, mqtt_client, broker, channel, heap_report
):
    board, watch, rb = start_v1(
        app_board, boards, mqtt_client, broker, channel, lane=lane, heap=lane.heap
    )
    wheel = cut(big_wheel(150 * K), 16 * K)
    user = cut(make_src("user_main.py", USER_V2 + b"#" * 5000), 1 * K)  # 6 chunks
    # The same bytes at another path: its own topics, its own download.
    twin = cut(make_src("data/twin.py", USER_V2 + b"#" * 5000), 1 * K)
    # Chunks of a package no list names: the device subscribes to none of them.
    ghost = cut(big_wheel(20 * K, name="ghost"), 4 * K)
    client = mqtt_client()
    for c in (wheel, user, twin, ghost):
        publish_chunked(client, c)
    publish_list(client, channel, [wheel.entry, user.entry, twin.entry], seq=3)
    rb.wait_for("USER v2 on framework", timeout=90)
    info = wait_info(watch, seq=3, result="ok")
    assert info["packages"].get("big") == "1.0"
    assert info["src"]["user_main.py"] == user.entry["pkg_sha256"]
    done = [s for s in watch.statuses if s.get("state") == "downloading"]
    size = wheel.entry["size"]
    end = {"state": "downloading", "package": "big", "done": size, "total": size}
    assert end in done, done
    assert not any("resumed_at" in s for s in done)  # nothing to resume
    out = rb.console()
    free = re.search(r"install boot; free heap (\d+)", out)
    heap_report(
        f"{lane.name} lane, {lane.heap} board: install boot "
        f"free heap {free and free.group(1)} bytes (chunked wheel and src file)"
    )
    rb.stop()
    assert dl_files(board) == [] and not pending(board)
    assert board.cat("data/twin.py") == board.cat("user_main.py")
    assert not any("ghost" in json.dumps(s) for s in watch.statuses)
    assert not any("ghost" in p for p in board.ls()) and "ghost" not in info["packages"]


def _swap(c: chunks.Chunked) -> dict:
    return {2: c.chunks[3], 3: c.chunks[2]}


# (what is wrong, what is published instead of the package's messages, the reason)
BAD = {
    "chunk of the wrong size": (
        lambda c: {"replace": {3: c.chunks[3][:-1]}},
        r"chunk 3 of big 1\.0: 1023 bytes published, 1024 expected",
    ),
    "chunk of the wrong hash": (
        lambda c: {"replace": {3: bytes(1024)}},
        r"chunk 3 of big 1\.0: SHA256 mismatch",
    ),
    "chunks out of order": (
        lambda c: {"replace": _swap(c)},
        r"chunk 2 of big 1\.0: SHA256 mismatch",
    ),
    "missing chunk": (
        lambda c: {"skip": (7,)},
        r"package not on the broker: big 1\.0 \(chunk 7\)",
    ),
    "hash list of the wrong size": (
        lambda c: {"replace": {"hashes": c.hashes[:-32]}},
        r"hash list of big 1\.0: \d+ bytes published, \d+ expected",
    ),
    "hash list of the wrong hash": (
        lambda c: {"replace": {"hashes": c.hashes[32:] + c.hashes[:32]}},
        r"hash list of big 1\.0: SHA256 mismatch",
    ),
    "missing hash list": (
        lambda c: {"skip": ("hashes",)},
        r"package not on the broker: big 1\.0 \(hash list\)",
    ),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_chunked_package_is_refused_and_nothing_changes(
    bad, app_board, boards, mqtt_client, broker, channel
):
    board, watch, rb = start_v1(app_board, boards, mqtt_client, broker, channel)
    c = cut(big_wheel(10 * K), 1 * K)
    assert c.entry["chunks"] >= 8
    damage, reason = BAD[bad]
    client = mqtt_client()
    publish_chunked(client, c, **damage(c))
    publish_list(client, channel, [c.entry], seq=4)
    failed = watch.wait_status(state="failed", timeout=30 + STALL_S)
    assert re.fullmatch(reason, failed["error"]), failed
    assert failed["package"] == "big"
    rb.wait_for("USER v1", timeout=30, count=2)  # the old set, booted again
    wait_info(watch, seq=4, result="failed")
    rb.stop()
    assert dl_files(board) == [] and stage_files(board) == []
    assert not any(p.startswith("lib/big") for p in board.ls())
    assert board.cat("user_main.py") == USER_V1


def test_a_chunk_count_that_disagrees_with_the_size_is_refused_before_a_download(
    app_board, boards, mqtt_client, broker, channel
):
    _, watch, rb = start_v1(app_board, boards, mqtt_client, broker, channel)
    c = cut(big_wheel(10 * K), 1 * K)
    client = mqtt_client()
    publish_chunked(client, c)
    publish_list(client, channel, [{**c.entry, "chunks": c.entry["chunks"] - 1}], seq=4)
    failed = watch.wait_status(state="failed")
    assert failed["error"] == "chunks disagrees with size and chunk_size", failed
    time.sleep(1)
    assert rb.boots() == 1 and "downloading" not in [s.get("state") for s in watch.statuses]


class Relay:
    """A TCP relay to the broker that counts what it hands the board, and on
    connection `on` (1: the app's, 2: the install boot's), once it has handed
    over `after` bytes, cuts the link ("cut") or stops forwarding ("hold") until
    release(), which cuts it then."""

    def __init__(self, broker, on: int, after: int, action: str) -> None:
        self.target = (broker.host, broker.port)
        self.on, self.after, self.action = on, after, action
        self.connections = 0
        self.sent: dict[int, int] = {}  # bytes handed to the board, per connection
        self.acted = threading.Event()
        self.released = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                board, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            n = self.connections
            self.sent[n] = 0
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(board, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, board, n), daemon=True).start()

    def _pipe(self, src, dst, n: int) -> None:
        try:
            while data := src.recv(4096):
                if n == self.on and self.sent[n] + len(data) > self.after:
                    data = data[: self.after - self.sent[n]]
                    dst.sendall(data)
                    self.sent[n] += len(data)
                    self.acted.set()
                    if self.action == "hold":
                        self.released.wait(120)  # the board waits, for what comes
                    break
                dst.sendall(data)
                if n:
                    self.sent[n] += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.close()


def publish_size(topic: str, payload: bytes) -> int:
    """The bytes of a QoS 1 PUBLISH of `payload` on `topic` (MQTT 3.1.1)."""
    rest = 2 + len(topic.encode()) + 2 + len(payload)
    return 1 + (1 if rest < 128 else 2 if rest < 16384 else 3) + rest


MIB = 1024 * 1024
CHUNK = 64 * K


@pytest.mark.parametrize("how", ["link drop", "broker restart", "power cut"])
def test_a_download_broken_at_half_resumes_from_the_last_chunk_on_flash(
    how, app_board, boards, mqtt_client, broker, broker_factory, channel
):
    # A 4 MiB src file in 64 KiB chunks; the install boot's connection (the
    # board's second) is cut, or held while the broker restarts or the power
    # goes, 2 MiB and half a chunk into the package. Counted at the relay: the
    # bytes handed to the board beyond one copy of everything are what it
    # downloaded again.
    if how == "broker restart":
        broker = broker_factory()  # its own, to restart
    action = "cut" if how == "link drop" else "hold"
    relay = Relay(broker, on=2, after=2 * MIB + CHUNK // 2, action=action)
    try:
        mqtt = {"server": "127.0.0.1", "port": relay.port}
        board = app_board(
            {"mqtt": mqtt, "update": {"channel": channel, "healthy_after_s": 1}},
            flash_size="16M",
        )
        watch = Watcher(mqtt_client(broker), board.device_id)
        rb = boards.start(board, heap=HEAP)
        rb.wait_for("USER v1", timeout=30)
        big = cut(make_src("big.bin", os.urandom(4 * MIB)), CHUNK)
        client = mqtt_client(broker)
        publish_chunked(client, big)
        publish_list(client, channel, [big.entry], seq=6)
        assert relay.acted.wait(60)
        if how == "broker restart":
            broker.stop()  # retained messages saved
            broker.start()
            watch = Watcher(mqtt_client(broker), board.device_id)  # a new session
            relay.release()  # the board finds its link gone
        if how == "power cut":
            time.sleep(0.5)
            rb.stop()
            files = board.ls()
            kept = [files[p] for p in dl_files(board) if not p.endswith(".h")]
            assert kept == [2 * MIB]  # every whole chunk, synced at its end
            rb = boards.start(board, heap=HEAP)
        wait_info(watch, timeout=120, seq=6, result="ok")
        rb.stop()
    finally:
        relay.close()
    assert sha256(board.cat("big.bin")) == big.entry["pkg_sha256"]
    assert dl_files(board) == [] and not pending(board)
    # The device's report: where it resumed, and the log line.
    watch.wait_status(state="downloading", package="big.bin", resumed_at=2 * MIB)
    assert "big.bin: resuming at chunk 32, byte 2097152" in rb.console()
    # The relay's count: everything after the app's first connection, less one
    # copy of every message of the package as MQTT frames it. What is left is
    # what came again, plus what is no package (the list, acks): an upper bound.
    handed = sum(n for c, n in relay.sent.items() if c != 1)
    again = handed - sum(publish_size(t, p) for t, p in big.messages())
    print(f"{how}: {handed} bytes handed to the board, {again} bytes downloaded again")
    assert 0 < again <= CHUNK, (again, relay.sent)


class LimitedEmbeddedBroker(EmbeddedBroker):
    """`mpy-blox broker --engine amqtt --max-packet-size SIZE`."""

    def __init__(self, directory, max_packet_size: int) -> None:
        super().__init__(directory)
        self.max_packet_size = max_packet_size

    def command(self) -> list[str]:
        return [*super().command(), "--max-packet-size", str(self.max_packet_size)]


LIMIT = 131072  # AWS IoT Core's 128 KB, as Mosquitto's max_packet_size


@pytest.fixture(params=["mosquitto", "embedded"])
def limited_broker(request, broker_factory, tmp_path):
    """A broker that ends the connection of any packet over 128 KiB."""
    if request.param == "mosquitto":
        yield broker_factory(f"max_packet_size {LIMIT}\nmessage_size_limit {LIMIT}")
        return
    if not amqtt_installed():
        pytest.skip("the embedded broker needs amqtt")
    with LimitedEmbeddedBroker(tmp_path / "embedded", LIMIT) as b:
        b.start()
        yield b


def test_a_4mib_wheel_and_a_1mib_src_file_install_through_a_broker_capped_at_128k(
    lane32, limited_broker, app_board, boards, mqtt_client, channel
):
    # Issue 15's broker limits: in 64 KiB chunks (the publisher's default) to an
    # ESP32's 100K heap; as one message each, both would be over the limit.
    wheel = cut(big_wheel(4 * MIB), chunks.DEFAULT_CHUNK_SIZE)
    src = cut(make_src("big.bin", os.urandom(MIB)), chunks.DEFAULT_CHUNK_SIZE)
    assert (wheel.entry["chunks"], src.entry["chunks"]) == (65, 16)
    board = app_board(settings(limited_broker, channel), flash_size="16M", lane=lane32)
    watch = Watcher(mqtt_client(limited_broker), board.device_id)
    rb = boards.start(board, heap=lane32.heap, lane=lane32)
    rb.wait_for("USER v1", timeout=30)
    client = mqtt_client(limited_broker)
    publish_chunked(client, wheel)
    publish_chunked(client, src)
    publish_list(client, channel, [wheel.entry, src.entry], seq=8)
    info = wait_info(watch, timeout=180, seq=8, result="ok")
    rb.stop()
    assert info["packages"].get("big") == "1.0"
    assert info["src"]["big.bin"] == src.entry["pkg_sha256"]
    assert sha256(board.cat("big.bin")) == src.entry["pkg_sha256"]
    assert dl_files(board) == []


def test_a_kept_download_goes_when_the_list_no_longer_names_its_package(
    app_board, boards, mqtt_client, broker, channel
):
    # The power goes while the install boot waits for chunk 8 of 16 (not
    # published yet); meanwhile a newer list replaces the one being installed.
    # The next install boot takes the newer list and deletes the download.
    board = app_board(settings(broker, channel, stall_s=30))
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    data = make_src("data.bin", os.urandom(64 * K))
    c = cut(data, 4 * K)
    client = mqtt_client()
    publish_chunked(client, c, skip=range(8, 16))
    publish_list(client, channel, [c.entry], seq=5)
    watch.wait_status(state="downloading", package="data.bin", done=32 * K)
    rb.stop()
    assert len(dl_files(board)) == 2  # the download and its hash list
    user = make_src("user_main.py", USER_V2)
    publish(client, topics.package_topic(user.entry), user.data)
    publish_list(client, channel, [user.entry], seq=6)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v2 on framework", timeout=60)
    wait_info(watch, seq=6, result="ok")
    rb.stop()
    assert dl_files(board) == [] and "data.bin" not in board.ls()
