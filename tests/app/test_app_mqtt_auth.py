"""MQTT credentials: mqtt.username from settings.json, mqtt.password from the secure store,
against a Mosquitto that requires them."""

import json
import re
import subprocess
import threading

import paho.mqtt.client as mqtt


def _password_broker(broker_factory, tmp_path):
    pwfile = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(pwfile), "device", "right-pw"],
        check=True,
        capture_output=True,
    )
    pwfile.chmod(0o600)
    return broker_factory(f"password_file {pwfile}", allow_anonymous=False)


def _watch_status(broker, board):
    """A paho client logged in to `broker`, collecting the board's status payloads."""
    seen = []
    event = threading.Event()

    def on_message(client, userdata, msg):
        seen.append(json.loads(msg.payload))
        event.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.username_pw_set("device", "right-pw")
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(f"mpypi/nodes/{board.device_id}/status", qos=1)
    client.loop_start()
    return client, seen, event


def test_mqtt_password_from_the_secure_store_logs_in(
    app_board, boards, broker_factory, settings_for, tmp_path
):
    broker = _password_broker(broker_factory, tmp_path)
    board = app_board(
        settings_for(
            broker, mqtt={"server": broker.host, "port": broker.port, "username": "device"}
        ),
        {"mqtt.password": "right-pw"},
    )
    client, seen, event = _watch_status(broker, board)
    try:
        rb = boards.start(board)
        rb.wait_for(r"mqtt: connected to")
        assert event.wait(20) and seen[-1]["state"] == "online"
        assert "refused" not in rb.console()
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_wrong_mqtt_password_is_reported_clearly_and_retried_with_backoff(
    app_board, boards, broker_factory, settings_for, tmp_path
):
    broker = _password_broker(broker_factory, tmp_path)
    board = app_board(
        settings_for(
            broker, mqtt={"server": broker.host, "port": broker.port, "username": "device"}
        ),
        {"mqtt.password": "wrong-pw"},
    )
    rb = boards.start(board)
    refused = (
        r"mqtt: connecting to [\d.]+:\d+ failed.*connection refused: "
        r"(not authori[sz]ed|bad user name or password)"
    )
    rb.wait_for(refused, count=3, timeout=30)
    out = rb.console()
    attempts = re.finditer(r"^W (\d+\.\d+) mqtt: connecting .* failed", out, re.MULTILINE)
    times = [float(m.group(1)) for m in attempts]
    assert len(times) >= 3
    # Backoff: the gaps between attempts grow (1 s, 2 s, ... with jitter, each at least half).
    assert times[2] - times[1] >= 0.5
    assert "wrong-pw" not in out  # the password itself never reaches the log
