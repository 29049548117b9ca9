"""The shared wire format: the same results on CPython (publisher) and MicroPython (device)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from mpy_blox.update import manifest
from mpy_blox.update.manifest import InvalidUpdate

SHA = "ab" * 32
ENTRIES = [
    manifest.wheel_entry("mpy-blox", "0.7.0", SHA, 1234, "mpy6-bytecode-esp32"),
    manifest.src_entry("user_main.py", "cd" * 32, 56),
]


@pytest.mark.parametrize("key", [b"", b"k", b"x" * 64, b"y" * 65, bytes(range(200))])
def test_hmac_sha256_matches_cpython_hmac(key):
    for data in (b"", b"abc", bytes(1000)):
        assert manifest.hmac_sha256(key, data) == hmac.new(key, data, hashlib.sha256).digest()


def test_hmac_sha256_on_micropython_matches_cpython_hmac(run_mpy):
    out = run_mpy("""
import binascii
from mpy_blox.update.manifest import hmac_sha256
for key in (b"", b"k", b"x" * 64, b"y" * 65, "a text key"):
    print(binascii.hexlify(hmac_sha256(key, b"some list bytes")).decode())
""")
    want = [
        hmac.new(k, b"some list bytes", hashlib.sha256).hexdigest()
        for k in (b"", b"k", b"x" * 64, b"y" * 65, b"a text key")
    ]
    assert out.split() == want


def test_signed_list_made_on_cpython_is_accepted_on_micropython(run_mpy, tmp_path):
    payload = manifest.encode_list(ENTRIES, 42, "the key", "channels/stable")
    (tmp_path / "list.bin").write_bytes(payload)
    out = run_mpy(f"""
import json
from mpy_blox.update.manifest import accept_list, InvalidUpdate
payload = open({str(tmp_path / "list.bin")!r}, "rb").read()
seq, entries = accept_list(payload, "the key", 41, "channels/stable")
print(json.dumps([seq, entries]))
for args in (("other key", 41, "channels/stable"), ("the key", 42, "channels/stable"),
             ("the key", 1, "channels/beta"), (None, 0, None)):
    try:
        accept_list(payload if args[0] else b"[1]", *args)
    except InvalidUpdate as e:
        print("REFUSED", e)
""")
    lines = out.strip().splitlines()
    seq, entries = json.loads(lines[0])
    assert seq == 42 and entries == manifest.decode_list(payload, "the key")[1]
    assert lines[1:] == [
        "REFUSED bad signature",
        "REFUSED replayed or older list: seq 42, device at 42",
        "REFUSED list is for channels/stable",
        "REFUSED a list entry is not an object",
    ]


def test_seed_form_is_accepted_without_a_key_and_refused_with_one():
    seed = json.dumps([{k: v for k, v in e.items() if k != "size"} for e in ENTRIES]).encode()
    seq, entries = manifest.decode_list(seed)
    assert seq is None and entries[0]["size"] is None and entries[1]["path"] == "user_main.py"
    with pytest.raises(InvalidUpdate, match="unsigned list refused"):
        manifest.decode_list(seed, "key")


def test_the_seed_example_decodes():
    from update_kit import REPO

    _, entries = manifest.decode_list((REPO / "examples/update-channel.json").read_bytes())
    assert [e["type"] for e in entries] == ["wheel", "src"]


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"mpypi-hmac-sha256 00", "malformed signed list"),
        (b"{}", "not a JSON array"),
        (b'[{"type": "wheel", "name": "a", "version": "1", "pkg_sha256": "AB"}]', "64 lower-case"),
        (
            b'[{"type": "wheel", "name": "a b", "version": "1", "pkg_sha256": "'
            + SHA.encode()
            + b'"}]',
            "bad name",
        ),
        (
            b'[{"type": "src", "path": "a.py", "pkg_sha256": "'
            + SHA.encode()
            + b'", "size": -1}]',
            "bad size",
        ),
        (
            b'[{"type": "src", "path": "a.py", "pkg_sha256": "' + SHA.encode() + b'"},'
            b' {"type": "src", "path": "a.py", "pkg_sha256": "' + SHA.encode() + b'"}]',
            "listed twice",
        ),
        (b" " * 20000, "list too large"),
    ],
)
def test_malformed_lists_are_refused_with_a_reason(body, reason):
    with pytest.raises(InvalidUpdate, match=reason):
        manifest.decode_list(body)


def test_malformed_signature_is_refused_on_a_keyed_device():
    with pytest.raises(InvalidUpdate, match="malformed signature"):
        manifest.decode_list(b"mpypi-hmac-sha256 zz\n{}", "k")


def test_signed_entry_needs_a_size():
    entry = dict(ENTRIES[1])
    del entry["size"]
    with pytest.raises(InvalidUpdate, match="without size"):
        manifest.decode_list(manifest.encode_list([entry], 1, "k", "channels/t"), "k")


TOPICS = """
from mpy_blox import topics
e = {"type": "wheel", "pkg_sha256": "ab" * 32}
s = {"type": "src", "path": "user_main.py", "pkg_sha256": "cd" * 32}
print(topics.package_topic(e), topics.package_topic(s), topics.channel_topic("stable"),
      topics.node_topic("esp32-1", "cmd"), topics.list_to(topics.node_topic("esp32-1", "cmd")),
      topics.list_to(topics.channel_topic("beta")), topics.parse_node("mpypi/nodes/d/info"),
      topics.parse_node("mpypi/channels/x"))
"""
TOPICS_OUT = (
    f"mpypi/packages/wheel/{SHA} mpypi/packages/src/user_main.py/{'cd' * 32} "
    "mpypi/channels/stable mpypi/nodes/esp32-1/cmd nodes/esp32-1/cmd "
    "channels/beta ('d', 'info') None"
)


def test_topics_are_built_alike_on_cpython_and_micropython(run_mpy, capsys):
    exec(TOPICS, {})
    assert capsys.readouterr().out.strip() == TOPICS_OUT
    assert run_mpy(TOPICS).strip() == TOPICS_OUT


def test_a_package_named_twice_in_two_spellings_is_listed_twice(run_mpy):
    e = [
        manifest.wheel_entry("foo.bar", "1.0", SHA, 1),
        manifest.wheel_entry("Foo-Bar", "2.0", "cd" * 32, 1),
    ]
    with pytest.raises(InvalidUpdate, match="listed twice: foo_bar"):
        manifest.decode_list(manifest.encode_list(e))
    body = manifest.encode_list(e).decode()
    out = run_mpy(f"""
from mpy_blox.update.manifest import decode_list, InvalidUpdate
try:
    decode_list({body!r}.encode())
except InvalidUpdate as e:
    print("REFUSED", e)
""")
    assert out.strip() == "REFUSED listed twice: foo_bar"


def _signed_body(**fields):
    doc = {"v": 1, "seq": 5, "to": "channels/t", "packages": [ENTRIES[1]], **fields}
    doc = {k: v for k, v in doc.items() if v is not None}
    body = json.dumps(doc).encode()
    mac = hmac.new(b"the key", body, hashlib.sha256).hexdigest().encode()
    return manifest.SIGNED_HEADER + mac + b"\n" + body


@pytest.mark.parametrize(
    "fields,reason",
    [
        ({"seq": 0}, "bad seq"),
        ({"seq": 2**31}, "bad seq"),  # NVS keeps an i32: refused before anything stores it
        ({"seq": 2**63}, "bad seq"),
        ({"seq": True}, "bad seq"),
        ({"seq": [1]}, "bad seq"),
        ({"seq": 1.5}, "bad seq"),
        ({"to": None}, "signed list without to"),
        ({"to": ""}, "signed list without to"),
        ({"to": 7}, "signed list without to"),
        ({"expires": "tomorrow"}, "bad expires"),
        ({"next_pubkey": "ab"}, "64 hex digits"),
    ],
)
def test_a_signed_list_with_a_bad_field_is_refused_even_with_a_valid_signature(fields, reason):
    with pytest.raises(InvalidUpdate, match=reason):
        manifest.decode_list(_signed_body(**fields), "the key", "channels/t")


def test_the_highest_seq_an_nvs_i32_holds_is_accepted():
    assert manifest.decode_list(_signed_body(seq=2**31 - 1), "the key")[0] == 2**31 - 1
    with pytest.raises(ValueError):
        manifest.encode_list(ENTRIES, 2**31, "the key", "channels/t")
    with pytest.raises(ValueError):
        manifest.encode_list(ENTRIES, 1, "the key")  # no to: a signed list always names it


def test_a_keyless_device_takes_a_signed_list_but_not_its_seq():
    # An unverified seq must never be stored: a forged 2**31-1 would lock the
    # device out of every real list once it is given a key (issue 19, finding 5).
    forged = manifest.SIGNED_HEADER + b"00\n" + _signed_body(seq=2**31 - 1).split(b"\n", 1)[1]
    got = manifest.decode(forged)
    assert got.seq is None and got.signer is None and got.entries[0]["path"] == "user_main.py"


def test_a_locked_device_refuses_every_list_with_its_reason():
    locked = manifest.Trust(refuse="the secure store is unreadable")
    for payload in (_signed_body(), b"[]"):
        with pytest.raises(InvalidUpdate, match="updates locked: the secure store is unreadable"):
            manifest.decode_list(payload, locked)
    assert not locked.keyless() and manifest.Trust().keyless()


def test_one_kind_of_key_does_not_accept_the_other_kind_of_list():
    ed_form = manifest.ED25519_HEADER + b"00" * 64 + b"\n" + _signed_body().split(b"\n", 1)[1]
    with pytest.raises(InvalidUpdate, match=r"no update\.pubkey"):
        manifest.decode_list(ed_form, "the key")
    with pytest.raises(InvalidUpdate, match="trusts only its Ed25519 key"):
        manifest.decode_list(_signed_body(), manifest.Trust(pubkeys=[b"\x01" * 32]))


FIRMWARE = manifest.firmware_entry("esp32", "v1.22.2", SHA, 1600000)

FIRMWARE_CHECKS = """
import json
from mpy_blox import topics
from mpy_blox.update.manifest import decode_list, InvalidUpdate
fw = {fw!r}
src = {{"type": "src", "path": "a.py", "pkg_sha256": "cd" * 32, "size": 1}}
chunked = dict(fw, chunk_size=65536, chunks=25, chunks_sha256="ef" * 32)
for entries in ([fw], [chunked], [fw, src], [src, fw], [fw, dict(fw, version="v2")],
                [dict(fw, size=None)], [dict(fw, chip="esp 32")], [dict(fw, chunks=24,
                chunk_size=65536, chunks_sha256="ef" * 32)]):
    try:
        got = decode_list(json.dumps(entries).encode())[1]
        print("OK", topics.package_topic(got[0]), sorted(got[0]))
    except InvalidUpdate as e:
        print("REFUSED", e)
"""


def test_firmware_entries_are_checked_alike_on_cpython_and_micropython(run_mpy, capsys):
    # One image per list, packages beside it; chip and version as names are; a size
    # always (the pre-flight compares it with the partition); chunk fields as for any
    # package; its topic under mpypi/packages/firmware/.
    code = FIRMWARE_CHECKS.format(fw=FIRMWARE)
    exec(code, {})
    out = capsys.readouterr().out.strip().splitlines()
    fields = "['chip', 'pkg_sha256', 'size', 'type', 'version']"
    assert out == [
        f"OK mpypi/packages/firmware/{SHA} {fields}",
        f"OK mpypi/packages/firmware/{SHA} "
        "['chip', 'chunk_size', 'chunks', 'chunks_sha256', 'pkg_sha256', 'size', 'type', "
        "'version']",
        f"OK mpypi/packages/firmware/{SHA} {fields}",
        "OK mpypi/packages/src/a.py/" + "cd" * 32 + " ['path', 'pkg_sha256', 'size', 'type']",
        "REFUSED more than one firmware image in the list",
        "REFUSED firmware entry without size",
        "REFUSED bad chip: esp 32",
        "REFUSED chunks disagrees with size and chunk_size",
    ]
    assert run_mpy(code).strip().splitlines() == out
