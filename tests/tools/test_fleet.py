"""`mpy-blox status`: the fleet table from retained info/status topics."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mpy_blox_tools import fleet
from mpy_blox_tools.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


def _publish(client, topic, value):
    payload = value if isinstance(value, bytes) else json.dumps(value)
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)


def test_status_shows_devices_in_several_states(broker, mqtt_client, capsys):
    c = mqtt_client()
    base = "mpypi/nodes/esp32-%s/%s"
    _publish(
        c,
        base % ("000000000001", "info"),
        {
            "device_id": "esp32-000000000001",
            "framework": "0.7.0",
            "channel": "stable",
            "packages": {"mpy-blox": "0.7.0", "sensors": "1.2"},
            "mem_free": 51200,
            "fs_free": 1048576,
            "last_update": {"result": "ok"},
            "seq": 4,
        },
    )
    _publish(c, base % ("000000000001", "status"), {"state": "idle"})
    _publish(
        c,
        base % ("000000000002", "info"),
        {"framework": "0.6.0", "channel": "beta", "last_update": {"result": "failed"}},
    )
    _publish(c, base % ("000000000002", "status"), {"state": "failed", "error": "sha256 mismatch"})
    _publish(c, base % ("000000000003", "status"), {"state": "offline"})
    _publish(c, base % ("000000000004", "status"), b"{not json")
    url = f"mqtt://{broker.host}:{broker.port}"
    # Retained stand-ins answer no announce request: no time spent listening for one.
    assert cli(["status", "--broker", url, "--listen", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATE", "FRAMEWORK"]
    row1 = next(line for line in lines if "000000000001" in line)
    assert "idle" in row1 and "0.7.0" in row1 and "sensors 1.2" in row1 and "50K" in row1
    assert "1024K" in row1 and "stable" in row1 and " ok " in row1 + " "
    assert row1.endswith(" now")  # connected: its will has not fired
    row2 = next(line for line in lines if "000000000002" in line)
    assert "failed: sha256 mismatch" in row2 and "beta" in row2
    row3 = next(line for line in lines if "000000000003" in line)
    assert "offline" in row3 and row3.endswith(" -")  # no wall clock: not known when
    assert "unknown" in next(line for line in lines if "000000000004" in line)

    assert cli(["status", "--broker", url, "--json", "--listen", "0"]) == 0
    data = {d["device_id"]: d for d in json.loads(capsys.readouterr().out)}
    assert data["esp32-000000000001"]["packages"] == {"mpy-blox": "0.7.0", "sensors": "1.2"}
    assert data["esp32-000000000002"]["state"] == "failed"
    for n in range(1, 5):  # leave the session broker clean for other tests
        for kind in ("info", "status"):
            c.publish(base % ("%012d" % n, kind), b"", qos=1, retain=True).wait_for_publish(5)


def test_status_with_an_unreachable_broker_is_one_clear_line(capsys):
    from mpy_blox_tools.broker import free_port

    assert cli(["status", "--broker", f"mqtt://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mpy-blox: cannot reach the broker at mqtt://127.0.0.1:")
    assert err.rstrip().endswith("is a broker running? `mpy-blox broker` runs one here")
    assert err.count("\n") == 1


def test_mqtts_to_a_plain_port_says_the_port_may_not_speak_tls(broker, capsys):
    assert cli(["status", "--broker", f"mqtts://127.0.0.1:{broker.port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mpy-blox: cannot reach the broker at mqtts://127.0.0.1:{broker.port}")
    assert f"port {broker.port} may not speak TLS: mqtt:// for a plain port" in err, err
    assert err.count("\n") == 1


def test_status_with_refused_credentials_is_one_clear_line(broker_factory, tmp_path, capsys):
    import subprocess

    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "publisher", "right"], check=True)
    b = broker_factory(f"password_file {pwfile}", allow_anonymous=False)
    assert cli(["status", "--broker", f"mqtt://publisher:wrong@{b.host}:{b.port}"]) == 1
    err = capsys.readouterr().err
    assert "refused the connection: Not authorized" in err and err.count("\n") == 1


def test_broker_command_keeps_retained_messages_across_restarts(tmp_path):
    import signal
    import subprocess
    import sys

    import paho.mqtt.client as mqtt

    from mpy_blox_tools.broker import free_port, wait_for_port

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mpy_blox_tools.cli",
        "broker",
        "--port",
        str(port),
        "--dir",
        str(tmp_path / "b"),
    ]

    def client():
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.connect("127.0.0.1", port)
        c.loop_start()
        return c

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for_port("127.0.0.1", port, 10)
        c = client()
        c.publish("mpypi/channels/stable", b"[]", qos=1, retain=True).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)
    assert b"retained messages kept in" in p.stdout.read()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        assert wait_for_port("127.0.0.1", port, 10)
        from mpy_blox_tools import mqtt as host_mqtt

        c = host_mqtt.connect(host_mqtt.BrokerURL("127.0.0.1", port))
        got = host_mqtt.collect_retained(c, "mpypi/channels/#")
        host_mqtt.disconnect(c)
        assert got == {"mpypi/channels/stable": b"[]"}
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


def _cells(row: str) -> list[str]:
    return re.split(r"\s{2,}", row)


def _table(out: str) -> dict[str, dict[str, str]]:
    """Each device's row of a `status` table by column name: which columns there are
    depends on every device the broker holds (FIRMWARE only where one reports it)."""
    header, *rows = out.splitlines()
    names = _cells(header)
    return {r.split()[0]: dict(zip(names, _cells(r))) for r in rows}


APP_STATES = {
    # device: (info, status)
    "esp32-00000000a001": (
        {"framework": "0.2.0", "last_update": {"result": "trial", "at": 5}},
        {"state": "trial", "seq": 5, "left_s": 95},
    ),
    "esp32-00000000a002": (
        {
            "framework": "0.1.0",
            "last_update": {"result": "rolled_back", "at": 6, "error": "watchdog reset"},
        },
        {"state": "rolled_back", "seq": 6, "error": "watchdog reset"},
    ),
    "esp32-00000000a003": (
        {"framework": "0.2.0", "safe_mode": True, "last_update": {"result": "ok", "at": 5}},
        {"state": "safe_mode", "safe_mode": True, "error": "user_main failed 5 times in 60 s"},
    ),
}


def _plant_app_states(c) -> None:
    for device_id, (info, status) in APP_STATES.items():
        _publish(c, f"mpypi/nodes/{device_id}/info", info)
        _publish(c, f"mpypi/nodes/{device_id}/status", status)


def _clear_app_states(c) -> None:
    for device_id in APP_STATES:
        for kind in ("info", "status"):
            topic = f"mpypi/nodes/{device_id}/{kind}"
            c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)


def test_status_shows_trial_rollback_and_safe_mode_with_their_reasons(broker, mqtt_client, capsys):
    c = mqtt_client()
    _plant_app_states(c)
    try:
        url = f"mqtt://{broker.host}:{broker.port}"
        assert cli(["status", "--broker", url, "--listen", "0"]) == 0
        rows = _table(capsys.readouterr().out)
        # STATE, then LAST UPDATE: the update's own result, not the app's error.
        assert rows["esp32-00000000a001"]["STATE"] == "trial (95s left)"
        assert rows["esp32-00000000a001"]["LAST UPDATE"] == "trial"
        assert rows["esp32-00000000a002"]["STATE"] == "rolled_back: watchdog reset"
        assert rows["esp32-00000000a002"]["LAST UPDATE"] == "rolled_back: watchdog reset"
        assert rows["esp32-00000000a003"]["STATE"] == "safe_mode: user_main failed 5 times in 60 s"
        assert rows["esp32-00000000a003"]["LAST UPDATE"] == "ok"

        assert cli(["status", "--broker", url, "--json", "--listen", "0"]) == 0
        data = {d["device_id"]: d for d in json.loads(capsys.readouterr().out)}
        got = {k: (v["state"], v["reason"], v["left_s"], v["error"]) for k, v in data.items()}
        assert got["esp32-00000000a001"] == ("trial", "", 95, "")
        assert got["esp32-00000000a002"] == (
            "rolled_back",
            "watchdog reset",
            None,
            "watchdog reset",
        )
        assert got["esp32-00000000a003"] == (
            "safe_mode",
            "user_main failed 5 times in 60 s",
            None,
            "",
        )
    finally:
        _clear_app_states(c)


def test_status_watch_in_a_log_is_one_line_per_change_and_ctrl_c_exits_0(
    broker_factory, mqtt_client
):
    broker = broker_factory()  # its own: no other test's board comes and goes on it
    c = mqtt_client(broker)
    _plant_app_states(c)
    url = f"mqtt://{broker.host}:{broker.port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpy_blox_tools.cli", "status", "--watch", "--broker", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()

    def line() -> str:
        got = lines.get(timeout=15)
        assert re.match(r"\d\d:\d\d:\d\d ", got), got
        return got[9:].rstrip("\n")

    try:
        first = sorted(line() for _ in APP_STATES)
        assert first == [
            "esp32-00000000a001 trial (95s left) (last update trial)",
            "esp32-00000000a002 rolled_back: watchdog reset "
            "(last update rolled_back: watchdog reset)",
            "esp32-00000000a003 safe_mode: user_main failed 5 times in 60 s (last update ok)",
        ]
        # The trial device confirms: one line, for it alone.
        _publish(c, "mpypi/nodes/esp32-00000000a001/status", {"state": "ok", "seq": 5})
        assert line() == "esp32-00000000a001 ok (last update trial)"
        info = {"framework": "0.2.0", "last_update": {"result": "ok", "at": 5}}
        _publish(c, "mpypi/nodes/esp32-00000000a001/info", info)
        assert line() == "esp32-00000000a001 ok (last update ok)"
        assert lines.empty()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
        _clear_app_states(c)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_watch_in_a_terminal_redraws_the_table_and_counts_a_trial_down(
    broker_factory, mqtt_client
):
    from mpy_blox_tools import fleet, mqtt

    broker = broker_factory()  # its own: the table holds this test's device alone
    c = mqtt_client(broker)
    now = [500.0]
    term, stop = _Terminal(), threading.Event()
    url = mqtt.BrokerURL(broker.host, broker.port)
    t = threading.Thread(
        target=fleet.watch, args=(url, term, lambda: now[0], stop, 0.05), daemon=True
    )
    t.start()
    status = "mpypi/nodes/esp32-00000000a004/status"
    try:
        _until(lambda: term.getvalue())  # drawn once subscribed: what follows is live
        _publish(c, status, {"state": "trial", "seq": 3, "left_s": 40})
        _until(lambda: "trial (40s left)" in term.getvalue())
        now[0] += 15.2
        _until(lambda: "trial (25s left)" in term.getvalue())
        table = term.getvalue().rsplit("\x1b[", 1)[-1]  # the last drawing
        assert table.startswith("J" + "DEVICE"), table
        assert _cells(table.splitlines()[1])[:2] == ["esp32-00000000a004", "trial (25s left)"]
    finally:
        stop.set()
        t.join(10)
        c.publish(status, b"", qos=1, retain=True).wait_for_publish(5)


def test_status_watch_and_json_together_is_one_clear_line(capsys):
    assert cli(["status", "--watch", "--json"]) == 1
    err = capsys.readouterr().err
    assert err == "mpy-blox: --watch and --json do not go together: --json is one snapshot\n"


def _until(condition, limit: float = 10.0) -> None:
    # Waits for what the broker delivers; fails after `limit` (not a timing assert).
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end
        time.sleep(0.02)


def test_a_resumed_download_shows_where_it_resumed():
    status = {
        "state": "downloading",
        "package": "big.bin",
        "done": 3 * 1048576,
        "total": 4 * 1048576,
        "resumed_at": 2 * 1048576,
    }
    d = fleet.devices_from({"mpypi/nodes/esp32-000000000001/status": json.dumps(status).encode()})
    assert fleet.state_text(d[0]) == "downloading (big.bin 75% (3072K/4096K), resumed at 2048K)"
    status.update(resumed_at=None, done=0)
    d = fleet.devices_from({"mpypi/nodes/esp32-000000000001/status": json.dumps(status).encode()})
    assert fleet.state_text(d[0]) == "downloading (big.bin 0% (0K/4096K))"


def test_status_shows_the_firmware_column_only_where_devices_report_one():
    # From the rows fleet builds of retained reports (devices_from): no broker needed.
    def info(**extra) -> bytes:
        return json.dumps({"framework": "0.7.0", "channel": "stable", **extra}).encode()

    without = fleet.devices_from({"mpypi/nodes/esp32-000000000001/info": info()})
    assert "FIRMWARE" not in fleet.format_table(without)
    fw = {"partition": "ota_1", "version": "v1.22.2"}
    rows = fleet.devices_from(
        {
            "mpypi/nodes/esp32-000000000001/info": info(),
            "mpypi/nodes/esp32-000000000002/info": info(firmware=fw),
        }
    )
    lines = fleet.format_table(rows).splitlines()
    assert lines[0].split()[:4] == ["DEVICE", "STATE", "FRAMEWORK", "FIRMWARE"]
    assert lines[1].split()[:4] == ["esp32-000000000001", "online", "0.7.0", "-"]
    assert lines[2].split()[:5] == ["esp32-000000000002", "online", "0.7.0", "v1.22.2", "(ota_1)"]


def test_last_seen_of_an_offline_device_is_its_last_ts_and_json_has_it():
    info = {"device_id": "esp32-000000000011", "ts": 1767225600}
    base = "mpypi/nodes/esp32-%012d/%s"
    messages = {
        # offline (its will, no ts): the newest ts of its info and last status
        base % (11, "info"): json.dumps(info).encode(),
        base % (11, "status"): b'{"state": "offline"}',
        # connected: now, whatever its ts says
        base % (12, "info"): b'{"ts": 1767225600}',
        base % (12, "status"): b'{"state": "online", "ts": 1767225660}',
        # offline without a clock: not known when
        base % (13, "info"): b'{"device_id": "esp32-000000000013"}',
        base % (13, "status"): b'{"state": "offline"}',
    }
    for n, bad in enumerate(['"1767225600"', "true", "1767225600.5", "-5", "99999999999999"]):
        messages[base % (20 + n, "info")] = b'{"ts": %s}' % bad.encode()
        messages[base % (20 + n, "status")] = b'{"state": "offline"}'
    rows = {d.device_id[-2:]: d for d in fleet.devices_from(messages)}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1767225600))
    assert (rows["11"].last_seen, rows["11"].last_ts) == (when, 1767225600)
    assert (rows["12"].last_seen, rows["12"].last_ts) == ("now", 1767225660)
    assert (rows["13"].last_seen, rows["13"].last_ts) == ("", None)
    for n in range(5):  # a ts that is not an int of a plausible time is none
        assert (rows[str(20 + n)].last_seen, rows[str(20 + n)].last_ts) == ("", None)
    table = fleet.format_table(list(rows.values())).splitlines()
    assert next(r for r in table if "000000000011" in r).endswith(" " + when)
    assert next(r for r in table if "000000000013" in r).endswith(" -")
    data = {d["device_id"]: d for d in json.loads(fleet.as_json(list(rows.values())))}
    assert data["esp32-000000000011"]["last_seen"] == when
    assert data["esp32-000000000011"]["last_ts"] == 1767225600
    assert data["esp32-000000000013"]["last_ts"] is None
