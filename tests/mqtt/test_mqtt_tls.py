"""TLS to Mosquitto with a self-signed CA, on MicroPython's ssl module."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from mpy_blox_tools import micropython
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
    tls_broker, boards, runtime_mpy
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
    # The 64-bit lane's equivalent of an ESP32's 100K (heap figures are the 32-bit
    # lane's): at 100K there, a first boot that ingests provision.json is on the edge.
    rb = boards.start(board, heap=micropython.format_size(micropython.BOARD_HEAP_64))
    rb.wait_for(r"mqtt\.ssl without mqtt\.ssl_params\.ca_file: not connecting", timeout=30)
    rb.wait_for("app running")
    assert rb.boots() == 1
    # Nothing reached the TLS listener: no connection, let alone a login.
    connected = rf"New connection from \S+ on port {tls_broker.tls_port}\."
    assert not re.search(connected, tls_broker.log()), tls_broker.log()
