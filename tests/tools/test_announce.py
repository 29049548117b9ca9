"""`mpy-blox status` asks the devices to announce themselves (mpypi/announce).

Against a real Mosquitto, with paho clients standing in for devices that answer the
way mpy_blox/node.py does (the devices themselves answer in test_rabbitmq.py).
"""

from __future__ import annotations

import json
import secrets
import time

from mpy_blox import topics
from mpy_blox_tools import fleet, mqtt
from mpy_blox_tools.cli import main as cli


def _device_id() -> str:
    return "esp32-" + secrets.token_hex(6)


def _answering(mqtt_client, target, device_id: str, answers: list):
    """A stand-in device: answers each request with its info and status (retained)."""
    c = mqtt_client(target)

    def on_message(client, userdata, msg):
        answers.append(time.monotonic())
        info = {"device_id": device_id, "framework": "9.9.9", "mem_free": len(answers)}
        client.publish(topics.node_topic(device_id, "info"), json.dumps(info), 1, retain=True)
        client.publish(topics.node_topic(device_id, "status"), '{"state": "idle"}', 1, True)

    c.message_callback_add(topics.ANNOUNCE, on_message)
    c.subscribe(topics.ANNOUNCE, 0)
    return c


def _retain(client, device_id: str, leaf: str, value: dict) -> None:
    topic = topics.node_topic(device_id, leaf)
    client.publish(topic, json.dumps(value), qos=1, retain=True).wait_for_publish(5)


def test_status_takes_the_answers_and_stops_once_every_live_device_answered(
    broker_factory, mqtt_client
):
    b = broker_factory()
    device, answers = _device_id(), []
    _answering(mqtt_client, b, device, answers)
    c = mqtt_client(b)
    _retain(c, device, "info", {"framework": "1.0.0", "mem_free": 0})
    _retain(c, device, "status", {"state": "online"})
    _retain(c, _device_id(), "status", {"state": "offline"})  # not waited for
    time.sleep(0.2)  # the stand-in's subscription is in place
    began = time.monotonic()
    devices = {d.device_id: d for d in fleet.fetch(mqtt.BrokerURL(b.host, b.port), listen=5)}
    assert time.monotonic() - began < 2
    assert len(answers) == 1
    # Its answer, not the retained report read first.
    assert devices[device].framework == "9.9.9" and devices[device].state == "idle"


def test_a_device_known_only_by_its_answer_is_listed(broker_factory, mqtt_client):
    # As on RabbitMQ, where `status` gets no retained report through its wildcards:
    # here the answering device has none yet, and a silent one keeps status listening.
    b = broker_factory()
    device, silent, answers = _device_id(), _device_id(), []
    _answering(mqtt_client, b, device, answers)
    _retain(mqtt_client(b), silent, "status", {"state": "online"})
    time.sleep(0.2)
    began = time.monotonic()
    devices = {d.device_id: d for d in fleet.fetch(mqtt.BrokerURL(b.host, b.port), listen=1)}
    assert 1 <= time.monotonic() - began < 3
    assert devices[device].state == "idle" and devices[silent].state == "online"
    assert len(answers) == 1


def test_status_without_listening_sends_no_request(broker_factory, mqtt_client, capsys):
    b = broker_factory()
    answers: list = []
    _answering(mqtt_client, b, _device_id(), answers)
    time.sleep(0.2)
    assert cli(["status", "--broker", f"mqtt://{b.host}:{b.port}", "--listen", "0"]) == 0
    assert "no devices have reported" in capsys.readouterr().out
    time.sleep(0.3)
    assert answers == []


def test_a_bad_listen_time_is_one_clear_line(capsys):
    for bad in ("-1", "3601"):
        assert cli(["status", "--broker", "mqtt://127.0.0.1:1", "--listen", bad]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--listen {bad}: from 0" in err, err
