"""The install boot, on boards with the framework compiled as the device wheel installs it.

A signed list accepted by the app's agent is installed by the next boot, which runs
only configuration, MQTT and the install core; then the board resets into the new code.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid

import pytest
from sntp_server import NO_NTP
from test_update_agent import Watcher, publish
from update_kit import REPO, make_src, make_wheel, sha256

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import build, micropython

# The heap edges' tests run one at a time under `make test`'s -n (one worker takes
# them all): two of them never share the cores, whose timing moves the edge.
pytestmark = pytest.mark.xdist_group("heap")

KEY = "fedcba9876543210" * 4
# Each lane's board heap (mpy_blox_tools.micropython): 100K on the 32-bit lane, as
# an ESP32; its 64-bit equivalent elsewhere. The heap tests run on both lanes at
# the board heap and at the margin heap below it (docs/protocol.md, "The install
# boot": where the heap goes); -s prints the free heap before the first download.
# The behaviour tests run on the 64-bit lane. `make heap` (bench/bench_heap.py)
# finds the edges the margin figures are derived from.
HEAP = micropython.format_size(micropython.BOARD_HEAP_64)
# What the staging gets back from the stopped MQTT client, at least: about two
# thirds of what was measured (64-bit: 23 KB more free at the staging than before
# the download; 32-bit: 15 KB).
CLIENT_HEAP = {"64-bit": 15000, "32-bit": 10000}
USER_V1 = b"async def user_main():\n    print('USER v1')\n"
USER_V2 = b"""
import asyncio
import mpy_blox
async def user_main():
    print("USER v2 on framework", mpy_blox.__version__)
    while True:
        await asyncio.sleep(1)
"""


@pytest.fixture(scope="module")
def framework_wheel():
    """mpy-blox 0.2.0 as the device wheel carries it: the same code, a new version."""
    files = build.compile_tree(REPO / "mpy_blox", "0.2.0", build.PLATFORMS["unix"])
    return make_wheel("mpy-blox", "0.2.0", files, tag="mpy6-bytecode-esp32", declare_tag=True)


@pytest.fixture
def channel():
    return f"ib-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def app_board(boards, full_mpy, broker, channel):
    """The whole framework compiled under /lib, main.py and the recovery module at the root."""

    def make(settings: dict | None = None, files: dict | None = None, **kwargs):
        settings = settings or {
            "mqtt": {"server": broker.host, "port": broker.port},
            **NO_NTP,
            "update": {"channel": channel, "healthy_after_s": 1},
        }
        board = boards.create(**kwargs)
        board.put_tree(full_mpy, "lib/mpy_blox")
        for path, data in {
            "main.py": (REPO / "main.py").read_bytes(),
            "mpypi_recover.mpy": (full_mpy.parent / "mpypi_recover.mpy").read_bytes(),
            "settings.json": json.dumps(settings).encode(),
            "provision.json": json.dumps({"update.key": KEY}).encode(),
            "user_main.py": USER_V1,
            **(files or {}),
        }.items():
            board.write(path, data)
        return board

    return make


def publish_update(client, channel, pkgs, seq, packages=None):
    for p in pkgs:
        publish(client, topics.package_topic(p.entry), (packages or {}).get(p.sha, p.data))
    to = f"channels/{channel}"
    publish(client, "mpypi/" + to, manifest.encode_list([p.entry for p in pkgs], seq, KEY, to))


def booted_on_v1(app_board, boards, mqtt_client, settings: dict | None = None, **start):
    """A board running USER v1 (the app), watched: (board, watcher, running board).

    `start`: boards.start's arguments (default: the 64-bit lane's board heap)."""
    board = app_board(settings)
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, **{"heap": HEAP, **start})
    rb.wait_for("USER v1", timeout=30)
    return board, watch, rb


def pending(board) -> bool:
    # NVS mpypi/ib (update/record.py): its first byte is the list topic, 0 for none.
    ib = board.nvs().get("mpypi", {}).get("ib", ["blob", "00"])[1]
    return bytes.fromhex(ib)[0] != 0


def states(watch: Watcher) -> list[str]:
    return [s.get("state") for s in watch.statuses]


def in_order(seen: list[str], wanted: list[str]) -> bool:
    it = iter(seen)
    return all(w in it for w in wanted)


def wait_info(watch: Watcher, timeout: float = 15, result=None, **fields) -> dict:
    """The latest info once it has `fields` (and last_update.result `result`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = watch.info.get("last_update") or {}
        if all(watch.info.get(k) == v for k, v in fields.items()) and (
            result is None or last.get("result") == result
        ):
            return watch.info
        time.sleep(0.1)
    raise TimeoutError(f"no info with {fields}; latest: {watch.info}")


@pytest.mark.parametrize("figure", ["board", "margin"])
def test_framework_upgrade_and_user_main_install_through_the_install_boot(
    figure, lane, app_board, boards, mqtt_client, channel, framework_wheel, heap_report
):
    # At the lane's board heap (32-bit: 100K, an ESP32's) and at its margin heap
    # below it (4K above the measured edge, mpy_blox_tools.micropython): the
    # install boot needs less than a board has.
    heap = lane.board_heap if figure == "board" else lane.margin_heap
    board, watch, rb = booted_on_v1(
        app_board, boards, mqtt_client, heap=micropython.format_size(heap), lane=lane
    )
    user = make_src("user_main.py", USER_V2)
    started = time.monotonic()
    publish_update(mqtt_client(), channel, [framework_wheel, user], seq=7)
    rb.wait_for("USER v2 on framework 0.2.0", timeout=120)
    elapsed = time.monotonic() - started
    info = wait_info(watch, seq=7, framework="0.2.0", result="ok")  # after its trial
    assert info["packages"] == {"mpy_blox": "0.2.0"}
    assert info["src"] == {"user_main.py": user.sha}
    assert info["last_update"]["result"] == "ok"
    # The trial publishes info, then status ok: on a busy machine the list of
    # states could be taken between the two.
    watch.wait_status(state="ok")
    seen = states(watch)
    assert in_order(
        seen,
        [
            "rebooting",
            "installing",
            "downloading",
            "verifying",
            "installing",
            "rebooting",
            "trial",
            "ok",
        ],
    ), seen
    assert watch.wait_status(state="rebooting", seq=7, install_boot=True)
    out = rb.console()
    assert rb.boots() == 3, out  # the app, the install boot, the new app
    free = re.search(r"install boot; free heap (\d+)", out)
    heap_report(
        f"{lane.name} lane, {micropython.format_size(heap)} board: install boot "
        f"free heap {free and free.group(1)} bytes; framework update end to end: "
        f"{elapsed:.1f} s"
    )
    rb.stop()
    assert not pending(board)
    assert board.nvs()["mpypi"]["seq"] == ["i32", 7]


def test_the_staging_gets_the_mqtt_clients_heap_back(
    lane, app_board, boards, mqtt_client, channel, framework_wheel, heap_report
):
    # At the lane's board heap (32-bit: 100K; 64-bit: 144K). While the client stayed
    # loaded for the staging the install boot needed 136K on the 64-bit lane
    # (docs/protocol.md "The install boot"); the stopped client is only freed by the
    # new loop between the phases.
    board = app_board()
    rb = boards.start(board, heap=lane.heap, lane=lane)
    rb.wait_for("USER v1", timeout=30)
    user = make_src("user_main.py", USER_V2)
    publish_update(mqtt_client(), channel, [framework_wheel, user], seq=7)
    rb.wait_for("USER v2 on framework 0.2.0", timeout=60)
    out = rb.console()
    before = int(re.search(r"install boot; free heap (\d+)", out).group(1))
    staging = int(re.search(r"staging; free heap (\d+)", out).group(1))
    heap_report(
        f"{lane.name} lane, {lane.heap} board: free heap {before} before the "
        f"download, {staging} staging"
    )
    assert staging > before + CLIENT_HEAP[lane.name], out  # the client's heap came back


def _packet_size(data: bytes) -> int:
    """The size of the MQTT packet at the start of `data`; 0 if its header is incomplete."""
    length, shift = 0, 0
    for i, byte in enumerate(data[1:5], start=1):
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return 1 + i + length
    return 0


class DroppingProxy:
    """A TCP relay to the broker that cuts connection number `drop_on` at its
    first SUBSCRIBE (as a broker may close a new connection while it ends the
    old session of the same client id)."""

    def __init__(self, broker, drop_on: int) -> None:
        self.target = (broker.host, broker.port)
        self.drop_on = drop_on
        self.connections = 0
        self.dropped = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(self.target)
            cut = self.connections == self.drop_on
            for args in ((client, upstream, cut), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=args, daemon=True).start()

    def _pipe(self, src, dst, cut: bool) -> None:
        pending = b""
        try:
            while data := src.recv(65536):
                if not cut:
                    dst.sendall(data)
                    continue
                pending += data
                while (size := _packet_size(pending)) and len(pending) >= size:
                    if pending[0] == 0x82:  # SUBSCRIBE
                        self.dropped.set()
                        raise OSError("cut")
                    dst.sendall(pending[:size])
                    pending = pending[size:]
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def test_a_link_lost_before_the_lists_suback_is_ridden_out(
    app_board, boards, broker, mqtt_client, channel
):
    # Connection 1 is the app's; 2 the install boot's, cut at its first SUBSCRIBE:
    # that of the list. The client subscribes again when it reconnects.
    proxy = DroppingProxy(broker, drop_on=2)
    try:
        mqtt = {"server": "127.0.0.1", "port": proxy.port}
        _, watch, rb = booted_on_v1(
            app_board,
            boards,
            mqtt_client,
            {"mqtt": mqtt, "update": {"channel": channel, "healthy_after_s": 1}},
        )
        user = make_src("user_main.py", USER_V2)
        publish_update(mqtt_client(), channel, [user], seq=5)
        rb.wait_for("USER v2 on framework", timeout=60)
        assert proxy.dropped.is_set()
        assert "subscribing to the list broke" in rb.console()
        assert wait_info(watch, seq=5, result="ok")
    finally:
        proxy.close()


def test_a_failing_install_boot_reports_failed_and_boots_the_app_without_looping(
    app_board, boards, mqtt_client, channel
):
    _, watch, rb = booted_on_v1(app_board, boards, mqtt_client)
    user = make_src("user_main.py", USER_V2)
    publish_update(
        mqtt_client(), channel, [user], seq=3, packages={user.sha: USER_V2.replace(b"v2", b"v3")}
    )
    watch.wait_status(state="failed", error="SHA256 mismatch", package="user_main.py")
    rb.wait_for("USER v1", timeout=30, count=2)
    wait_info(watch, seq=3)
    assert watch.info["last_update"]["result"] == "failed"
    # The retained list is seen again by the app: it must not install again.
    rb.wait_for("list seq 3 seen again: already done", timeout=30)
    assert rb.boots() == 3, rb.console()
    assert "USER v2" not in rb.console()


def test_an_install_boot_that_cannot_finish_gives_up_after_three_attempts(app_board, boards):
    # No broker: every install boot resets; the fourth start gives up and the app boots.
    settings = {"mqtt": {"server": "127.0.0.1", "port": 9, "wait_s": 1}, **NO_NTP}
    board = app_board(settings)
    (board.dir / "nvs.json").write_text(
        json.dumps({"mpypi": {"seq": ["i32", 4], "ib": ["blob", (b"\x01" + bytes(34)).hex()]}})
    )
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=60)
    out = rb.console()
    assert out.count("install boot without a broker") == 3, out
    assert "install boot did not finish in 3 attempts" in out
    assert rb.boots() == 5  # three install boots, the one that gives up, the app
    rb.stop()
    assert not pending(board)
    last = json.loads(board.cat(".mpypi/last.json"))
    assert last["result"] == "failed" and "3 attempts" in last["error"] and last["at"] == 4


def test_power_cut_during_the_install_boot_converges_to_the_new_set(
    app_board, boards, mqtt_client, channel, framework_wheel
):
    board, watch, rb = booted_on_v1(app_board, boards, mqtt_client)
    big = make_src("big.bin", os.urandom(512 * 1024))
    user = make_src("user_main.py", USER_V2)
    publish_update(mqtt_client(), channel, [framework_wheel, big, user], seq=9)
    watch.wait_status(state="downloading", package="big.bin")
    rb.stop()  # power off in the middle of the install boot
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v2 on framework 0.2.0", timeout=120)
    rb.stop()
    assert sha256(board.cat("big.bin")) == big.sha
    assert not pending(board)


def test_a_list_that_needs_nothing_costs_one_install_boot_and_reports_idle(
    app_board, boards, mqtt_client, channel
):
    # user_main.py in place and in the src index (a file in place that the index
    # lacks is recorded there: test_update_truth.py).
    index = json.dumps({"user_main.py": sha256(USER_V1)}).encode()
    board = app_board(files={".mpypi/src.json": index})
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    publish_update(mqtt_client(), channel, [make_src("user_main.py", USER_V1)], seq=2)
    watch.wait_status(state="idle")
    rb.wait_for("USER v1", timeout=30, count=2)
    assert wait_info(watch, seq=2, result="ok")
    assert "downloading" not in states(watch)
    rb.wait_for("list seq 2 seen again: already done", timeout=30)  # and not installed again
    assert rb.boots() == 3
