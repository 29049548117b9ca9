# MQTT 3.1.1 packets: bytes in, bytes out. No I/O, no sleeping; bad input raises
# ProtocolError (or ConnectError for a refused CONNECT).
#
# The client writes a PUBLISH as publish_header() followed by the caller's
# payload object, so a payload is never copied into a packet buffer.
from micropython import const

from mpy_blox.mqtt.errors import ConnectError, ProtocolError

# Packet types (the high nibble of the first byte).
CONNECT = const(1)
CONNACK = const(2)
PUBLISH = const(3)
PUBACK = const(4)
SUBSCRIBE = const(8)
SUBACK = const(9)
UNSUBSCRIBE = const(10)
UNSUBACK = const(11)
PINGREQ = const(12)
PINGRESP = const(13)
DISCONNECT = const(14)

MAX_LENGTH = const(268435455)  # the largest remaining length 4 bytes can say
SUBACK_FAILURE = const(0x80)

PING = b"\xc0\x00"
BYE = b"\xe0\x00"


class Will:
    """The message the broker publishes for us when we vanish without DISCONNECT."""

    def __init__(self, topic, payload, retain=True, qos=1):
        self.topic = topic
        self.payload = payload.encode() if isinstance(payload, str) else payload
        self.retain = retain
        self.qos = qos


def header(first, length):
    """Fixed header: first byte, then the remaining length in 1 to 4 bytes."""
    if length > MAX_LENGTH:
        raise ValueError("packet too large for MQTT")
    out = bytearray(5)
    out[0] = first
    i = 1
    while True:
        b = length & 0x7F
        length >>= 7
        if length:
            out[i] = b | 0x80
            i += 1
        else:
            out[i] = b
            return out[: i + 1]


def length_byte(length, b, i):
    """Fold the i-th byte (0-based) of a remaining length into `length`.

    Returns (length, more): `more` says another byte follows.
    """
    length |= (b & 0x7F) << (7 * i)
    more = b & 0x80
    if more and i == 3:
        raise ProtocolError("remaining length longer than 4 bytes")
    return length, more


def _str(s):
    # A UTF-8 string with its 2-byte length, as every MQTT string field.
    if isinstance(s, str):
        s = s.encode()
    n = len(s)
    if n > 65535:
        raise ValueError("string field over 65535 bytes")
    return bytes((n >> 8, n & 0xFF)) + s


def connect(client_id, user, password, keepalive_s, clean_session, will):
    flags = 0x02 if clean_session else 0
    parts = [
        b"\x00\x04MQTT\x04",
        None,
        bytes((keepalive_s >> 8, keepalive_s & 0xFF)),
        _str(client_id),
    ]
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        parts.append(_str(will.topic))
        parts.append(_str(will.payload))
    if user is not None:
        flags |= 0x80
        parts.append(_str(user))
        if password is not None:
            flags |= 0x40
            parts.append(_str(password))
    parts[1] = bytes((flags,))
    body = b"".join(parts)
    return bytes(header(0x10, len(body))) + body


def connack(body):
    """Check a CONNACK body; return session_present or raise ConnectError."""
    if len(body) != 2:
        raise ProtocolError("CONNACK of %d bytes" % len(body))
    if body[1]:
        raise ConnectError(body[1])
    return bool(body[0] & 1)


def publish_header(topic, size, qos, retain, dup, pid):
    """Everything of a PUBLISH but its `size` payload bytes."""
    t = _str(topic)
    length = len(t) + size + (2 if qos else 0)
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    out = header(first, length) + t
    if qos:
        out += bytes((pid >> 8, pid & 0xFF))
    return out


def subscribe(pid, pattern, qos):
    body = bytes((pid >> 8, pid & 0xFF)) + _str(pattern) + bytes((qos,))
    return bytes(header(0x82, len(body))) + body


def unsubscribe(pid, pattern):
    body = bytes((pid >> 8, pid & 0xFF)) + _str(pattern)
    return bytes(header(0xA2, len(body))) + body


def puback(pid):
    return bytes((0x40, 2, pid >> 8, pid & 0xFF))


def check_control(first, length):
    """Check the fixed header of any received packet but PUBLISH (flags, length)."""
    kind = first >> 4
    if kind in (PUBACK, UNSUBACK):
        ok = length == 2
    elif kind == SUBACK:
        ok = length == 3  # we subscribe one filter per packet: one return code
    elif kind in (CONNACK, PINGRESP):
        ok = length == (2 if kind == CONNACK else 0)
    else:
        raise ProtocolError("unexpected packet type %d" % kind)
    if not ok or first & 0x0F:
        raise ProtocolError(
            "malformed packet type %d (flags %d, length %d)" % (kind, first & 0x0F, length)
        )
    return kind


def check_publish(first, length):
    """From a PUBLISH fixed header: (qos, retain, dup); the topic length is checked later."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    if length < (4 if qos else 2):
        raise ProtocolError("PUBLISH of %d bytes" % length)
    return qos, first & 1, bool(first & 0x08)


def check_topic(topic_len, length, qos, max_topic):
    """The payload size of a PUBLISH whose topic is `topic_len` bytes long."""
    if topic_len == 0 or topic_len > max_topic:
        raise ProtocolError("PUBLISH topic of %d bytes (limit %d)" % (topic_len, max_topic))
    size = length - 2 - topic_len - (2 if qos else 0)
    if size < 0:
        raise ProtocolError("PUBLISH topic of %d bytes in a %d-byte packet" % (topic_len, length))
    return size
