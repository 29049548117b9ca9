"""`publish` and `status` over mqtts://: a CA of our own (--ca-file), a client
certificate (--client-cert/--client-key), and one clear line when the broker's
certificate is not trusted. The CA and certificates are made here (`cryptography`)."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mpy_blox_tools import mqtt, publish
from mpy_blox_tools.broker import free_port
from mpy_blox_tools.cli import main as cli

DEVICE = "esp32-0000000000c1"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key, cert: x509.Certificate) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _certificate(subject: str, issuer=None, *, ca: bool = False, server: bool = False):
    """(key, certificate): self-signed when `issuer` (key, certificate) is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_key, signer_name = (
        (key, _name(subject))
        if issuer is None
        else (
            issuer[0],
            issuer[1].subject,
        )
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(signer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path) -> Path:
    """ca, other-ca, server (for localhost, by ca) and client (by ca): NAME.pem, NAME.key."""
    d = tmp_path / "pki"
    d.mkdir()
    ca = _certificate("Mpy-BLOX test CA", ca=True)
    _write(d / "ca", *ca)
    _write(d / "other-ca", *_certificate("Mpy-BLOX other CA", ca=True))
    _write(d / "server", *_certificate("localhost", ca, server=True))
    _write(d / "client", *_certificate("publisher", ca))
    return d


@pytest.fixture
def tls_broker(broker_factory, pki):
    """Mosquitto: plain on .port, TLS on .tls_port, TLS with client certificates on .mtls_port."""
    tls, mtls = free_port(), free_port()
    files = f"cafile {pki}/ca.pem\ncertfile {pki}/server.pem\nkeyfile {pki}/server.key\n"
    b = broker_factory(
        f"listener {tls} 127.0.0.1\n{files}"
        f"listener {mtls} 127.0.0.1\n{files}require_certificate true\n"
    )
    b.tls_port, b.mtls_port = tls, mtls
    return b


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_main.py").write_text("async def user_main():\n    pass\n")


def _publish(url: str, *tls: str) -> int:
    args = ["publish", "--broker", url, "--channel", "tls", "--extra-src-files", "user_main.py"]
    return cli([*args, *tls])


def test_publish_and_status_over_mqtts_trust_the_ca_file(tls_broker, pki, capsys):
    plain = mqtt.connect(mqtt.BrokerURL(tls_broker.host, tls_broker.port))
    info = {"device_id": DEVICE, "channel": "tls", "framework": "0.1.0"}
    plain.publish(f"mpypi/nodes/{DEVICE}/info", json.dumps(info), qos=1, retain=True)
    url = f"mqtts://localhost:{tls_broker.tls_port}"
    assert _publish(url, "--ca-file", str(pki / "ca.pem")) == 0
    assert "published 2 package(s)" in capsys.readouterr().out
    assert cli(["status", "--json", "--broker", url, "--ca-file", str(pki / "ca.pem")]) == 0
    [device] = json.loads(capsys.readouterr().out)
    assert device["device_id"] == DEVICE
    got = mqtt.collect_retained(plain, "mpypi/channels/tls")
    mqtt.disconnect(plain)
    assert json.loads(got["mpypi/channels/tls"])  # the list went out over TLS


@pytest.mark.parametrize(
    "ca, message",
    [
        ("other-ca.pem", "certificate in certificate chain, CA {pki}/other-ca.pem)"),
        (
            None,
            "certificate in certificate chain, CA the system store); give the CA that signed it",
        ),
    ],
)
def test_a_broker_signed_by_another_ca_is_one_line_naming_the_problem(
    tls_broker, pki, capsys, ca, message
):
    url = f"mqtts://localhost:{tls_broker.tls_port}"
    tls = ["--ca-file", str(pki / ca)] if ca else []
    for command in (["publish", "--channel", "tls"], ["status"]):
        assert cli([*command, "--broker", url, *tls]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"TLS to {url}: the broker's certificate is not trusted" in err, err
        assert message.format(pki=pki) in err, err


def test_a_client_certificate_opens_a_listener_that_requires_one(tls_broker, pki, capsys):
    url = f"mqtts://localhost:{tls_broker.mtls_port}"
    ca = ["--ca-file", str(pki / "ca.pem")]
    client = ["--client-cert", str(pki / "client.pem"), "--client-key", str(pki / "client.key")]
    assert _publish(url, *ca, *client) == 0
    assert cli(["status", "--broker", url, *ca, *client]) == 0
    capsys.readouterr()
    assert cli(["status", "--broker", url, *ca]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hung up: " in err and "does it want --client-cert?" in err


@pytest.mark.parametrize(
    "url, flags, message",
    [
        ("mqtt://localhost:1", ["--ca-file", "ca.pem"], "--ca-file: for TLS, use an mqtts://"),
        ("mqtts://localhost:1", ["--client-cert", "c.pem"], "go together"),
        ("mqtts://localhost:1", ["--ca-file", "nothing.pem"], "--ca-file nothing.pem: no such"),
        ("mqtts://localhost:1", ["--ca-file", "user_main.py"], "not a PEM CA certificate"),
    ],
)
def test_bad_tls_flags_are_one_line_before_anything_is_built(url, flags, message, capsys):
    Path("ca.pem").write_text("")
    for command in (["publish", "--channel", "x"], ["status"]):
        assert cli([*command, "--broker", url, *flags]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
