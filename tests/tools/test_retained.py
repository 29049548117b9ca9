"""Reading what the broker retains: ended by the broker's UNSUBACK, not by a quiet period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mpy_blox.update import manifest
from mpy_blox_tools import mqtt, publish
from mpy_blox_tools.broker import free_port, wait_for_port
from mpy_blox_tools.errors import MpyBloxError

KEY = b"k" * 64


def _retain(client, messages: dict[str, bytes]) -> None:
    infos = [client.publish(t, p, qos=1, retain=True) for t, p in messages.items()]
    for info in infos:
        info.wait_for_publish(30)


def _lists(n: int = 200) -> dict[str, bytes]:
    """`n` retained list topics on channels and devices' cmd, every tenth one ~100 KB."""
    messages = {}
    for i in range(n):
        topic = f"mpypi/channels/c{i:03d}" if i % 2 else f"mpypi/nodes/esp32-{i:012d}/cmd"
        messages[topic] = os.urandom(100_000 + i) if i % 10 == 3 else b"[%d]" % i
    return messages


@pytest.fixture
def loaded(broker_factory, mqtt_client):
    """A broker of its own with 200 retained lists and retained topics that do not match."""
    b = broker_factory()
    lists = _lists()
    others = {
        "mpypi/nodes/esp32-000000000002/info": b"{}",
        "mpypi/packages/wheel/" + "ab" * 32: os.urandom(50_000),
        "mpypi/channel/stable": b"[]",  # channel, not channels
    }
    _retain(mqtt_client(b), {**lists, **others})
    return b, lists


def test_all_retained_lists_come_back_exactly_and_nothing_else(loaded):
    b, lists = loaded
    c = mqtt.connect(mqtt.BrokerURL(b.host, b.port))
    try:
        got = mqtt.collect_retained(c, *publish.LIST_FILTERS)
        assert got == lists
        # again on the same connection: the callbacks and subscriptions were cleaned up
        assert mqtt.collect_retained(c, "mpypi/channels/#") == {
            t: p for t, p in lists.items() if t.startswith("mpypi/channels/")
        }
    finally:
        mqtt.disconnect(c)


def test_the_embedded_broker_also_sends_the_retained_lists_before_the_unsuback(tmp_path):
    pytest.importorskip("amqtt", reason="the embedded broker needs the broker extra")
    port = free_port()
    command = [sys.executable, "-m", "mpy_blox_tools.cli", "broker", "--engine", "amqtt"]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--dir", str(tmp_path / "b")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_for_port("127.0.0.1", port, 15)
        url = mqtt.BrokerURL("127.0.0.1", port)
        lists = _lists()
        c = mqtt.connect(url)
        _retain(c, lists)
        mqtt.disconnect(c)
        c = mqtt.connect(url)
        try:
            assert mqtt.collect_retained(c, *publish.LIST_FILTERS) == lists
        finally:
            mqtt.disconnect(c)
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_steady_flow_of_live_messages_neither_delays_it_nor_gets_collected(loaded, mqtt_client):
    b, lists = loaded
    publisher = mqtt_client(b)
    stop = threading.Event()
    flowing = threading.Event()

    def keep_publishing():
        n = 0
        while not stop.is_set():
            publisher.publish("mpypi/channels/live", b"[%d]" % n, qos=0)
            publisher.publish(f"mpypi/nodes/esp32-{n % 7:012d}/cmd", b"live", qos=0)
            n += 1
            if n == 20:
                flowing.set()
            time.sleep(0.005)

    flow = threading.Thread(target=keep_publishing, daemon=True)
    flow.start()
    c = mqtt.connect(mqtt.BrokerURL(b.host, b.port))
    try:
        assert flowing.wait(10)  # the flow is under way before and all along
        limit = 10.0
        start = time.monotonic()
        got = mqtt.collect_retained(c, *publish.LIST_FILTERS, limit=limit)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        flow.join(5)
        mqtt.disconnect(c)
    assert got == lists  # every retained list, and not one live message
    assert elapsed < limit / 2


def test_a_broker_that_never_answers_is_a_clear_error(broker_factory):
    b = broker_factory()
    c = mqtt.connect(mqtt.BrokerURL(b.host, b.port))
    b.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(MpyBloxError, match=r"no answer from the broker at .* within 1s"):
            mqtt.collect_retained(c, "mpypi/channels/#", limit=1.0)
    finally:
        b.process.send_signal(signal.SIGCONT)
        mqtt.disconnect(c)


def test_filters_are_given_as_strings(broker, mqtt_client):
    c = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    try:
        with pytest.raises(TypeError):
            mqtt.collect_retained(c, publish.LIST_FILTERS)  # a tuple, not unpacked
    finally:
        mqtt.disconnect(c)


def test_seq_is_one_more_than_the_highest_list_on_any_channel_or_cmd(
    broker_factory, mqtt_client, tmp_path, monkeypatch
):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    b = broker_factory()
    signed = {
        "mpypi/channels/stable": 5,
        "mpypi/channels/beta": 7,
        "mpypi/nodes/esp32-00000000000a/cmd": 12,
        "mpypi/nodes/esp32-00000000000b/cmd": 3,
    }
    _retain(
        mqtt_client(b),
        {
            **{
                t: manifest.encode_list([], seq, KEY, t.removeprefix("mpypi/"))
                for t, seq in signed.items()
            },
            "mpypi/channels/seed": b"[]",  # unsigned: no seq
            "mpypi/nodes/esp32-00000000000a/info": b'{"seq": 99}',  # not a list
        },
    )
    url = mqtt.BrokerURL(b.host, b.port)
    c = mqtt.connect(url)
    try:
        assert publish.next_seq(c, url, KEY, log=lambda line: None) == 13
        # this workstation's own count, too
        assert publish.next_seq(c, url, KEY, log=lambda line: None) == 14
    finally:
        mqtt.disconnect(c)
