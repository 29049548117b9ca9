# Dialling the broker: TCP or TLS, CONNECT and its CONNACK, and the Wi-Fi check.
# The platform facts the client depends on live here, each with where it was found.
import asyncio
from micropython import const

from mpy_blox.log import get_logger
from mpy_blox.mqtt import packet
from mpy_blox.mqtt.connection import open_connection
from mpy_blox.mqtt.errors import MQTTError, ProtocolError

_CONNECT_TIMEOUT_MS = const(15000)

log = get_logger("mqtt")


def station():
    # The Wi-Fi station interface, to notice the network going away before TCP
    # does. Looked up once, at start-up: the unix port has no `network` module.
    try:
        import network
    except ImportError:
        return None
    return network.WLAN(network.STA_IF)


def network_down(wlan):
    # An inactive station means the app uses another interface (or none, on unix).
    return wlan is not None and wlan.active() and not wlan.isconnected()


def _der(cert):
    # The unix port's mbedTLS (1.29) refuses PEM in load_verify_locations() with
    # "invalid cert" and takes DER: convert the first PEM certificate here.
    start = cert.find(b"-----BEGIN")
    if start < 0:
        return cert
    from binascii import a2b_base64

    body = cert[cert.index(b"\n", start) + 1 : cert.index(b"-----END", start)]
    return a2b_base64(body.replace(b"\r", b"").replace(b"\n", b""))


def ssl_context(params, insecure=False):
    """An SSLContext from the `mqtt.ssl_params` setting (`ca_file`).

    Without a CA the broker cannot be verified, and anyone in the middle would get
    the password: refused (ValueError) unless `insecure` says to accept any broker.
    """
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca_file = params.get("ca_file")
    if ca_file:
        with open(ca_file, "rb") as f:
            ctx.load_verify_locations(cadata=_der(f.read()))
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif insecure:
        log.warning("TLS without a CA certificate (mqtt.ssl_insecure): the broker is not verified")
        ctx.verify_mode = ssl.CERT_NONE
    else:
        raise ValueError(NO_CA)
    return ctx


NO_CA = (
    "mqtt.ssl without mqtt.ssl_params.ca_file: not connecting to an unverified broker "
    "(set ca_file, or mqtt.ssl_insecure true)"
)


async def dial(host, port, ctx, server_hostname, buffer_size, hello):
    """A Connection on which `hello` (CONNECT) was accepted, or an OSError."""
    conn = await open_connection(host, port, ctx, server_hostname, buffer_size)
    ok = False
    try:
        try:
            await asyncio.wait_for_ms(_handshake(conn, hello), _CONNECT_TIMEOUT_MS)
        except asyncio.TimeoutError:
            raise MQTTError("no CONNACK within %d ms" % _CONNECT_TIMEOUT_MS)
        ok = True
        return conn
    finally:
        if not ok:
            conn.close()


async def _handshake(conn, hello):
    await conn.send(hello)
    first, length = await conn.read_header()
    if first >> 4 != packet.CONNACK:
        raise ProtocolError("expected CONNACK, got packet type %d" % (first >> 4))
    packet.check_control(first, length)
    return packet.connack(await conn.read_control(length))
