"""`mpy-blox status`: the fleet table from retained info/status topics."""

from __future__ import annotations

import json

from mpy_blox_tools.cli import main as cli


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
    assert cli(["status", "--broker", url]) == 0
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

    assert cli(["status", "--broker", url, "--json"]) == 0
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
