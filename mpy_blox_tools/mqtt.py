"""MQTT on the workstation: broker URLs, a connected paho client with clear errors.

mqtt://[user[:password]@]host[:port]     (port 1883)
mqtts://[user[:password]@]host[:port]    (TLS, port 8883: the system's CA store, or
                                          --ca-file; --client-cert/--client-key for a
                                          broker that asks for a client certificate)

Every command that connects takes the same flags (`add_connect_arguments`) and turns
them into one `BrokerURL` (`BrokerURL.with_tls`), which `connect` uses: the TLS
options are threaded through once, not per command. `--key-file` is the update key
(publish), hence `--client-key` for the TLS one.

The publisher connects with `connect(broker, mqtt5=True)`: MQTT 5 where the broker
speaks it, for its CONNACK's Maximum Packet Size and for message expiry, MQTT 3.1.1
otherwise (the embedded amqtt broker). `broker_limits(client)` says what it learnt;
`publish_retained` sends one retained QoS 1 message and says so when the broker hangs
up on it (a broker that refuses a packet too large for it without saying its limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import ssl
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mpy_blox_tools.errors import MpyBloxError

CONNECT_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 120.0  # for the PUBACK of one message, a several-MiB package on a slow link
# MQTT 5's reason code for a CONNECT in a version the broker does not speak (a 3.1.1
# broker's return code 1, as paho reports it).
UNSUPPORTED_PROTOCOL_VERSION = 132
# The Message Expiry Interval is a four-byte integer (MQTT 5, 3.3.2.3.3).
MAX_EXPIRY_S = 2**32 - 1
RETAINED_TIMEOUT = 10.0  # for the broker to send what it retains, large packages and all


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # trust this CA (PEM) instead of the system's
    client_cert: Path | None = None  # PEM certificate to show the broker
    client_key: Path | None = None  # its private key (PEM)

    def with_tls(
        self,
        ca_file: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ) -> BrokerURL:
        """This URL with the TLS files of --ca-file, --client-cert and --client-key."""
        given = {"--ca-file": ca_file, "--client-cert": client_cert, "--client-key": client_key}
        if not any(given.values()):
            return self
        if not self.tls:
            flags = ", ".join(flag for flag, value in given.items() if value)
            raise MpyBloxError(f"{flags}: for TLS, use an mqtts:// broker (not {self})")
        if bool(client_cert) != bool(client_key):
            raise MpyBloxError("--client-cert and --client-key go together")
        for flag, value in given.items():
            if value and not Path(value).is_file():
                raise MpyBloxError(f"{flag} {value}: no such file")
        url = dataclasses.replace(
            self,
            ca_file=Path(ca_file) if ca_file else None,
            client_cert=Path(client_cert) if client_cert else None,
            client_key=Path(client_key) if client_key else None,
        )
        tls_context(url)  # a file that is no certificate is said now, before any work
        return url

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


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _not_tls_hint(broker: BrokerURL) -> str:
    # A plain MQTT port answers a TLS hello by hanging up or with garbage.
    return (
        f"; port {broker.port} may not speak TLS: mqtt:// for a plain port, or the "
        "broker's TLS port (usually 8883)"
    )


def _unreachable_hint(broker: BrokerURL, error: OSError) -> str:
    """What to try next, said with the one-line error."""
    if broker.tls and isinstance(error, ConnectionResetError):
        return _not_tls_hint(broker)
    if isinstance(error, ConnectionRefusedError) and broker.host in LOCAL_HOSTS:
        return "; is a broker running? `mpy-blox broker` runs one here"
    return ""


@dataclass(frozen=True)
class BrokerLimits:
    """What a broker said about itself in its CONNACK."""

    mqtt5: bool  # it speaks MQTT 5 (message expiry, properties)
    max_packet_size: int | None  # its Maximum Packet Size; None: not said (3.1.1: never)

    def describe(self) -> str:
        """Where a limit came from, for messages."""
        if self.max_packet_size:
            return "Maximum Packet Size in the broker's MQTT 5 CONNACK"
        if self.mqtt5:
            return "the broker's MQTT 5 CONNACK says no limit"
        return "the broker speaks only MQTT 3.1.1, which has no way to say its limit"


_LIMITS: weakref.WeakKeyDictionary[paho.Client, BrokerLimits] = weakref.WeakKeyDictionary()


def broker_limits(client: paho.Client) -> BrokerLimits:
    """What the broker of a client from `connect` said about itself."""
    return _LIMITS.get(client, BrokerLimits(False, None))


class _NoMqtt5(MpyBloxError):
    pass


def connect(
    broker: BrokerURL,
    client_id: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
    mqtt5: bool = False,
) -> paho.Client:
    """A paho client, connected, with its network loop running; clear errors otherwise.

    `mqtt5`: MQTT 5 if the broker speaks it, else 3.1.1 (`broker_limits` says which)."""
    if mqtt5:
        try:
            return _connect(broker, client_id, timeout, paho.MQTTv5)
        except _NoMqtt5:
            pass  # a 3.1.1 broker (amqtt says so in its CONNACK; others hang up)
    return _connect(broker, client_id, timeout, paho.MQTTv311)


def _connect(
    broker: BrokerURL, client_id: str | None, timeout: float, protocol: int
) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"mpy-blox-{uuid.uuid4().hex[:12]}",
        protocol=protocol,
    )
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set_context(tls_context(broker))
    outcome: dict = {}
    done = threading.Event()

    def on_connect(c, userdata, flags, reason: ReasonCode, properties):
        outcome["reason"] = reason
        outcome["properties"] = properties
        done.set()

    def on_disconnect(c, userdata, flags, reason: ReasonCode, properties):
        done.set()  # before any CONNACK: e.g. a TLS alert after the handshake

    def on_log(c, userdata, level, text):
        if level == paho.MQTT_LOG_ERR:
            outcome.setdefault("error", text)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_log = on_log
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except ssl.SSLCertVerificationError as e:
        hint = "" if broker.ca_file else "; give the CA that signed it with --ca-file"
        raise MpyBloxError(
            f"TLS to {broker}: the broker's certificate is not trusted "
            f"({e.verify_message}, CA {broker.ca_file or 'the system store'}){hint}"
        ) from None
    except ssl.SSLError as e:
        raise MpyBloxError(
            f"TLS to {broker} failed: {e.reason or e}{_not_tls_hint(broker)}"
        ) from None
    except OSError as e:
        raise MpyBloxError(
            f"cannot reach the broker at {broker}: {e.strerror or e}{_unreachable_hint(broker, e)}"
        ) from None
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise MpyBloxError(f"no answer from the broker at {broker} within {timeout:.0f}s")
    reason = outcome.get("reason")
    if reason is None:  # it hung up without a CONNACK
        client.loop_stop()
        if protocol == paho.MQTTv5:
            # Some 3.1.1 brokers close the connection on an MQTT 5 CONNECT instead of
            # answering it (RabbitMQ's plugin before 3.13 does); 3.1.1 is tried next,
            # which, for any other cause, says it again.
            raise _NoMqtt5(f"the broker at {broker} hung up on an MQTT 5 CONNECT")
        error = outcome.get("error", "no CONNACK")
        hint = "" if broker.client_cert or not broker.tls else "; does it want --client-cert?"
        raise MpyBloxError(f"the broker at {broker} hung up: {error}{hint}")
    if reason.is_failure:
        client.loop_stop()
        if protocol == paho.MQTTv5 and reason.value == UNSUPPORTED_PROTOCOL_VERSION:
            raise _NoMqtt5(f"the broker at {broker} does not speak MQTT 5")
        raise MpyBloxError(f"the broker at {broker} refused the connection: {reason}")
    client.on_connect = client.on_disconnect = client.on_log = None
    properties = outcome.get("properties")
    _LIMITS[client] = BrokerLimits(
        protocol == paho.MQTTv5, getattr(properties, "MaximumPacketSize", None)
    )
    return client


def tls_context(broker: BrokerURL) -> ssl.SSLContext:
    """Verify the broker (its name and a CA: --ca-file, else the system's); show ours."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if broker.ca_file:
            context.load_verify_locations(cafile=str(broker.ca_file))
    except (ssl.SSLError, OSError) as e:
        raise MpyBloxError(f"--ca-file {broker.ca_file}: not a PEM CA certificate ({e})") from None
    if broker.client_cert:
        try:
            context.load_cert_chain(str(broker.client_cert), str(broker.client_key))
        except (ssl.SSLError, OSError) as e:
            raise MpyBloxError(
                f"--client-cert {broker.client_cert} / --client-key {broker.client_key}: "
                f"not a PEM certificate and its key ({e})"
            ) from None
    return context


def add_connect_arguments(p: argparse.ArgumentParser, broker_help: str) -> None:
    """--broker and the TLS flags, for every command that connects (`BrokerURL.with_tls`)."""
    p.add_argument("--broker", help=broker_help)
    p.add_argument(
        "--ca-file", metavar="PEM", help="with mqtts://: trust this CA instead of the system's"
    )
    p.add_argument(
        "--client-cert",
        metavar="PEM",
        help="with mqtts://: a client certificate for a broker that asks for one",
    )
    p.add_argument("--client-key", metavar="PEM", help="the private key of --client-cert")


def packet_size(topic: str, payload_size: int, mqtt5: bool, expiry: bool = False) -> int:
    """The bytes of a QoS 1 PUBLISH of `payload_size` bytes on `topic`, as a broker
    compares it with its maximum packet size: fixed header, topic, packet id, the
    MQTT 5 properties (a Message Expiry Interval: 5 bytes), payload."""
    properties = 5 if expiry else 0
    remaining = 2 + len(topic.encode()) + 2 + payload_size
    if mqtt5:
        remaining += _varint_size(properties) + properties
    return 1 + _varint_size(remaining) + remaining


def _varint_size(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


class HungUp(MpyBloxError):
    """The broker closed the connection before it acknowledged a message."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # the DISCONNECT's reason (MQTT 5) or paho's word for it


def publish_retained(
    client: paho.Client,
    topic: str,
    payload: bytes,
    *,
    expiry_s: int | None = None,
    timeout: float = PUBLISH_TIMEOUT,
) -> None:
    """Publish one retained QoS 1 message and wait for the broker's PUBACK.

    `expiry_s`: an MQTT 5 Message Expiry Interval (the client must be MQTT 5). Raises
    HungUp when the connection drops first: paho would reconnect and send the message
    again, to be dropped again, for ever (Mosquitto's answer to a packet over its
    `max_packet_size` from a 3.1.1 client is to hang up)."""
    properties = None
    if expiry_s is not None:
        if not broker_limits(client).mqtt5:
            raise MpyBloxError("message expiry needs an MQTT 5 connection")
        properties = Properties(PacketTypes.PUBLISH)
        properties.MessageExpiryInterval = expiry_s
    lost: list[str] = []
    chained = client.on_disconnect

    def on_disconnect(c, userdata, flags, reason, props):
        lost.append(str(reason))
        if chained is not None:
            chained(c, userdata, flags, reason, props)

    client.on_disconnect = on_disconnect
    try:
        if not client.is_connected():
            raise HungUp(f"not connected to the broker at {client.host}:{client.port}", "")
        info = client.publish(topic, payload, qos=1, retain=True, properties=properties)
        deadline = time.monotonic() + timeout
        while True:
            if lost or not client.is_connected() or info.rc == paho.MQTT_ERR_NO_CONN:
                reason = lost[0] if lost else "connection lost"
                # An MQTT 5 broker says why in its DISCONNECT; paho's word for a
                # 3.1.1 broker's closed socket ("Unspecified error") says nothing.
                why = f" ({reason})" if lost and broker_limits(client).mqtt5 else ""
                raise HungUp(
                    f"the broker at {client.host}:{client.port} closed the connection{why}",
                    reason,
                )
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
                raise MpyBloxError(f"cannot publish on {topic}: {paho.error_string(info.rc)}")
            if info.is_published():
                return
            if time.monotonic() > deadline:
                raise MpyBloxError(
                    f"no PUBACK from the broker at {client.host}:{client.port} within "
                    f"{timeout:.0f}s for {len(payload)} bytes on {topic}"
                )
            try:
                info.wait_for_publish(0.05)
            except (RuntimeError, ValueError):
                pass  # its rc changed while we waited: said at the top of the loop
    finally:
        client.on_disconnect = chained


def disconnect(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


def collect_retained(
    client: paho.Client, *topic_filters: str, limit: float = RETAINED_TIMEOUT
) -> dict[str, bytes]:
    """The messages the broker retains on `topic_filters`: {topic: payload}.

    One SUBSCRIBE for all the filters, then an UNSUBSCRIBE of them: the broker
    answers it after the retained messages it queued for the subscription, so the
    UNSUBACK marks the end of them and no quiet period is waited for. Live
    (non-retained) messages on the filters are left out. Raises MpyBloxError when
    the broker does not answer within `limit` seconds (what arrived may be
    incomplete, so it is not returned).
    """
    # Why the UNSUBACK is a marker. Mosquitto (src/handle_subscribe.c, 2.0 and
    # later) queues a subscription's retained messages (retain__queue) while it
    # handles the SUBSCRIBE, before it reads this client's next packet; it sends
    # the SUBACK *first*, so the SUBACK is no marker, but the UNSUBACK it sends
    # while handling our later UNSUBSCRIBE goes out behind them. That holds for
    # QoS 0 only: QoS 0 messages are never held back by the inflight limit
    # (db__ready_for_flight), whereas beyond 20 QoS 1 messages the rest wait for
    # PUBACKs and the UNSUBACK would overtake them. The embedded amqtt broker
    # awaits the retained publishes of a SUBSCRIBE before it handles the next
    # UNSUBSCRIBE. paho calls the callbacks in the order packets arrive, on its
    # network thread, so when on_unsubscribe sees our mid every retained message
    # has been through on_message. Limits, as before: Mosquitto 2.0 drops what is
    # past max_queued_messages (1000) queued for one client, and it writes the
    # retained messages out at the end of the SUBSCRIBE only if this client's
    # socket is not still backed up with earlier packets.
    if not topic_filters or not all(isinstance(f, str) for f in topic_filters):
        raise TypeError(f"collect_retained takes topic filters as strings: {topic_filters!r}")
    filters = list(dict.fromkeys(topic_filters))
    messages: dict[str, bytes] = {}
    acked: set[int] = set()
    cond = threading.Condition()
    chained = client.on_unsubscribe

    def on_message(c, userdata, msg):
        if msg.retain:
            with cond:
                messages[msg.topic] = msg.payload

    def on_unsubscribe(c, userdata, mid, reason_codes, properties):
        with cond:
            acked.add(mid)
            cond.notify_all()
        if chained is not None:
            chained(c, userdata, mid, reason_codes, properties)

    for f in filters:
        client.message_callback_add(f, on_message)
    client.on_unsubscribe = on_unsubscribe
    try:
        rc, _ = client.subscribe([(f, 0) for f in filters])
        if rc == paho.MQTT_ERR_SUCCESS:
            rc, mid = client.unsubscribe(filters)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise MpyBloxError(f"cannot read retained messages: {paho.error_string(rc)}")
        with cond:
            if not cond.wait_for(lambda: mid in acked, timeout=limit):
                raise MpyBloxError(
                    f"no answer from the broker at {client.host}:{client.port} within "
                    f"{limit:.0f}s while reading retained messages on {', '.join(filters)}"
                )
            return dict(messages)
    finally:
        client.on_unsubscribe = chained
        for f in filters:
            client.message_callback_remove(f)
