"""MQTT on the workstation: broker URLs, a connected paho client with clear errors.

mqtt://[user[:password]@]host[:port]     (port 1883)
mqtts://[user[:password]@]host[:port]    (TLS, port 8883, system CA store)
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from mpy_blox_tools.errors import MpyBloxError

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url if "://" in url else "mqtt://" + url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise MpyBloxError(f"broker {url!r}: use mqtt://host[:port] or mqtts://host[:port]")
        if not parts.hostname:
            raise MpyBloxError(f"broker {url!r}: no host")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise MpyBloxError(f"broker {url!r}: bad port") from None
        return cls(
            parts.hostname,
            port,
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None,
        )

    @classmethod
    def from_settings(cls, path: Path = Path("settings.json")) -> BrokerURL:
        """The broker a device's settings.json points at (the publisher's default)."""
        try:
            settings = json.loads(path.read_text())
        except FileNotFoundError:
            return cls("127.0.0.1", 1883)
        except (OSError, json.JSONDecodeError) as e:
            raise MpyBloxError(f"{path}: {e}") from None
        mqtt = settings.get("mqtt") or {}
        tls = bool(mqtt.get("ssl"))
        return cls(
            mqtt.get("server") or "127.0.0.1",
            int(mqtt.get("port") or (8883 if tls else 1883)),
            tls,
            mqtt.get("username"),
            os.environ.get("MPY_BLOX_MQTT_PASSWORD"),
        )

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def connect(
    broker: BrokerURL, client_id: str | None = None, timeout: float = CONNECT_TIMEOUT
) -> paho.Client:
    """A paho client, connected, with its network loop running; clear errors otherwise."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id or f"mpy-blox-{uuid.uuid4().hex[:12]}"
    )
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
    outcome: dict = {}
    done = threading.Event()

    def on_connect(c, userdata, flags, reason: ReasonCode, properties):
        outcome["reason"] = reason
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except (OSError, ssl.SSLError) as e:
        raise MpyBloxError(f"cannot reach the broker at {broker}: {e.strerror or e}") from None
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise MpyBloxError(f"no answer from the broker at {broker} within {timeout:.0f}s")
    reason = outcome["reason"]
    if reason.is_failure:
        client.loop_stop()
        raise MpyBloxError(f"the broker at {broker} refused the connection: {reason}")
    client.on_connect = None
    return client


def disconnect(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


def collect_retained(
    client: paho.Client, topic_filter: str, quiet: float = 0.5, limit: float = 5.0
) -> dict[str, bytes]:
    """Retained messages on `topic_filter`: {topic: payload}, once the flow has gone quiet."""
    messages: dict[str, bytes] = {}
    last = [time.monotonic()]
    lock = threading.Lock()

    def on_message(c, userdata, msg):
        if msg.retain:
            with lock:
                messages[msg.topic] = msg.payload
                last[0] = time.monotonic()

    client.message_callback_add(topic_filter, on_message)
    client.subscribe(topic_filter, qos=1)
    start = time.monotonic()
    while time.monotonic() - start < limit and time.monotonic() - last[0] < quiet:
        time.sleep(0.05)
    client.unsubscribe(topic_filter)
    client.message_callback_remove(topic_filter)
    with lock:
        return dict(messages)
