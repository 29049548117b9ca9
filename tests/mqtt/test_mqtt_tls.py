"""TLS to Mosquitto with a self-signed CA, on MicroPython's ssl module."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from mpy_blox_tools.broker import free_port

REPO = Path(__file__).resolve().parents[2]


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_broker(broker_factory, tmp_path):
    """Mosquitto with a TLS listener whose certificate a fresh CA signed for localhost."""
    d = tmp_path / "pki"
    d.mkdir()
    for name in ("ca", "other-ca"):
        openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=Mpy-BLOX test {name}",
            cwd=d,
        )
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
        cwd=d,
    )
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        cwd=d,
    )
    port = free_port()
    b = broker_factory(
        f"listener {port} 127.0.0.1\ncafile {d}/ca.pem\n"
        f"certfile {d}/server.pem\nkeyfile {d}/server.key\n"
    )
    b.tls_port = port
    b.pki = d
    return b


TLS_DEVICE = """
import asyncio, hashlib
from binascii import hexlify
from mpy_blox.mqtt import MQTTClient
done = asyncio.Event()

async def handler(msg):
    h = hashlib.sha256()
    buf = bytearray(2048)
    while True:
        n = await msg.readinto(buf)
        if not n:
            break
        h.update(memoryview(buf)[:n])
    print("MSG", msg.size, hexlify(h.digest()).decode())
    done.set()

async def main():
    c = MQTTClient("tls", "127.0.0.1", {port}, ssl=True, backoff_min_ms=200,
                   ssl_params={{"ca_file": {ca!r}, "server_hostname": "localhost"}})
    await c.subscribe("tls/echo", handler)
    import gc
    gc.collect()
    print("FREE", gc.mem_free())
    c.start()
    try:
        await asyncio.wait_for(c.connected(), {wait_s})
    except asyncio.TimeoutError:
        print("NOT CONNECTED")
        await c.stop()
        return
    import gc; gc.collect(); print("CONNECTED", gc.mem_free())
    await c.publish("tls/echo", b"\\x5a" * {size}, qos=1)
    await done.wait()
    await c.stop()
    print("STOPPED")

asyncio.run(main())
"""


def test_tls_with_a_ca_from_flash_verifies_the_broker_and_streams(tls_broker, device):
    size = 8_000
    dev = device(
        TLS_DEVICE.format(
            port=tls_broker.tls_port, ca=str(tls_broker.pki / "ca.pem"), wait_s=20, size=size
        ),
        heap="100K",
    )
    out = dev.wait(timeout=60)
    assert "CONNECTED" in out and "STOPPED" in out, out
    m = re.search(r"MSG (\d+) (\w+)", out)
    assert m and int(m.group(1)) == size
    assert m.group(2) == hashlib.sha256(b"\x5a" * size).hexdigest()


def test_tls_refuses_a_broker_signed_by_another_ca_and_keeps_retrying(tls_broker, device):
    dev = device(
        TLS_DEVICE.format(
            port=tls_broker.tls_port, ca=str(tls_broker.pki / "other-ca.pem"), wait_s=2, size=1
        ),
        heap="100K",
    )
    out = dev.wait(timeout=30)
    assert "NOT CONNECTED" in out, out
    assert len(re.findall(r"connecting to 127.0.0.1:\d+ failed", out)) >= 2, out
    assert "Traceback" not in out


NO_CA_DEVICE = """
import asyncio
from mpy_blox.mqtt import MQTTClient

async def main():
    try:
        MQTTClient("tls", "127.0.0.1", {port}, ssl=True,
                   ssl_params={{"server_hostname": "localhost"}})
        print("BUILT")
    except ValueError as e:
        print("REFUSED", e)
    c = MQTTClient("tls", "127.0.0.1", {port}, ssl=True, ssl_insecure=True, backoff_min_ms=200,
                   ssl_params={{"server_hostname": "localhost"}})
    c.start()
    await asyncio.wait_for(c.connected(), 20)
    print("INSECURE CONNECTED")
    await c.stop()

asyncio.run(main())
"""


def test_ssl_without_a_ca_is_refused_unless_ssl_insecure_says_any_broker_will_do(
    tls_broker, device
):
    out = device(NO_CA_DEVICE.format(port=tls_broker.tls_port), heap="100K").wait(timeout=60)
    assert "BUILT" not in out, out
    assert "REFUSED mqtt.ssl without mqtt.ssl_params.ca_file" in out, out
    assert "INSECURE CONNECTED" in out, out
    assert "(mqtt.ssl_insecure): the broker is not verified" in out, out


def test_a_board_with_ssl_and_no_ca_file_never_sends_its_password_and_runs_user_code(
    tls_broker, boards, runtime_mpy, lane64
):
    password = "never-sent-" + "x" * 8
    settings = {
        "mqtt": {
            "server": "127.0.0.1",
            "port": tls_broker.tls_port,
            "ssl": True,
            "ssl_params": {"server_hostname": "localhost"},
            "username": "dev",
            "wait_s": 1,
        }
    }
    board = boards.create(
        files={
            "main.py": (REPO / "main.py").read_text(),
            "mpypi_recover.py": (REPO / "mpypi_recover.py").read_text(),
            "settings.json": json.dumps(settings),
            "provision.json": json.dumps({"mqtt.password": password}),
            "user_main.py": (
                "import asyncio\n\nasync def user_main():\n"
                "    print('app running')\n    await asyncio.sleep(3600)\n"
            ),
        },
    )
    board.put_tree(runtime_mpy, "lib/mpy_blox")
    # The 64-bit lane's board heap (144K, an ESP32's 100K carried over): at 100K the
    # 64-bit build's first boot, which ingests provision.json, is at its edge.
    rb = boards.start(board, heap=lane64.heap, lane=lane64)
    rb.wait_for(r"mqtt\.ssl without mqtt\.ssl_params\.ca_file: not connecting", timeout=30)
    rb.wait_for("app running")
    assert rb.boots() == 1
    # Nothing reached the TLS listener: no connection, let alone a login.
    connected = rf"New connection from \S+ on port {tls_broker.tls_port}\."
    assert not re.search(connected, tls_broker.log()), tls_broker.log()


# -- TLS and the device's clock ---------------------------------------------------
#
# An ESP32 (MicroPython >= 1.22) checks the broker certificate's dates against its
# own clock, which reads 2000-01-01 until NTP sets it: every certificate "starts in
# the future" and the handshake fails (docs/runtime.md, "Time"). The unix port's
# mbedTLS checks the dates too, but against the host's clock (C time()), not the
# virtual board's: the first test pins that down, the others what the runtime does.


def _cert_pair(d: Path, label: str, start, end) -> None:
    """A server certificate for localhost valid from `start` to `end`, signed by the
    fixture's CA (ca.pem, ca.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    (d / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{label}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.parametrize(
    "label, days, refusal",
    [
        ("future", (365, 400), "The certificate validity starts in the future"),
        ("expired", (-10, -5), "The certificate validity has expired"),
    ],
)
def test_the_unix_port_checks_certificate_dates_against_the_host_clock(
    tls_broker, broker_factory, device, label, days, refusal
):
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    d = tls_broker.pki
    start, end = (now + datetime.timedelta(days=n) for n in days)
    _cert_pair(d, label, start, end)
    port = free_port()
    broker_factory(
        f"listener {port} 127.0.0.1\ncafile {d}/ca.pem\n"
        f"certfile {d}/{label}.pem\nkeyfile {d}/{label}.key\n"
    )
    code = DATES_DEVICE.format(port=port, ca=str(d / "ca.pem"))
    out = device(code, heap="100K").wait(timeout=30)
    assert refusal in out, out
    # The same CA, a certificate valid now: accepted (the fixture's broker).
    code = DATES_DEVICE.format(port=tls_broker.tls_port, ca=str(d / "ca.pem"))
    assert "HANDSHAKE OK" in device(code, heap="100K").wait(timeout=30)


DATES_DEVICE = """
import socket
from mpy_blox.mqtt import dial
ctx = dial.ssl_context({{"ca_file": {ca!r}}})
s = socket.socket()
s.connect(socket.getaddrinfo("127.0.0.1", {port})[0][-1])
try:
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t.write(b"\\x10")  # anything: the handshake is done by then
    print("HANDSHAKE OK")
except Exception as e:
    print("REFUSED", repr(e))
"""


def _tls_board(tls_broker, boards, runtime_mpy, ntp: dict, **create):
    settings = {
        "mqtt": {
            "server": "127.0.0.1",
            "port": tls_broker.tls_port,
            "ssl": True,
            "ssl_params": {"ca_file": "/ca.pem", "server_hostname": "localhost"},
        },
        "ntp": ntp,
    }
    board = boards.create(
        files={
            "main.py": (REPO / "main.py").read_text(),
            "mpypi_recover.py": (REPO / "mpypi_recover.py").read_text(),
            "settings.json": json.dumps(settings),
            "ca.pem": (tls_broker.pki / "ca.pem").read_text(),
            "user_main.py": (
                "import asyncio\n\nasync def user_main():\n"
                "    print('app running')\n    await asyncio.sleep(3600)\n"
            ),
        },
        **create,
    )
    board.put_tree(runtime_mpy, "lib/mpy_blox")
    return board


def _broker_connections(tls_broker) -> list[int]:
    """When Mosquitto (its log's epoch timestamps) saw a connection on the TLS port."""
    rx = rf"^(\d+): New connection from \S+ on port {tls_broker.tls_port}\."
    return [int(m.group(1)) for m in re.finditer(rx, tls_broker.log(), re.M)]


def test_with_ntp_a_board_with_an_unset_clock_connects_tls_only_after_the_time_came(
    tls_broker, boards, runtime_mpy, sntp, lane64
):
    responder = sntp()
    board = _tls_board(
        tls_broker, boards, runtime_mpy, {"server": "127.0.0.1", "port": responder.port}
    )
    rb = boards.start(board, heap=lane64.heap, lane=lane64)  # TLS: the 64-bit build's mbedTLS
    rb.wait_for(r"connected to 127\.0\.0\.1:\d+", timeout=30)
    rb.wait_for("app running")
    out = rb.console()
    # The clock first, then the broker: the boot waited for NTP before dialling.
    assert out.index("clock set from NTP 127.0.0.1") < out.index("connected to 127.0.0.1")
    assert "no time from NTP yet" not in out
    connections = _broker_connections(tls_broker)
    assert connections and int(responder.requests[0]) <= connections[0], (
        responder.requests,
        connections,
    )


def test_a_tls_boot_waits_for_one_ntp_round_at_most_then_goes_on(
    tls_broker, boards, runtime_mpy, sntp, lane64
):
    # A silent server: the first round gives up after its 2 s, the boot goes on
    # (well before ntp.wait_s) and NTP retries in the background. On an ESP32 the
    # connection then fails the certificate's dates until a round sets the clock
    # (MQTT retries with backoff); the unix port checks them against the host's
    # clock, so here it connects: what this shows is the bounded wait.
    responder = sntp("silent")
    board = _tls_board(
        tls_broker,
        boards,
        runtime_mpy,
        {"server": "127.0.0.1", "port": responder.port, "wait_s": 20},
    )
    rb = boards.start(board, heap=lane64.heap, lane=lane64)
    rb.wait_for("no time from NTP yet: TLS fails certificate dates until it comes", timeout=30)
    rb.wait_for(r"connected to 127\.0\.0\.1:\d+", timeout=30)
    rb.wait_for("app running")
    out = rb.console()
    assert "clock set" not in out
    assert responder.requests, "no NTP request"
    connections = _broker_connections(tls_broker)
    assert connections and int(responder.requests[0]) + 2 <= connections[0]
    assert connections[0] <= responder.requests[0] + 10  # not ntp.wait_s (20 s)


def test_a_tls_boot_with_the_clock_already_set_does_not_wait_for_ntp(
    tls_broker, boards, runtime_mpy, sntp, lane64
):
    # A clock that ran on over a reset (here: set from power-on) needs no sync first.
    responder = sntp("silent")
    board = _tls_board(
        tls_broker,
        boards,
        runtime_mpy,
        {"server": "127.0.0.1", "port": responder.port, "wait_s": 20},
        clock="host",
    )
    rb = boards.start(board, heap=lane64.heap, lane=lane64)
    started = time.monotonic()
    rb.wait_for(r"connected to 127\.0\.0\.1:\d+", timeout=30)
    assert time.monotonic() - started < 15
    assert "no time from NTP yet" not in rb.console()
