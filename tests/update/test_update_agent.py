"""The update agent over a real Mosquitto, on an app-managed virtual board."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid

import pytest
from sntp_server import NO_NTP
from update_kit import REPO, make_src, make_wheel, sha256

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import micropython

KEY = "0123456789abcdef" * 4
CHANNEL = "agent-test"
# The agent accepts lists in the app at 100K; the install boot that follows
# gets the 64-bit lane's board heap (docs/protocol.md, "The install boot"), the
# figure test_update_installboot.py checks on each lane.
HEAP = micropython.BOARD_HEAP_64
USER_MAIN_V2 = b"""
import asyncio
async def user_main():
    import demo_pkg
    print("USER v2 runs demo_pkg", demo_pkg.VERSION)
    while True:
        await asyncio.sleep(1)
"""


class Watcher:
    """Every `status` and the latest `info` of one device."""

    def __init__(self, client, device_id: str) -> None:
        self.info: dict = {}
        self.statuses: list[dict] = []
        self._cond = threading.Condition()
        client.on_message = self._on_message
        client.subscribe(f"mpypi/nodes/{device_id}/+", qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/cmd"):
            return
        payload = json.loads(msg.payload)
        with self._cond:
            if msg.topic.endswith("/info"):
                self.info = payload
            else:
                self.statuses.append(payload)
            self._cond.notify_all()

    def wait_status(self, timeout: float = 30, **fields) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for s in self.statuses:
                    if all(s.get(k) == v for k, v in fields.items()):
                        return s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no status {fields}; seen: {self.statuses[-8:]}")
                self._cond.wait(left)


@pytest.fixture(autouse=True)
def own_channel(monkeypatch):
    """A channel per test: a retained list a failed test leaves must not reach the next."""
    monkeypatch.setattr(sys.modules[__name__], "CHANNEL", f"agent-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def agent_board(boards, full_mpy, broker):
    def make(key: str | None = KEY, auto_update: bool = True):
        settings = {
            "mqtt": {"server": broker.host, "port": broker.port},
            **NO_NTP,
            "update": {"channel": CHANNEL, "auto_update": auto_update, "healthy_after_s": 1},
        }
        board = boards.create()
        board.put_tree(full_mpy, "lib/mpy_blox")
        files = {
            "main.py": (REPO / "main.py").read_bytes(),
            # compiled, as it should be deployed: the installer imports it
            # at commit time, when compiling 7 KB of source may not fit.
            "mpypi_recover.mpy": (full_mpy.parent / "mpypi_recover.mpy").read_bytes(),
            "settings.json": json.dumps(settings).encode(),
            "user_main.py": b"async def user_main():\n    print('USER v1')\n",
        }
        if key:
            files["provision.json"] = json.dumps({"update.key": key}).encode()
        for path, data in files.items():
            board.write(path, data)
        return board

    return make


def publish(client, topic: str, payload: bytes, retain: bool = True) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


def publish_update(client, pkgs, seq, key=KEY, to=None):
    to = to or f"channels/{CHANNEL}"
    for p in pkgs:
        publish(client, topics.package_topic(p.entry), p.data)
    payload = manifest.encode_list([p.entry for p in pkgs], seq, key, to if key else None)
    publish(client, "mpypi/" + to, payload)
    return payload


def test_signed_list_is_installed_over_mqtt_then_the_board_reboots_into_it(
    agent_board, boards, mqtt_client, broker
):
    board = agent_board()
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    pub = mqtt_client()
    w = make_wheel("demo-pkg", "1.0", {"demo_pkg/__init__.py": b"VERSION = '1.0'\n"})
    s = make_src("user_main.py", USER_MAIN_V2)
    payload = publish_update(pub, [w, s], seq=5)
    watch.wait_status(state="downloading", package="demo-pkg")
    watch.wait_status(state="rebooting", seq=5)
    rb.wait_for("USER v2 runs demo_pkg 1.0", timeout=30)
    assert rb.boots() == 3  # the app, the install boot, the new app
    assert board.nvs()["mpypi"]["seq"] == ["i32", 5]
    deadline = time.monotonic() + 10
    while (watch.info.get("last_update") or {}).get("result") != "ok" and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)  # the trial confirms the update
    assert watch.info["packages"] == {"demo_pkg": "1.0"}
    assert watch.info["src"] == {"user_main.py": s.sha}
    assert watch.info["last_update"]["result"] == "ok"

    # After the reboot the retained list is seen again: nothing downloaded.
    n = len(watch.statuses)
    rb.wait_for("list seq 5 seen again: already done", timeout=30)
    assert not any(st.get("state") == "downloading" for st in watch.statuses[n:])

    # Replayed (live), forged and unsigned lists are refused and reported.
    publish(pub, f"mpypi/channels/{CHANNEL}", payload, retain=False)
    watch.wait_status(state="failed", error="replayed or older list: seq 5, device at 5")
    forged = manifest.encode_list([s.entry], 6, "not the key", f"channels/{CHANNEL}")
    publish(pub, f"mpypi/nodes/{board.device_id}/cmd", forged, retain=False)
    watch.wait_status(state="failed", error="bad signature")
    publish(
        pub, f"mpypi/nodes/{board.device_id}/cmd", manifest.encode_list([s.entry]), retain=False
    )
    watch.wait_status(state="failed", error="unsigned list refused: this device has an update key")
    assert rb.boots() == 3
    publish(pub, f"mpypi/channels/{CHANNEL}", b"", retain=True)  # leave the broker clean


def test_tampered_package_is_refused_over_mqtt_and_the_board_keeps_its_code(
    agent_board, boards, mqtt_client
):
    board = agent_board()
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    pub = mqtt_client()
    s = make_src("user_main.py", USER_MAIN_V2)
    publish(pub, topics.package_topic(s.entry), USER_MAIN_V2.replace(b"v2", b"v3"))
    to = f"nodes/{board.device_id}/cmd"
    publish(pub, "mpypi/" + to, manifest.encode_list([s.entry], 1, KEY, to))
    watch.wait_status(state="failed", error="SHA256 mismatch", package="user_main.py")
    assert board_file_unchanged(rb)
    publish(pub, "mpypi/" + to, b"", retain=True)


def board_file_unchanged(rb) -> bool:
    rb.wait_for("USER v1", count=2)  # the install boot failed: the app is back
    rb.wait_for(r"list seq \d+ seen again: already done", timeout=30)  # and does not retry it
    return rb.boots() == 3 and "USER v2" not in rb.console()


def test_broker_killed_mid_download_the_update_installs_after_it_returns(
    boards, full_mpy, broker_factory, mqtt_client
):
    own = broker_factory()
    settings = {
        "mqtt": {"server": own.host, "port": own.port},
        **NO_NTP,
        "update": {"channel": CHANNEL, "auto_update": True, "healthy_after_s": 1},
    }
    board = boards.create(flash_size="16M")
    board.put_tree(full_mpy, "lib/mpy_blox")
    for path, data in {
        "main.py": (REPO / "main.py").read_bytes(),
        "mpypi_recover.mpy": (full_mpy.parent / "mpypi_recover.mpy").read_bytes(),
        "settings.json": json.dumps(settings).encode(),
        "provision.json": json.dumps({"update.key": KEY}).encode(),
        "user_main.py": b"async def user_main():\n    print('USER v1')\n",
    }.items():
        board.write(path, data)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    watch = Watcher(mqtt_client(own), board.device_id)
    big = make_src("big.bin", os.urandom(6 * 1024 * 1024))
    user = make_src("user_main.py", b"async def user_main():\n    print('USER v2')\n")
    pub = mqtt_client(own)
    publish_update(pub, [big, user], seq=3)
    watch.wait_status(state="downloading", package="big.bin")
    own.kill()  # no clean shutdown, no saved retained messages
    rb.wait_for("broken", timeout=30)  # the board saw the download cut
    own.start()
    pub = mqtt_client(own)
    publish_update(pub, [big, user], seq=3)  # the publisher republishes what was lost
    rb.wait_for("USER v2", timeout=60)
    out = rb.console()
    rb.stop()
    assert "broken" in out and "retrying" in out, out  # the download was cut, then retried
    assert sha256(board.cat("big.bin")) == big.sha


def test_without_auto_update_a_list_is_announced_and_an_offline_command_installs(
    agent_board, boards, mqtt_client
):
    board = agent_board(auto_update=False)
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    pub = mqtt_client()
    user = make_src("user_main.py", b"async def user_main():\n    print('USER v2')\n")
    publish_update(pub, [user], seq=2)
    deadline = time.monotonic() + 20
    while watch.info.get("available") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watch.info.get("available") == 2
    assert not any(s.get("state") == "downloading" for s in watch.statuses)
    rb.stop()
    # The device is off: a command for it waits, retained, on its cmd topic.
    to = f"nodes/{board.device_id}/cmd"
    publish_update(pub, [user], seq=3, to=to)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v2", timeout=40)
    publish(pub, "mpypi/" + to, b"")
    publish(pub, f"mpypi/channels/{CHANNEL}", b"")


# The agent on the unix port with the defaults of every setting, for its worker alone.
AGENT_PRELUDE = """
import asyncio
from mpy_blox.update import agent

class Config:
    def get_str(self, key, default=None):
        return default

    def get_bool(self, key, default=None):
        return default
"""

AGENT_HEAP_RETRY = (
    AGENT_PRELUDE
    + """
class Agent(agent.Agent):
    calls = 0

    async def _handle(self, payload, to, retained):
        Agent.calls += 1
        if Agent.calls <= FAILS:
            raise MemoryError("memory allocation failed, allocating 1148 bytes")
        print("handled", payload, to)

    async def _failed(self, error):
        print("failed:", error)

async def main():
    a = Agent(None, Config(), None)
    asyncio.create_task(a._worker())
    a.pending["channels/x"] = (b"list", True)
    a.wake.set()
    await asyncio.sleep_ms(2500)
    print("calls", Agent.calls)

asyncio.run(main())
"""
)


@pytest.mark.parametrize(("fails", "calls"), [(1, 2), (3, 4), (9, 4)])
def test_a_list_that_meets_a_memory_error_is_tried_again_a_few_times(run_mpy, fails, calls):
    # A busy app's heap is short for a moment (Home Assistant announcing its
    # entities as a list arrives): the list is tried again, 3 times at most.
    out = run_mpy(AGENT_HEAP_RETRY.replace("FAILS", str(fails)))
    assert f"calls {calls}" in out, out
    assert out.count("out of heap for the list on channels/x") == min(fails, 3)
    if fails <= 3:
        assert "handled b'list' channels/x" in out and "failed:" not in out
    else:
        assert "failed: MemoryError('memory allocation failed, allocating 1148 bytes',)" in out


AGENT_READ_RETRY = (
    AGENT_PRELUDE
    + """
class Msg:
    reads = 0

    def __init__(self, topic, payload):
        self.topic, self.payload, self.size, self.retain = topic, payload, len(payload), True

    async def read_buffer(self, cap):
        Msg.reads += 1
        if Msg.reads <= FAILS:
            raise MemoryError("memory allocation failed, allocating 289 bytes")
        return self.payload

class Client:
    async def subscribe(self, topic_filter, handler, qos=1):
        # As the broker does: the retained copy comes again with the SUBACK.
        print("subscribe", topic_filter)
        asyncio.create_task(handler(Msg(topic_filter, RETAINED)))

class Agent(agent.Agent):
    async def _handle(self, payload, to, retained):
        print("handled", payload, to)

    async def _failed(self, error):
        print("failed:", error)

async def main():
    a = Agent(Client(), Config(), None)
    asyncio.create_task(a._worker())
    await a._on_list(Msg("mpypi/channels/x", b"list 1"))
    await asyncio.sleep_ms(NEWER_AFTER_MS)
    if NEWER_AFTER_MS < 2000:
        await a._on_list(Msg("mpypi/channels/x", b"list 2"))
    await asyncio.sleep_ms(2500 - NEWER_AFTER_MS)
    print("reads", Msg.reads)

asyncio.run(main())
"""
)


@pytest.mark.parametrize(
    ("fails", "newer_after_ms", "handled"),
    [(1, 2000, "list 1"), (3, 2000, "list 1"), (9, 2000, None), (1, 100, "list 2")],
)
def test_a_list_with_no_heap_to_be_read_is_fetched_again_from_the_broker(
    run_mpy, fails, newer_after_ms, handled
):
    # The list's bytes could not even be allocated: nothing of it is held, so
    # the agent asks the broker for its retained copy again, a few times at most;
    # a newer list that came meanwhile is the one handled, never overwritten.
    script = AGENT_READ_RETRY.replace("FAILS", str(fails)).replace("RETAINED", "b'list 1'")
    out = run_mpy(script.replace("NEWER_AFTER_MS", str(newer_after_ms)))
    if handled is None:
        assert out.count("subscribe mpypi/channels/x") == 3, out
        assert "handled" not in out, out
        assert "failed: MemoryError('no heap to read the list',)" in out, out
    else:
        assert f"handled b'{handled}' channels/x" in out, out
        assert out.count("handled") == 1 and "failed:" not in out, out
    if newer_after_ms < 2000:
        assert "subscribe" not in out, out
