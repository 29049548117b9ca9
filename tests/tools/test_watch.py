"""`publish --wait` and `--json` against a device that reports as docs/protocol.md says.

The device here is a paho client on the real Mosquitto: it takes the list from its
`cmd` topic and answers on its retained `status` and `info`, with the trial boot and
rollback messages of issue 14 (trial-spec: `status` `trial` with `left_s`, `ok` with the
seq; `last_update` `trial`, `ok` or `rolled_back` naming the list by `at` and `list`).
A virtual board doing the same end to end is in tests/tools/test_fleet_update.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import threading
import time

import pytest

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import build, publish, watch
from mpy_blox_tools.cli import main as cli

KEY = "w" * 64
USER_MAIN = b"async def user_main():\n    pass\n"
USER_MAIN_SHA = hashlib.sha256(USER_MAIN).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build.build(out_dir=tmp_path_factory.mktemp("dist"))


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key").write_text(KEY)
    (tmp_path / "user_main.py").write_bytes(USER_MAIN)


class Device:
    """Answers each list on its cmd topic with `script(list) -> [(leaf, body)]`,
    published retained at QoS 1 as a device does; clears them at the end."""

    def __init__(self, client, script, signed: bool = True, trust=None):
        self.id = "esp32-" + secrets.token_hex(6)
        self.client, self.script = client, script
        self.trust = trust or (KEY if signed else None)
        self.got = threading.Event()
        client.message_callback_add(topics.node_topic(self.id, "cmd"), self._on_cmd)
        client.subscribe(topics.node_topic(self.id, "cmd"), qos=1)

    def _on_cmd(self, client, userdata, msg):
        if not msg.payload:
            return
        got = manifest.decode(msg.payload, self.trust)
        lst = {"seq": got.seq, "entries": got.entries}
        lst["digest"] = hashlib.sha256(msg.payload).hexdigest()
        for leaf, body in self.script(lst):
            # From paho's network thread: publish, don't wait (that would block it).
            client.publish(topics.node_topic(self.id, leaf), json.dumps(body), qos=1, retain=True)
        self.got.set()

    def clear(self):
        for leaf in ("cmd", "info", "status"):
            topic = topics.node_topic(self.id, leaf)
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)


def installed(lst, result, **last) -> dict:
    """An info with every package of the list installed and last_update `result`."""
    packages = {e["name"]: e["version"] for e in lst["entries"] if e["type"] == "wheel"}
    src = {e["path"]: e["pkg_sha256"] for e in lst["entries"] if e["type"] == "src"}
    return {
        "packages": packages,
        "src": src,
        "seq": lst["seq"],
        "last_update": {"result": result, "at": lst["seq"], "list": lst["digest"], **last},
    }


OLD_INFO = {"packages": {"mpy-blox": "0.0.1"}, "src": {}, "seq": 1}


def run_publish(broker, device, *extra, signed=True):
    args = ["publish", "--broker", broker.url, "--wheel", str(device.wheel)]
    args += ["--key-file", "key"] if signed else []
    args += ["--device-ids", device.id, "--extra-src-files", "user_main.py", *extra]
    try:
        return cli(args)
    finally:
        device.clear()


@pytest.fixture
def device(mqtt_client, wheel):
    made = []

    def make(script, signed=True, trust=None):
        d = Device(mqtt_client(), script, signed, trust)
        d.wheel = wheel
        made.append(d)
        return d

    yield make
    for d in made:
        d.clear()


def _row(out: str, device_id: str) -> str:
    return next(line for line in out[out.index("DEVICE") :].splitlines() if device_id in line)


def test_a_device_on_trial_is_in_progress_until_it_confirms(broker, device, capsys):
    def script(lst):
        return [
            ("status", {"state": "rebooting", "seq": lst["seq"], "install_boot": True}),
            ("info", installed(lst, "trial")),  # the trial boot: the new set, not confirmed
            ("status", {"state": "trial", "seq": lst["seq"], "left_s": 120}),
            ("info", installed(lst, "ok")),
            ("status", {"state": "ok", "seq": lst["seq"]}),
        ]

    d = device(script)
    assert run_publish(broker, d, "--wait", "30") == 0
    out = capsys.readouterr().out
    assert f"{d.id:<20} trial (120s left)\n" in out, out  # a log line: as the device said
    version = publish.wheel_package(d.wheel).entry["version"]
    detail = f"mpy-blox {version}, user_main.py {USER_MAIN_SHA[:8]}"
    assert _row(out, d.id) == f"{d.id}  ok      {detail}"


def test_a_device_that_stays_on_trial_is_not_done(broker, device, capsys):
    def script(lst):
        return [
            ("info", installed(lst, "trial")),
            ("status", {"state": "trial", "seq": lst["seq"], "left_s": 120}),
        ]

    d = device(script)
    assert run_publish(broker, d, "--wait", "2") == 1
    row = _row(capsys.readouterr().out, d.id)
    assert re.fullmatch(
        rf"{d.id}  FAILED  timed out after 2s in state trial \(11[89]s left\)", row
    ), row


def test_a_device_that_rolls_back_fails_with_the_reason(broker, device, capsys):
    reason = "user_main raised ValueError('boom')"

    def script(lst):
        return [
            ("info", installed(lst, "trial")),
            ("status", {"state": "trial", "seq": lst["seq"], "left_s": 120}),
            ("status", {"state": "rolled_back", "seq": lst["seq"], "error": reason}),
            ("info", {**OLD_INFO, "last_update": installed(lst, "rolled_back")["last_update"]}),
        ]

    d = device(script)
    assert run_publish(broker, d, "--wait", "30") == 1
    out = capsys.readouterr().out
    assert _row(out, d.id) == f"{d.id}  FAILED  rolled_back: {reason}"


@pytest.mark.parametrize("signed", [True, False], ids=["by seq", "by digest"])
def test_an_info_naming_this_list_rolled_back_is_a_failure_without_its_status(
    broker, device, capsys, signed
):
    # The status went missing (or was overwritten by a reconnect's online): the
    # live info still names the list, by its seq (signed) or its SHA256 (unsigned).
    def script(lst):
        last = {"result": "rolled_back", "error": "watchdog reset"}
        last.update({"at": lst["seq"]} if signed else {"at": None, "list": lst["digest"]})
        return [("status", {"state": "online"}), ("info", {**OLD_INFO, "last_update": last})]

    d = device(script, signed)
    assert run_publish(broker, d, "--wait", "30", signed=signed) == 1
    assert _row(capsys.readouterr().out, d.id) == f"{d.id}  FAILED  rolled_back: watchdog reset"


def test_a_rollback_of_another_list_is_not_this_lists_failure(broker, device, capsys):
    def script(lst):
        older = {"result": "rolled_back", "at": lst["seq"] - 1, "list": "0" * 64, "error": "x"}
        return [
            ("status", {"state": "rolled_back", "seq": lst["seq"] - 1, "error": "x"}),
            ("info", {**OLD_INFO, "last_update": older}),
            ("info", installed(lst, "ok")),  # a device without trial boots: ok at once
        ]

    d = device(script)
    assert run_publish(broker, d, "--wait", "30") == 0
    assert _row(capsys.readouterr().out, d.id).split()[1] == "ok"


def test_publish_json_is_one_document_on_stdout_with_progress_on_stderr(broker, device, capsys):
    def script(lst):
        trial = {"state": "trial", "seq": lst["seq"], "left_s": 9}
        return [("status", trial), ("info", installed(lst, "ok"))]

    d = device(script)
    assert run_publish(broker, d, "--wait", "30", "--json") == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    entry = publish.wheel_package(d.wheel).entry
    assert doc["ok"] is True and doc["lists"] == [f"mpypi/nodes/{d.id}/cmd"]
    assert doc["devices"] == [
        {
            "device": d.id,
            "result": "ok",
            "state": "ok",
            "detail": f"mpy-blox {entry['version']}, user_main.py {USER_MAIN_SHA[:8]}",
            "versions": {
                "packages": {"mpy-blox": entry["version"]},
                "src": {"user_main.py": USER_MAIN_SHA},
            },
        }
    ]
    assert f"{d.id:<20} trial (9s left)\n" in captured.err
    assert "DEVICE" in captured.err and "published 2 package(s)" in captured.err


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _until(condition, what: str, limit: float = 10.0) -> None:
    # Waits for something the broker delivers; fails after `limit` (no timing assert).
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def test_in_a_terminal_the_trial_counts_down_in_place(broker, mqtt_client):
    from mpy_blox_tools import mqtt

    clock, term = Clock(), Terminal()
    device_id = "esp32-" + secrets.token_hex(6)
    w = watch.Watcher([], clock=clock)
    client = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    dev = mqtt_client()
    status = topics.node_topic(device_id, "status")
    result = []
    t = threading.Thread(target=lambda: result.append(w.wait(3600, term)), daemon=True)
    try:
        w.attach(client, (device_id,))
        # The broker handles one connection's packets in order: once this is
        # acknowledged, the subscription is in place and the device's report is live.
        client.publish("mpypi/test/probe", b"", qos=1).wait_for_publish(5)
        w.expect_list(7, b"the list")
        t.start()
        dev.publish(status, json.dumps({"state": "trial", "seq": 7, "left_s": 30}), 1, True)
        _until(lambda: "trial (30s left)" in term.getvalue(), "the trial is shown")
        clock.now += 12.5
        w.changed.set()
        _until(lambda: "trial (18s left)" in term.getvalue(), "it counts down")
        assert f"\x1b[1F\x1b[J{device_id:<20} trial (18s left)\n" in term.getvalue()
        body = {"state": "rolled_back", "seq": 7, "error": "health() returned False"}
        dev.publish(status, json.dumps(body), 1, True).wait_for_publish(5)
        t.join(10)
        assert result == [False]
        assert term.getvalue().endswith(
            f"\x1b[1F\x1b[J{device_id:<20} rolled_back  rolled_back: health() returned False\n"
        )
    finally:
        clock.now += 7200  # past its deadline: the wait ends even if the test failed
        w.changed.set()
        if t.is_alive():
            t.join(10)
        dev.publish(status, b"", 1, True).wait_for_publish(5)
        mqtt.disconnect(client)


@pytest.mark.parametrize("rolls_back", [True, False], ids=["trial boots", "no trial boots"])
def test_the_demos_broken_user_main_step_expects_a_rollback(
    broker, device, tmp_path, capsys, rolls_back
):
    # The demo's step 6 against a device that behaves as trial-spec says, and
    # against one without trial boots (today's), which runs the broken user_main.
    from mpy_blox_tools import demo, keys, mqtt

    pub = keys.generate(tmp_path / "release.key").public_hex
    seen = []

    def script(lst):
        (src,) = [e for e in lst["entries"] if e["type"] == "src"]
        seen.append(src)
        if not rolls_back:
            return [("info", installed(lst, "ok"))]
        error = "user_main raised RuntimeError('broken on purpose by the demo')"
        return [
            ("info", installed(lst, "trial")),
            ("status", {"state": "trial", "seq": lst["seq"], "left_s": 120}),
            ("status", {"state": "rolled_back", "seq": lst["seq"], "error": error}),
        ]

    d = device(script, trust=manifest.Trust(pubkeys=[bytes.fromhex(pub)]))
    url = mqtt.BrokerURL(broker.host, broker.port)
    got = demo.roll_back_broken(url, tmp_path / "release.key", d.id, d.wheel, tmp_path, 30)
    out, err = capsys.readouterr()
    broken = demo.BROKEN_USER_MAIN.encode()
    assert seen[0]["path"] == "user_main.py"
    assert seen[0]["pkg_sha256"] == hashlib.sha256(broken).hexdigest()
    if rolls_back:
        assert got is True and err == ""
        reason = "rolled_back: user_main raised RuntimeError('broken on purpose by the demo')"
        assert _row(out, d.id) == f"{d.id}  FAILED  {reason}"
        assert out.rstrip().endswith(f"as expected: {d.id} {reason}")
    else:
        assert got is False
        assert err.startswith(f"mpy-blox: {d.id} did not roll the broken user_main.py back (ok: ")


def test_download_progress_is_in_bytes_for_a_small_file_and_in_k_for_a_large_one(
    broker, device, capsys
):
    def script(lst):
        down = {"state": "downloading", "package": "user_main.py", "done": 16, "total": 32}
        big = {"state": "downloading", "package": "mpy-blox", "done": 307200, "total": 599040}
        return [("status", down), ("status", big), ("info", installed(lst, "ok"))]

    d = device(script)
    assert run_publish(broker, d, "--wait", "30") == 0
    out = capsys.readouterr().out
    assert f"{d.id:<20} downloading  user_main.py 50% (16/32 bytes)\n" in out
    assert f"{d.id:<20} downloading  mpy-blox 51% (300K/585K)\n" in out


def test_an_ok_info_about_another_set_is_not_this_lists_outcome(broker, device, capsys):
    # A board deployed over USB confirms that set's trial and says "ok" with the
    # versions this list has too, then refuses the list itself (found with
    # test_fleet_update's refusing device): the refusal is the outcome.
    def script(lst):
        confirmed = {**installed(lst, "ok"), "last_update": {"result": "ok", "at": None}}
        refused = {"state": "failed", "error": "unsigned list: this device needs a signed one"}
        return [("info", confirmed), ("status", refused)]

    d = device(script, signed=False)
    assert run_publish(broker, d, "--wait", "30", signed=False) == 1
    row = _row(capsys.readouterr().out, d.id)
    assert row == f"{d.id}  FAILED  failed: unsigned list: this device needs a signed one"


def test_the_trial_of_an_earlier_update_is_shown_as_such(broker, device, capsys):
    # A device on trial holds new lists until the verdict (docs/protocol.md): its
    # trial is not this list's, and its confirmation is not this list's outcome.
    def script(lst):
        earlier = lst["seq"] - 1
        return [
            ("status", {"state": "trial", "seq": earlier, "left_s": 50}),
            ("status", {"state": "ok", "seq": earlier}),
            ("info", installed(lst, "trial")),
            ("status", {"state": "trial", "seq": lst["seq"], "left_s": 120}),
            ("info", installed(lst, "ok")),
        ]

    d = device(script)
    assert run_publish(broker, d, "--wait", "30") == 0
    out = capsys.readouterr().out
    seq = int(re.search(r"list seq (\d+) ->", out)[1])
    waits = f"seq {seq - 1}, an earlier update: this list waits for its verdict"
    assert f"{d.id:<20} trial (50s left) {waits}\n" in out, out
    assert f"{d.id:<20} ok           seq {seq - 1}, an earlier update\n" in out  # not done yet
    assert f"{d.id:<20} trial (120s left)\n" in out
    assert _row(out, d.id).split()[1] == "ok"
