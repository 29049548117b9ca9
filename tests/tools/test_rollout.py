"""`mpy-blox rollout` (issue 17) on four virtual boards through a real Mosquitto.

The boards run the framework wheel the releases carry (so a release installs only its
user_main.py and a stage takes seconds), with short trials (`update.healthy_after_s` 1).
They are shared by the tests of this module, which run in order: each rollout starts
from the release the one before left on the channel. The twelve-board test has boards
of its own, on a channel of its own, under one `vboard fleet` supervisor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sntp_server import NO_NTP

from mpy_blox import topics
from mpy_blox_tools import build, fleet, mqtt, publish, rollout, wheel
from mpy_blox_tools import rollout_state as rs
from mpy_blox_tools.cli import main as cli
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard.process import RunningBoard

# In order, on one worker under `make test`'s -n: the tests share the module's boards
# and each starts from the release the one before left (with loadgroup alone, pytest-xdist
# spreads them over the workers, each with boards of its own and another order).
pytestmark = pytest.mark.xdist_group("rollout")

REPO = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef" * 4
CHANNEL = "ro-fleet"
BOARDS = 4
USER_MAIN = (
    "import asyncio\n\nasync def user_main():\n"
    "    print('{tag} running')\n    await asyncio.sleep(3600)\n"
)
CRASHING = "async def user_main():\n    raise ValueError('{tag} is broken')\n"


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key").write_text(KEY)


@pytest.fixture(scope="module")
def release_wheel(tmp_path_factory) -> Path:
    return build.build(platform="unix", out_dir=tmp_path_factory.mktemp("wheel"))


def _deploy(board, broker, channel: str, full_mpy: Path, release_wheel: Path) -> None:
    """The release wheel under /lib, main.py, settings on `channel`, the key, USER v1."""
    settings = {
        "mqtt": {"server": broker.host, "port": broker.port, "wait_s": 5},
        **NO_NTP,
        "update": {"channel": channel, "healthy_after_s": 1, "trial_s": 30},
        "app": {"restart_delay_ms": 100},
    }
    for name, data in wheel.read_wheel(release_wheel).items():
        board.write(f"lib/{name}", data)
    for path, data in {
        "main.py": (REPO / "main.py").read_bytes(),
        "mpypi_recover.mpy": (full_mpy.parent / "mpypi_recover.mpy").read_bytes(),
        "settings.json": json.dumps(settings).encode(),
        "provision.json": json.dumps({"update.key": KEY}).encode(),
        "user_main.py": USER_MAIN.format(tag="v1").encode(),
    }.items():
        board.write(path, data)


@pytest.fixture(scope="module")
def fleet_boards(tmp_path_factory, broker, full_mpy, release_wheel, board_lane):
    """Four boards on CHANNEL running USER v1, the release wheel installed under /lib."""
    from mpy_blox_tools.vboard.board import Board

    top = tmp_path_factory.mktemp("fleet")
    running = []
    for n in range(BOARDS):
        board = Board.create(top / f"b{n}", executable=board_lane.executable)
        _deploy(board, broker, CHANNEL, full_mpy, release_wheel)
        rb = RunningBoard(board, heap=board_lane.heap, executable=board_lane.executable)
        running.append(rb.start())
    try:
        for rb in running:
            rb.wait_for("v1 running", timeout=60)
        url = mqtt.BrokerURL(broker.host, broker.port)
        deadline = time.monotonic() + 30
        while sum(d.channel == CHANNEL for d in fleet.fetch(url)) < BOARDS:
            assert time.monotonic() < deadline, "the boards did not report their info"
            time.sleep(0.2)
        yield running
    finally:
        for rb in running:
            rb.stop()
        # The broker is the session's: other tests' `status` must not see this rollout.
        client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
        client.publish(rs.topic(CHANNEL), b"", qos=1, retain=True).wait_for_publish(10)
        mqtt.disconnect(client)


class Recorder:
    """Every live list the workstation sends: cmd lists by device, and the channel's."""

    def __init__(self, broker, channel: str = CHANNEL) -> None:
        self.client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
        self.sent: list[str] = []  # "cmd:<id>" or "channel", in the order they came
        self.lock = threading.Lock()
        self.client.on_message = self._on_message
        self.client.subscribe(
            [(topics.node_topic("+", "cmd"), 1), (topics.channel_topic(channel), 1)]
        )
        time.sleep(0.3)  # the retained ones arrive first and are left out

    def _on_message(self, client, userdata, msg) -> None:
        if msg.retain:
            return
        node = topics.parse_node(msg.topic)
        with self.lock:
            self.sent.append(f"cmd:{node[0]}" if node else "channel")

    def cmds(self) -> dict[str, int]:
        with self.lock:
            out: dict[str, int] = {}
            for s in self.sent:
                if s.startswith("cmd:"):
                    out[s[4:]] = out.get(s[4:], 0) + 1
            return out

    def wait_for(self, what: str, limit: float = 10) -> None:
        # The broker delivers to this client a little after the workstation's PUBACK.
        deadline = time.monotonic() + limit
        while what not in self.sent:
            assert time.monotonic() < deadline, f"no {what} list: {self.sent}"
            time.sleep(0.05)

    def close(self) -> None:
        mqtt.disconnect(self.client)


@pytest.fixture
def recorder(broker):
    r = Recorder(broker)
    yield r
    r.close()


def _release(tmp_path: Path, tag: str, body: str = USER_MAIN) -> list[str]:
    (tmp_path / "user_main.py").write_text(body.format(tag=tag))
    return ["--key-file", "key", "--extra-src-files", "user_main.py"]


def _start(broker, wheel_path, *more: str) -> list[str]:
    return [
        "rollout",
        "start",
        "--broker",
        broker.url,
        "--channel",
        CHANNEL,
        "--wheel",
        str(wheel_path),
        *more,
    ]


def _state(broker) -> dict | None:
    client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    try:
        payload = mqtt.collect_retained(client, rs.topic(CHANNEL)).get(rs.topic(CHANNEL))
    finally:
        mqtt.disconnect(client)
    return rs.decode(payload) if payload else None


def _infos(broker) -> dict[str, dict]:
    return {d.device_id: d.info for d in fleet.fetch(mqtt.BrokerURL(broker.host, broker.port))}


def _src_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _wait_state(broker, check, limit: float = 60) -> dict:
    deadline = time.monotonic() + limit
    while True:
        doc = _state(broker)
        if doc and check(doc):
            return doc
        assert time.monotonic() < deadline, f"rollout state never as wanted: {doc}"
        time.sleep(0.2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stages", "10%,5%,100%"], "5% does not grow from 10%"),
        (["--stages", "2,1,100%"], "1 does not grow from 2"),
        (["--stages", "0%,100%"], "0% is not a percentage in 1%..100%"),
        (["--stages", "1,150%"], "150% is not a percentage in 1%..100%"),
        (["--stages", "1,50%"], "the last stage is 100%"),
        (["--stages", "1,x,100%"], "'x' is not a count or a percentage"),
        (["--stages", "1,100%", "--max-failures", "two"], "--max-failures 'two'"),
        (["--stages", "1,100%", "--max-failures", "120%"], "--max-failures '120%'"),
        (["--stages", "1,100%", "--bake", "10 minutes"], "--bake '10 minutes'"),
    ],
)
def test_bad_inputs_are_refused_and_nothing_is_published(
    broker, tmp_path, recorder, capsys, flags, message
):
    (tmp_path / "user_main.py").write_text("x = 1\n")
    argv = _start(broker, "no-such.whl", "--extra-src-files", "user_main.py", *flags)
    assert cli([*argv[:5], "ro-bad", *argv[6:]]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("mpy-blox: ") and err.count("\n") == 1
    assert recorder.sent == []
    assert not mqtt.collect_retained(
        mqtt.connect(mqtt.BrokerURL(broker.host, broker.port)), rs.topic("ro-bad")
    )


def test_a_channel_with_no_devices_is_refused(broker, release_wheel, tmp_path, capsys):
    argv = _start(broker, release_wheel, "--stages", "1,100%", *_release(tmp_path, "v0"))
    assert cli([*argv[:5], "ro-nobody", *argv[6:]]) == 1
    assert "no device reports on channel ro-nobody" in capsys.readouterr().err
    assert cli(["rollout", "status", "--broker", broker.url, "--channel", "ro-nobody"]) == 1
    assert "no rollout on channel ro-nobody" in capsys.readouterr().err


def test_a_good_release_goes_out_stage_by_stage_then_on_the_channel(
    fleet_boards, broker, release_wheel, tmp_path, recorder, capsys
):
    argv = _start(broker, release_wheel, "--stages", "1,50%,100%", "--bake", "1s")
    assert cli([*argv, *_release(tmp_path, "v2")]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    ids = sorted(rb.board.device_id for rb in fleet_boards)
    order = rs.order(ids)
    # Progress per stage, then the summary: every device ok, in its stage.
    assert re.search(r"^stage 1/3 \(1\): 1 device\(s\), 1 sent, 1 confirmed, 0 failed", out, re.M)
    assert re.search(r"^stage 3/3 \(100%\): 2 device\(s\), 2 sent, 2 confirmed", out, re.M)
    assert "rollout on ro-fleet done" in out
    for d, stage in zip(order, ("1", "2", "3", "3")):
        assert re.search(rf"^{d}  {stage}      ok$", out, re.M), out
    # One cmd list per device, in the hash order by stage, and the channel list last.
    recorder.wait_for("channel")
    assert recorder.cmds() == {d: 1 for d in ids}
    assert recorder.sent[0] == f"cmd:{order[0]}"
    # The channel list last: its seq follows every cmd list's (MQTT orders one topic's
    # messages only, so the order they arrive in across topics proves nothing).
    doc = _state(broker)
    assert doc["channel_list"]["seq"] > max(v["seq"] for v in doc["devices"].values())
    for rb in fleet_boards:
        rb.wait_for("v2 running", timeout=30)
    infos = _infos(broker)
    assert all(
        infos[d]["src"]["user_main.py"] == _src_sha(USER_MAIN.format(tag="v2")) for d in ids
    )
    # `status` shows each device's rollout stage; --json has it.
    assert cli(["status", "--broker", broker.url, "--json"]) == 0
    rows = {r["device_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[order[0]]["rollout_stage"] == f"1/3 ok ({CHANNEL})"
    assert cli(["status", "--broker", broker.url]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].endswith("STAGE")
    assert re.search(rf"^{order[3]} .* 3/3 ok \({CHANNEL}\)$", table, re.M), table


def test_a_canary_that_rolls_back_halts_the_rollout_and_no_other_device_is_touched(
    fleet_boards, broker, release_wheel, tmp_path, recorder, capsys
):
    ids = sorted(rb.board.device_id for rb in fleet_boards)
    canary = rs.order(ids)[0]
    before = _infos(broker)
    argv = _start(broker, release_wheel, "--stages", "1,50%,100%", "--timeout", "60s")
    assert cli([*argv, *_release(tmp_path, "v3", CRASHING)]) == 1
    out = capsys.readouterr().out
    assert "stage 1/3 (1): 1 device(s), 1 sent, 0 confirmed, 1 failed" in out
    assert "rollout on ro-fleet halted: 1 failure(s), more than --max-failures 0" in out
    assert re.search(
        rf"^{canary}  1 +FAILED +rolled_back: user_main raised ValueError: v3 is broken$",
        out,
        re.M,
    ), out
    assert recorder.cmds() == {canary: 1} and "channel" not in recorder.sent
    after = _infos(broker)
    for d in ids[1:] if canary == ids[0] else [i for i in ids if i != canary]:
        assert after[d]["src"] == before[d]["src"] and after[d]["seq"] == before[d]["seq"]
    doc = _state(broker)
    assert doc["status"] == "halted" and doc["devices"][canary]["state"] == "failed"
    assert cli(["rollout", "resume", "--broker", broker.url, "--channel", CHANNEL]) == 1
    assert "is halted: nothing to resume" in capsys.readouterr().err


def _spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(cwd / "xdg")}
    return subprocess.Popen(
        [sys.executable, "-m", "mpy_blox_tools.cli", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# A workstation that kills itself (SIGKILL, nothing flushed or written after) at a
# chosen cmd list: before it goes out, or once the broker acknowledged it.
KILLED_AT = """
import os, signal, sys
from mpy_blox_tools import mqtt
from mpy_blox_tools.cli import main

when, nth = sys.argv[1], int(sys.argv[2])
original, lists = mqtt.publish_retained, [0]

def publish_retained(client, topic, payload, **kw):
    cmd = topic.endswith("/cmd")
    lists[0] += cmd
    if cmd and when == "before" and lists[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    original(client, topic, payload, **kw)
    if cmd and when == "after" and lists[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

mqtt.publish_retained = publish_retained
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    "tag, when, nth, sending",
    [
        # Stages 1, 50%, 100% of four boards send lists 1 | 2 | 3 4.
        ("v4a", "before", 2, 1),  # after stage 2's write-ahead, before its list
        ("v4b", "before", 4, 2),  # mid-stage: stage 3's first list out, its second not
        ("v4c", "after", 4, 2),  # stage 3's lists all out, before its `sent` write
    ],
)
def test_a_workstation_killed_at_any_list_of_a_stage_resumes_sending_each_list_once(
    fleet_boards, broker, release_wheel, tmp_path, recorder, capsys, tag, when, nth, sending
):
    ids = sorted(rb.board.device_id for rb in fleet_boards)
    argv = _start(broker, release_wheel, "--stages", "1,50%,100%", *_release(tmp_path, tag))
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT, when, str(nth), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # What the broker kept: the stage's devices written `sending` together, the lists
    # that went out retained on their cmd topics, the others not.
    doc = _state(broker)
    assert doc["status"] == "running"
    stuck = [d for d, v in doc["devices"].items() if v["state"] == "sending"]
    assert len(stuck) == sending, doc["devices"]
    out_already = nth if when == "after" else nth - 1
    deadline = time.monotonic() + 5  # the broker delivers a little after its PUBACK
    while sum(recorder.cmds().values()) < out_already and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(recorder.cmds().values()) == out_already, recorder.sent
    assert cli(["rollout", "resume", "--broker", broker.url, "--channel", CHANNEL,
                "--key-file", "key"]) == 0  # fmt: skip
    assert "rollout on ro-fleet done" in capsys.readouterr().out
    recorder.wait_for("channel")
    assert recorder.cmds() == {d: 1 for d in ids}, recorder.sent  # none twice, none skipped
    want = _src_sha(USER_MAIN.format(tag=tag))
    deadline = time.monotonic() + 30
    while any((_infos(broker)[d].get("src") or {}).get("user_main.py") != want for d in ids):
        assert time.monotonic() < deadline, "not every board runs the release"
        time.sleep(0.2)
    doc = _state(broker)
    assert {v["state"] for v in doc["devices"].values()} == {"ok"}


def test_a_workstation_killed_mid_stage_is_resumed_from_the_broker_without_sending_twice(
    fleet_boards, broker, release_wheel, tmp_path, recorder, capsys
):
    ids = sorted(rb.board.device_id for rb in fleet_boards)
    argv = _start(broker, release_wheel, "--stages", "1,50%,100%", "--bake", "1s")
    proc = _spawn([*argv, *_release(tmp_path, "v4")], tmp_path)
    try:
        # Killed once the second stage's list went out, before its device confirmed.
        doc = _wait_state(
            broker,
            lambda d: d["stage"] == 1 and any(v["stage"] == 1 for v in d["devices"].values()),
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    # The worst moment: killed after the list went out, before `sent` was written.
    doc = _state(broker)
    assert doc["status"] == "running"
    second = next(d for d, v in doc["devices"].items() if v["stage"] == 1)
    doc["devices"][second]["state"] = "sending"
    client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    client.publish(rs.topic(CHANNEL), rs.encode(doc), qos=1, retain=True).wait_for_publish()
    mqtt.disconnect(client)
    resume = ["rollout", "resume", "--broker", broker.url, "--channel", CHANNEL]
    assert cli(resume) == 1
    assert "sends signed lists: give its --key-file" in capsys.readouterr().err
    assert cli([*resume, "--key-file", "key"]) == 0
    out = capsys.readouterr().out
    assert "resuming the rollout on ro-fleet at stage 2" in out
    assert "rollout on ro-fleet done" in out
    recorder.wait_for("channel")
    assert recorder.cmds() == {d: 1 for d in ids}, recorder.sent
    doc = _state(broker)
    assert doc["channel_list"]["seq"] > max(v["seq"] for v in doc["devices"].values())
    infos = _infos(broker)
    assert all(
        infos[d]["src"]["user_main.py"] == _src_sha(USER_MAIN.format(tag="v4")) for d in ids
    )


def test_pause_stops_a_rollout_and_abort_revert_sends_the_previous_release_back(
    fleet_boards, broker, release_wheel, tmp_path, recorder, capsys
):
    ids = sorted(rb.board.device_id for rb in fleet_boards)
    canary = rs.order(ids)[0]
    argv = _start(broker, release_wheel, "--stages", "1,100%", "--bake", "1h")
    proc = _spawn([*argv, *_release(tmp_path, "v5")], tmp_path)
    v5 = _src_sha(USER_MAIN.format(tag="v5"))
    try:
        _wait_state(  # this rollout's canary confirmed: it bakes
            broker,
            lambda d: v5 in {e["pkg_sha256"] for e in d["entries"]} and d["stage_done_at"],
        )
        assert cli(["rollout", "pause", "--broker", broker.url, "--channel", CHANNEL]) == 0
        assert proc.wait(20) == 2
    finally:
        proc.kill()
    assert "rollout paused by another command" in proc.stdout.read()
    assert _infos(broker)[canary]["src"]["user_main.py"] == v5
    base = ["rollout", "abort", "--broker", broker.url, "--channel", CHANNEL]
    assert cli([*base, "--revert", "--key-file", "key"]) == 0
    assert "reverted 1 device(s) to the previous release" in capsys.readouterr().out
    # The canary goes back to v4 (the channel's list before this rollout); nobody else
    # got anything.
    v4 = _src_sha(USER_MAIN.format(tag="v4"))
    deadline = time.monotonic() + 30
    while (_infos(broker)[canary].get("src") or {}).get("user_main.py") != v4:
        assert time.monotonic() < deadline, "the canary was not reverted"
        time.sleep(0.2)
    assert recorder.cmds() == {canary: 2}
    assert _state(broker)["status"] == "aborted"
    assert cli(["rollout", "resume", "--broker", broker.url, "--channel", CHANNEL]) == 1
    assert "is aborted: nothing to resume" in capsys.readouterr().err


def test_a_device_that_never_answers_fails_after_the_timeout(
    broker, release_wheel, tmp_path, capsys
):
    # A device that reported on the channel once (its retained info), then went silent.
    ghost, channel = "esp32-0000000000fe", "ro-ghost"
    client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    info = json.dumps({"device_id": ghost, "channel": channel}).encode()
    client.publish(topics.node_topic(ghost, "info"), info, qos=1, retain=True).wait_for_publish()
    try:
        argv = _start(broker, release_wheel, "--stages", "100%", "--timeout", "2s", "--quiet")
        argv[5] = channel
        assert cli([*argv, *_release(tmp_path, "v9")]) == 1
        out = capsys.readouterr().out
        assert "stage 1/1" not in out  # --quiet: no progress, the summary as it failed
        assert f"rollout on {channel} halted: 1 failure(s), more than --max-failures 0" in out
        assert re.search(rf"^{ghost}  1 +FAILED +no answer in 2s$", out, re.M), out
        assert cli(["rollout", "status", "--broker", broker.url, "--channel", channel]) == 0
        assert re.search(rf"^{ghost}  1 +FAILED", capsys.readouterr().out, re.M)
        argv = ["rollout", "status", "--broker", broker.url, "--channel", channel, "--json"]
        assert cli(argv) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["status"] == "halted" and doc["order"] == [ghost]
        assert doc["devices"][ghost]["state"] == "failed"
    finally:
        for t in (topics.node_topic(ghost, "info"), rs.topic(channel)):
            client.publish(t, b"", qos=1, retain=True).wait_for_publish()
        mqtt.disconnect(client)


def test_stages_resolve_to_growing_device_counts_and_the_order_is_stable():
    plan = rs.parse_stages("1,10%,50%,100%")
    assert rs.targets(plan, 12) == [1, 2, 6, 12]
    assert rs.targets(plan, 4) == [1, 2, 4]  # 10% of 4 adds nobody after the canary
    assert rs.targets(rs.parse_stages("5,100%"), 3) == [3]
    assert rs.failure_limit("2", 50) == 2 and rs.failure_limit("10%", 50) == 5
    assert rs.failure_limit("10%", 9) == 0
    ids = [f"esp32-{n:012x}" for n in range(12)]
    assert rs.order(ids) == rs.order(reversed(ids)) != sorted(ids)


def test_resume_finds_a_chunked_package_again_on_the_broker(broker, tmp_path):
    from mpy_blox_tools import chunks
    from mpy_blox_tools.rollout import fetch_packages

    (tmp_path / "big.py").write_bytes(bytes(range(256)) * 20)  # 5120 bytes: 3 chunks
    package = publish.src_package(tmp_path / "big.py")
    cut = chunks.chunk(package.entry, package.data, 2048)
    client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    try:
        for t, payload in cut.messages():
            client.publish(t, payload, qos=1, retain=True).wait_for_publish()
        [got] = fetch_packages(client, [cut.entry])
        assert got.data == package.data and got.entry == package.entry  # no chunk fields
        missing = dict(cut.entry, pkg_sha256="0" * 64)
        with pytest.raises(MpyBloxError, match="not retained on the broker"):
            fetch_packages(client, [missing])
    finally:
        for t, _ in cut.messages():
            client.publish(t, b"", qos=1, retain=True).wait_for_publish()
        mqtt.disconnect(client)


def test_failures_within_max_failures_finish_the_rollout_but_exit_non_zero(
    broker, release_wheel, tmp_path, capsys
):
    ghost, channel = "esp32-0000000000fd", "ro-tolerant"
    client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    info = json.dumps({"device_id": ghost, "channel": channel}).encode()
    client.publish(topics.node_topic(ghost, "info"), info, qos=1, retain=True).wait_for_publish()
    try:
        argv = _start(broker, release_wheel, "--stages", "100%", "--timeout", "1s")
        argv[5] = channel
        assert cli([*argv, "--max-failures", "100%", *_release(tmp_path, "v10")]) == 1
        out = capsys.readouterr().out
        assert f"channel list published on mpypi/channels/{channel}" in out
        assert f"rollout on {channel} done: 1 failure(s), within --max-failures" in out
        assert re.search(rf"^{ghost}  1 +FAILED +no answer in 1s$", out, re.M), out
    finally:
        for t in (
            topics.node_topic(ghost, "info"),
            rs.topic(channel),
            topics.channel_topic(channel),
        ):
            client.publish(t, b"", qos=1, retain=True).wait_for_publish()
        mqtt.disconnect(client)


def test_the_release_flags_reach_publish_as_publish_takes_them():
    from mpy_blox_tools import rollout_cli
    from mpy_blox_tools.cli import build_parser

    args = build_parser().parse_args(
        ["rollout", "start", "--channel", "c", "--stages", "1,100%", "--chunk-size", "16K",
         "--expire", "2d", "--expires", "30d", "--force"]
    )  # fmt: skip
    kwargs = rollout_cli._publish_kwargs(args)
    assert kwargs["chunk_size"] == 16 * 1024 and kwargs["package_expiry"] == 2 * 86400
    assert kwargs["force"] is True
    assert abs(kwargs["expires"] - (time.time() + 30 * 86400)) < 60
    args = build_parser().parse_args(["rollout", "start", "--channel", "c", "--stages", "100%"])
    assert rollout_cli._publish_kwargs(args) == {"force": False}


class Writes:
    """The rollout's live writes of its state, by the stage each names, and how many
    times each package topic was published."""

    def __init__(self, broker, channel: str) -> None:
        self.client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
        self.stages: list[int] = []
        self.packages: dict[str, int] = {}
        self.topic = rs.topic(channel)
        self.client.on_message = self._on_message
        self.client.subscribe([(self.topic, 1), ("mpypi/packages/#", 1)])
        time.sleep(0.3)

    def _on_message(self, client, userdata, msg) -> None:
        if msg.retain:
            return
        if msg.topic == self.topic:
            doc = rs.decode(msg.payload)
            if doc is not None:
                self.stages.append(doc["stage"])
        else:
            self.packages[msg.topic] = self.packages.get(msg.topic, 0) + 1

    def by_stage(self) -> dict[int, int]:
        return {i: self.stages.count(i) for i in sorted(set(self.stages))}

    def close(self) -> None:
        mqtt.disconnect(self.client)


FLEET_CHANNEL = "ro-fleet12"
FLEET_BOARDS = 12  # about 9 s here on the 32-bit lane, boots included


def test_a_fleet_supervisor_s_boards_take_a_good_release_stage_by_stage(
    broker, full_mpy, release_wheel, board_lane, tmp_path, capsys
):
    """Issue 17's fleet test: 12 boards under one `vboard fleet` process, stages 1, 25%,
    100%: every board confirmed, one cmd list each, the channel list last."""
    count = FLEET_BOARDS
    from mpy_blox_tools.vboard.board import Board
    from mpy_blox_tools.vboard.process import RunningFleet

    template = Board.create(tmp_path / "template", executable=board_lane.executable)
    _deploy(template, broker, FLEET_CHANNEL, full_mpy, release_wheel)
    made = [
        template.clone(tmp_path / f"b{n}", device_id=f"esp32-0000000012{n:02x}")
        for n in range(count)
    ]
    ids = sorted(b.device_id for b in made)
    url = mqtt.BrokerURL(broker.host, broker.port)
    recorder = Recorder(broker, FLEET_CHANNEL)
    writes = Writes(broker, FLEET_CHANNEL)
    running = RunningFleet(made, heap=board_lane.heap, executable=board_lane.executable)
    try:
        running.start()
        for fb in running.boards:
            fb.wait_for("v1 running", timeout=90)
        deadline = time.monotonic() + 30
        while sum(d.channel == FLEET_CHANNEL for d in fleet.fetch(url)) < count:
            assert time.monotonic() < deadline, "the boards did not report their info"
            time.sleep(0.2)
        argv = _start(broker, release_wheel, "--stages", "1,25%,100%", "--timeout", "120s")
        argv[5] = FLEET_CHANNEL
        assert cli([*argv, *_release(tmp_path, "v2")]) == 0, capsys.readouterr()
        out = capsys.readouterr().out
        targets = rs.targets(rs.parse_stages("1,25%,100%"), count)
        for n, (before, after) in enumerate(zip([0, *targets], targets), 1):
            added = after - before
            line = (
                rf"^stage {n}/3 \([^)]*\): {added} device\(s\), {added} sent, {added} confirmed, "
            )
            assert re.search(line, out, re.M), out
        assert f"rollout on {FLEET_CHANNEL} done" in out
        assert len(re.findall(r"^esp32-\w+  \d      ok$", out, re.M)) == count, out
        recorder.wait_for("channel")
        assert recorder.cmds() == {d: 1 for d in ids}
        assert recorder.sent[0] == f"cmd:{rs.order(ids)[0]}"
        client = mqtt.connect(url)
        try:
            t = rs.topic(FLEET_CHANNEL)
            doc = rs.decode(mqtt.collect_retained(client, t)[t])
        finally:
            mqtt.disconnect(client)
        assert doc["status"] == "done" and len(doc["stage_s"]) == 3
        # The state is written a few times a stage, whatever its size (1, 2 and 9
        # devices here), not about three times a device as it was (sending, sent,
        # outcome). And each package went out once, not once a stage.
        per_stage = writes.by_stage()
        for i, took in enumerate(doc["stage_s"]):
            assert per_stage[i] <= 6 + math.ceil(took / rollout.SAVE_EVERY_S), per_stage
        assert sum(per_stage.values()) < 2 * count, per_stage
        assert writes.packages and max(writes.packages.values()) == 1, writes.packages
        assert doc["channel_list"]["seq"] > max(v["seq"] for v in doc["devices"].values())
        for fb in running.boards:
            fb.wait_for("v2 running", timeout=30)
        v2 = _src_sha(USER_MAIN.format(tag="v2"))
        infos = {d.device_id: d.info for d in fleet.fetch(url) if d.device_id in ids}
        assert {d: i["src"]["user_main.py"] for d, i in infos.items()} == {d: v2 for d in ids}
    finally:
        running.stop()
        recorder.close()
        writes.close()
        client = mqtt.connect(url)
        for t in (rs.topic(FLEET_CHANNEL), topics.channel_topic(FLEET_CHANNEL)):
            client.publish(t, b"", qos=1, retain=True).wait_for_publish(10)
        for d in ids:
            for kind in ("info", "status"):
                client.publish(topics.node_topic(d, kind), b"", qos=1, retain=True)
        mqtt.disconnect(client)
