"""Publishing: packages retained by SHA256 before a signed list with a growing seq."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sntp_server import NO_NTP

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import mqtt, publish
from mpy_blox_tools.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
KEY = "k" * 64


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)  # no settings.json here: defaults apply
    return tmp_path / "state"


def _retained(broker, topic_filter):
    c = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    try:
        return mqtt.collect_retained(c, topic_filter)
    finally:
        mqtt.disconnect(c)


def _clear(broker, topics):
    c = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    for t in topics:
        c.publish(t, b"", qos=1, retain=True).wait_for_publish(5)
    mqtt.disconnect(c)


def _seq_in(payload: bytes, key: bytes = KEY.encode()) -> int | None:
    return manifest.decode(payload, key).seq


def test_publish_puts_packages_then_a_signed_list_the_device_module_accepts(broker, tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    (tmp_path / "user_main.py").write_text("async def user_main():\n    pass\n")
    url = f"mqtt://{broker.host}:{broker.port}"
    assert (
        cli(
            [
                "publish",
                "--broker",
                url,
                "--channel",
                "t1",
                "--key-file",
                "key",
                "--extra-src-files",
                "user_main.py",
                "user_main.py:app/main2.py",
            ]
        )
        == 0
    )
    lists = _retained(broker, "mpypi/channels/t1")
    seq, entries = manifest.decode_list(lists["mpypi/channels/t1"], KEY.encode(), "channels/t1")
    assert seq >= 1
    kinds = [(e["type"], e.get("name") or e.get("path")) for e in entries]
    assert kinds == [("wheel", "mpy-blox"), ("src", "user_main.py"), ("src", "app/main2.py")]
    packages = _retained(broker, "mpypi/packages/#")
    for e in entries:
        if e.get("chunks"):  # larger than the default chunk size (the framework wheel)
            assert topics.package_topic(e) not in packages
            data = b"".join(packages[topics.chunk_topic(e, k)] for k in range(e["chunks"]))
            assert topics.chunk_topic(e, None) in packages
        else:
            data = packages[topics.package_topic(e)]
        assert hashlib.sha256(data).hexdigest() == e["pkg_sha256"] and len(data) == e["size"]
    with pytest.raises(manifest.InvalidUpdate, match="bad signature"):
        manifest.decode_list(lists["mpypi/channels/t1"], b"another-key-entirely", None)
    _clear(broker, ["mpypi/channels/t1"])


def test_seq_grows_across_publishes_and_across_workstations(broker, tmp_path, monkeypatch):
    (tmp_path / "key").write_text(KEY)
    url = f"mqtt://{broker.host}:{broker.port}"
    args = ["publish", "--broker", url, "--key-file", "key"]
    assert cli([*args, "--channel", "t2"]) == 0
    first = _seq_in(_retained(broker, "mpypi/channels/t2")["mpypi/channels/t2"])
    # Another workstation: no local state, but it sees the retained lists.
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "other-workstation")
    assert cli([*args, "--device-ids", "esp32-00000000000a", "esp32-00000000000b"]) == 0
    cmds = _retained(broker, "mpypi/nodes/+/cmd")
    seqs = {_seq_in(cmds[f"mpypi/nodes/esp32-00000000000{x}/cmd"]) for x in "ab"}
    assert seqs == {first + 1}
    _seq, _ = manifest.decode_list(
        cmds["mpypi/nodes/esp32-00000000000a/cmd"], KEY.encode(), "nodes/esp32-00000000000a/cmd"
    )
    with pytest.raises(manifest.InvalidUpdate, match="list is for"):
        # a command for one device is not valid on another's topic
        manifest.decode_list(
            cmds["mpypi/nodes/esp32-00000000000a/cmd"],
            KEY.encode(),
            "nodes/esp32-00000000000b/cmd",
        )
    _clear(
        broker,
        [
            "mpypi/channels/t2",
            "mpypi/nodes/esp32-00000000000a/cmd",
            "mpypi/nodes/esp32-00000000000b/cmd",
        ],
    )


def test_a_foreign_wheel_is_repacked_and_published_with_its_own_name(broker, tmp_path):
    import zipfile

    src = tmp_path / "sensors-1.2.0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("sensors/__init__.py", "X = 1\n" * 500)
        z.writestr(
            "sensors-1.2.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: sensors\nVersion: 1.2.0\n",
        )
        z.writestr("sensors-1.2.0.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: py3-none-any\n")
        z.writestr("sensors-1.2.0.dist-info/RECORD", "")
    pkg = publish.wheel_package(src)
    assert pkg.entry["name"] == "sensors" and pkg.entry["version"] == "1.2.0"
    assert pkg.entry["tag"] == "py3-none-any"
    assert pkg.data != src.read_bytes()  # re-deflated with the device window
    assert publish.wheel_package(src).data == pkg.data  # deterministic


def test_unsigned_publish_uses_the_seed_format(broker, tmp_path):
    url = f"mqtt://{broker.host}:{broker.port}"
    assert cli(["publish", "--broker", url, "--channel", "t3"]) == 0
    payload = _retained(broker, "mpypi/channels/t3")["mpypi/channels/t3"]
    assert payload.startswith(b"[")
    seq, entries = manifest.decode_list(payload)
    assert seq is None and entries[0]["name"] == "mpy-blox"
    _clear(broker, ["mpypi/channels/t3"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--extra-src-files", "missing.py"], "missing.py: no such file"),
        (["--extra-src-files", "user_main.py:a/+/b.py"], "unsafe character '+'"),
        (["--extra-src-files", "user_main.py:x/#"], "unsafe character '#'"),
        (["--extra-src-files", "user_main.py:../etc/passwd"], "unsafe path"),
        (["--extra-src-files", "user_main.py:/abs.py"], "absolute path"),
        (["--extra-src-files", "user_main.py:main.py"], "reserved path"),
        (["--key-file", "nokey"], "key file nokey: no such file"),
        (["--key-file", "shortkey"], "expected one line of at least 16 characters"),
        (["--wheel", "not-a-wheel.whl"], "not a readable wheel"),
    ],
)
def test_bad_input_is_one_clear_line_and_publishes_nothing(
    broker, tmp_path, capsys, extra, message
):
    (tmp_path / "user_main.py").write_text("pass\n")
    (tmp_path / "shortkey").write_text("abc\n")
    (tmp_path / "not-a-wheel.whl").write_text("hello")
    url = f"mqtt://{broker.host}:{broker.port}"
    assert cli(["publish", "--broker", url, "--channel", "bad", *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mpy-blox: ")
    assert _retained(broker, "mpypi/channels/bad") == {}


@pytest.mark.parametrize(
    "target, message",
    [
        (["--device-ids", "esp32-xyz"], "device id 'esp32-xyz': an ESP32's id is 'esp32-'"),
        (["--device-ids", "a/b"], "device id 'a/b': an ESP32's id is 'esp32-'"),
        (["--device-ids", "esp32-840d8ed29760", "esp32-f18d6997+4c"], "'esp32-f18d6997+4c'"),
        (["--channel", "a/#"], "channel 'a/#': a channel name has no MQTT wildcard"),
        (["--channel", "/lead"], "channel '/lead': a channel name has no MQTT wildcard"),
    ],
)
def test_a_bad_target_is_refused_before_anything_is_published(
    broker, tmp_path, capsys, target, message
):
    # Every target is checked first: not the packages, then a traceback at the list.
    content = f"# {tmp_path}\nasync def user_main():\n    pass\n".encode()
    (tmp_path / "user_main.py").write_bytes(content)
    url = f"mqtt://{broker.host}:{broker.port}"
    args = ["publish", "--broker", url, "--extra-src-files", "user_main.py", *target]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mpy-blox: "), err
    package = f"mpypi/packages/src/user_main.py/{hashlib.sha256(content).hexdigest()}"
    assert _retained(broker, package) == {}
    lists = _retained(broker, "mpypi/nodes/#") | _retained(broker, "mpypi/channels/#")
    named = [t for t in target if not t.startswith("--")]
    assert not [topic for topic in lists if any(n in topic for n in named)]


def test_the_broker_and_channel_taken_from_settings_are_said(broker, tmp_path, capsys):
    settings = {
        "mqtt": {"server": broker.host, "port": broker.port},
        **NO_NTP,
        "update": {"channel": "cfg"},
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "user_main.py").write_text("async def user_main():\n    pass\n")
    try:
        assert cli(["publish", "--extra-src-files", "user_main.py"]) == 0
        out = capsys.readouterr().out
        said = f"mpy-blox: publishing with broker mqtt://{broker.host}:{broker.port} and"
        assert f"{said} channel cfg (./settings.json)" in out, out
        assert "mpypi/channels/cfg" in _retained(broker, "mpypi/channels/cfg")
    finally:
        _clear(broker, ["mpypi/channels/cfg"])


def test_unreachable_broker_and_refused_login_are_one_clear_line(broker_factory, tmp_path):
    from mpy_blox_tools.broker import free_port

    pw = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "publisher", "right"], check=True)
    b = broker_factory(f"password_file {pw}", allow_anonymous=False)
    script = [sys.executable, str(REPO / "scripts" / "publish_ota_update.py"), "--channel", "x"]
    for url, message in [
        (f"mqtt://127.0.0.1:{free_port()}", "cannot reach the broker"),
        (f"mqtt://publisher:wrong@{b.host}:{b.port}", "refused the connection"),
    ]:
        proc = subprocess.run(
            [*script, "--broker", url], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 1
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


# Retained lists that do not verify with the publisher's key (issue 19, finding 1):
# each one a warning naming its topic, none counted, none a crash.
FORGED = {
    "mpypi/channels/f1": manifest.SIGNED_HEADER + b'00\n{"v": 1, "seq": 2147483646, "to": "x"}',
    "mpypi/channels/f2": manifest.SIGNED_HEADER + b'00\n{"seq": [1]}',
    "mpypi/channels/f3": manifest.SIGNED_HEADER + b"00\n{}",
    "mpypi/channels/f4": manifest.SIGNED_HEADER + b'00\n{"seq": 1e999}',
    "mpypi/channels/f5": manifest.ED25519_HEADER + b"zz\n\xff\xfe",
    "mpypi/nodes/esp32-00000000000f/cmd": manifest.encode_list([], 99999, "another key", "x"),
    "mpypi/channels/f6": b"[" * 5000,
}


def _plant(b, messages: dict[str, bytes]) -> None:
    c = mqtt.connect(mqtt.BrokerURL(b.host, b.port))
    for t, p in messages.items():
        c.publish(t, p, qos=1, retain=True).wait_for_publish(5)
    mqtt.disconnect(c)


def test_forged_or_junk_retained_lists_do_not_set_the_seq_and_each_is_one_warning(
    broker_factory, tmp_path, capsys
):
    b = broker_factory()
    _plant(b, FORGED)
    (tmp_path / "key").write_text(KEY)
    url = f"mqtt://{b.host}:{b.port}"
    assert cli(["publish", "--broker", url, "--key-file", "key", "--channel", "mine"]) == 0
    out = capsys.readouterr().out
    assert _seq_in(_retained(b, "mpypi/channels/mine")["mpypi/channels/mine"]) == 1
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert sorted(w.split()[4] for w in warnings) == sorted(FORGED), out
    assert all("not counted" in w for w in warnings)
    # The next publish counts its own verified list, and still none of the forged ones.
    assert cli(["publish", "--broker", url, "--key-file", "key", "--channel", "mine"]) == 0
    assert _seq_in(_retained(b, "mpypi/channels/mine")["mpypi/channels/mine"]) == 2


def test_a_seq_far_from_this_workstations_own_needs_force(broker_factory, tmp_path, capsys):
    b = broker_factory()
    (tmp_path / "key").write_text(KEY)
    url = f"mqtt://{b.host}:{b.port}"
    args = ["publish", "--broker", url, "--key-file", "key", "--channel", "j"]
    assert cli(args) == 0  # seq 1, remembered in this workstation's state
    # A list our key verifies (an HMAC key is on every device: it can be extracted).
    far = 1 + publish.SEQ_JUMP_LIMIT + 1
    _plant(b, {"mpypi/channels/other": manifest.encode_list([], far, KEY, "channels/other")})
    capsys.readouterr()
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("mpy-blox: ") and err.count("\n") == 1
    assert f"seq {far} on mpypi/channels/other and 1 in" in err and "--force" in err
    assert _seq_in(_retained(b, "mpypi/channels/j")["mpypi/channels/j"]) == 1  # unchanged
    assert cli([*args, "--force"]) == 0
    assert _seq_in(_retained(b, "mpypi/channels/j")["mpypi/channels/j"]) == far + 1
    # Within the bound, no --force: the other workstation's lists simply count.
    _plant(b, {"mpypi/channels/other": manifest.encode_list([], far + 500, KEY, "channels/other")})
    assert cli(args) == 0
    assert _seq_in(_retained(b, "mpypi/channels/j")["mpypi/channels/j"]) == far + 501


def test_a_corrupt_state_file_is_a_warning_not_a_crash(broker_factory, tmp_path, capsys):
    b = broker_factory()
    (tmp_path / "key").write_text(KEY)
    url = f"mqtt://{b.host}:{b.port}"
    publish.STATE_DIR.mkdir(parents=True)
    for junk in ("[1]", "{", json.dumps({str(mqtt.BrokerURL.parse(url)): "many"})):
        (publish.STATE_DIR / "seq.json").write_text(junk)
        assert cli(["publish", "--broker", url, "--key-file", "key", "--channel", "c"]) == 0
        assert "warning:" in capsys.readouterr().out


def test_an_ed25519_release_key_signs_what_its_public_key_verifies(broker, tmp_path, capsys):
    from mpy_blox_tools import keys

    url = f"mqtt://{broker.host}:{broker.port}"
    assert cli(["keygen", "release.key"]) == 0 and cli(["keygen", "next.key"]) == 0
    pub = keys.load_public_key("release.key.pub")
    trust = manifest.Trust(pubkeys=[bytes.fromhex(pub)])
    args = ["publish", "--broker", url, "--key-file", "release.key", "--channel", "ed"]
    assert cli([*args, "--expires", "30d", "--next-pubkey", "next.key.pub"]) == 0
    payload = _retained(broker, "mpypi/channels/ed")["mpypi/channels/ed"]
    assert payload.startswith(manifest.ED25519_HEADER)
    got = manifest.decode(payload, trust, "channels/ed")
    assert got.signer == 0 and got.seq >= 1 and got.entries[0]["name"] == "mpy-blox"
    assert got.next_pubkey == bytes.fromhex(keys.load_public_key("next.key.pub"))
    assert abs(got.expires - (time.time() + 30 * 86400)) < 600
    with pytest.raises(manifest.InvalidUpdate, match="bad signature"):
        manifest.decode(payload, manifest.Trust(pubkeys=[got.next_pubkey]))
    with pytest.raises(manifest.InvalidUpdate, match=r"no update\.pubkey"):
        manifest.decode(payload, KEY)
    # Another workstation counts on from the list it verifies with the same key.
    publish.STATE_DIR = tmp_path / "elsewhere"
    assert cli(args) == 0
    again = manifest.decode(_retained(broker, "mpypi/channels/ed")["mpypi/channels/ed"], trust)
    assert again.seq == got.seq + 1 and again.expires is None and again.next_pubkey is None
    _clear(broker, ["mpypi/channels/ed"])


@pytest.mark.parametrize(
    "files, extra, message",
    [
        ({}, ["--key-file", "release.key.pub"], "is a public key (.pub): sign with the private"),
        ({"pem.pub": "PUBPEM"}, ["--key-file", "pem.pub"], "is a public key: sign with"),
        ({"rsa.pem": "RSA"}, ["--key-file", "rsa.pem"], "not an Ed25519 key"),
        ({"junk": b"\x00\x01\xff" * 20}, ["--key-file", "junk"], "neither an Ed25519 private"),
        ({}, ["--key-file", "release.key", "--expires", "soon"], "--expires 'soon': expected"),
        ({}, ["--key-file", "release.key", "--expires", "0d"], "--expires '0d': expected"),
        ({}, ["--key-file", "release.key", "--next-pubkey", "release.key"], "is a private key"),
        (
            {"bad.pub": "abc\n"},
            ["--key-file", "release.key", "--next-pubkey", "bad.pub"],
            "64 hex",
        ),
        ({}, ["--next-pubkey", "release.key.pub"], "need a signed list: give --key-file"),
    ],
)
def test_a_bad_key_or_signing_option_is_one_clear_line_and_publishes_nothing(
    broker, tmp_path, capsys, files, extra, message
):
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
        load_pem_private_key,
    )

    assert cli(["keygen", "release.key"]) == 0
    private = load_pem_private_key((tmp_path / "release.key").read_bytes(), None)
    made = {
        "PUBPEM": lambda: private.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        ),
        "RSA": lambda: rsa.generate_private_key(65537, 2048).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        ),
    }
    for name, content in files.items():
        content = made[content]() if isinstance(content, str) and content in made else content
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    capsys.readouterr()
    url = f"mqtt://{broker.host}:{broker.port}"
    assert cli(["publish", "--broker", url, "--channel", "badkey", *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mpy-blox: "), err
    assert _retained(broker, "mpypi/channels/badkey") == {}


def test_lists_alone_name_the_packages_already_retained_and_are_shown_before_any_goes(
    broker, tmp_path
):
    """What a rollout's later stages do: `send_packages=False` sends the lists only,
    naming the entries (chunks included) the first publish retained; `before_lists`
    sees every list, signed, before the first goes out."""
    (tmp_path / "big.bin").write_bytes(bytes(range(256)) * 40)  # 10240 bytes: 3 chunks
    packages = [publish.src_package(tmp_path / "big.bin")]
    url = mqtt.BrokerURL(broker.host, broker.port)
    ids = ("esp32-00000000a001", "esp32-00000000a002")
    cmd_topics = [topics.node_topic(d, "cmd") for d in ids]
    first = publish.publish_update(url, packages, device_ids=ids[:1], key=KEY, chunk_size=4096)
    watcher = mqtt.connect(url)
    live: list[str] = []
    watcher.on_message = lambda c, u, m: None if m.retain else live.append(m.topic)
    watcher.subscribe([("mpypi/packages/#", 1), ("mpypi/nodes/+/cmd", 1)])
    seen = []

    def before_lists(seq, lists):
        seen.append((seq, [t for t, _ in lists], list(live)))

    try:
        time.sleep(0.3)  # the retained ones first
        live.clear()
        again = publish.publish_update(
            url,
            packages,
            device_ids=ids,
            key=KEY,
            chunk_size=4096,
            send_packages=False,
            before_lists=before_lists,
            log=lambda line: None,
        )
        deadline = time.monotonic() + 5
        while len(live) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        mqtt.disconnect(watcher)
    assert again.entries == first.entries and again.entries[0]["chunks"] == 3
    assert seen == [(again.seq, cmd_topics, [])]  # once, before any list went
    assert sorted(live) == cmd_topics  # the lists, and no package again
    retained = _retained(broker, "mpypi/nodes/+/cmd")
    assert again.payload_bytes == sum(len(retained[t]) for t in cmd_topics)
    e = first.entries[0]
    chunk_topics = [topics.chunk_topic(e, k) for k in (*range(e["chunks"]), None)]
    _clear(broker, [*cmd_topics, *chunk_topics])
