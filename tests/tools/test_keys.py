"""`mpy-blox keygen` and release keys: PKCS#8 PEM (0600) and PATH.pub, never overwritten."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from mpy_blox import ed25519
from mpy_blox.update import manifest
from mpy_blox_tools import keys
from mpy_blox_tools.cli import main as cli


def test_keygen_writes_a_private_pem_0600_and_the_public_hex(tmp_path, capsys):
    path = tmp_path / "release.key"
    assert cli(["keygen", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    pub = (tmp_path / "release.key.pub").read_text()
    assert pub.endswith("\n") and pub.count("\n") == 1
    assert len(pub.strip()) == 64 and pub.strip() == pub.strip().lower()
    assert f"update.pubkey: {pub.strip()}" in capsys.readouterr().out
    key = keys.load_signing_key(path)
    assert isinstance(key, keys.ReleaseKey) and key.public_hex == pub.strip()
    assert manifest.check_pubkey(pub.strip()) == key.public_bytes
    # What it signs, the device's verifier accepts.
    sig = key.sign(b"\x42" * 32)
    assert ed25519.verify(key.public_bytes, b"\x42" * 32, sig)
    assert not ed25519.verify(key.public_bytes, b"\x43" * 32, sig)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_reads_the_private_key_and_derives_the_same_public_key(tmp_path):
    path = tmp_path / "k"
    key = keys.generate(path)
    der = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
        capture_output=True,
        check=True,
    ).stdout
    assert der[-32:] == key.public_bytes  # SubjectPublicKeyInfo ends with the raw key


def test_keygen_never_overwrites_without_force(tmp_path, capsys):
    path = tmp_path / "release.key"
    assert cli(["keygen", str(path)]) == 0
    before = path.read_bytes(), (tmp_path / "release.key.pub").read_bytes()
    capsys.readouterr()
    assert cli(["keygen", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"mpy-blox: {path} exists: not overwritten (--force replaces it)\n"
    assert (path.read_bytes(), (tmp_path / "release.key.pub").read_bytes()) == before
    # A .pub alone in the way is refused too, and nothing is written.
    other = tmp_path / "other.key"
    (tmp_path / "other.key.pub").write_text("keep me\n")
    assert cli(["keygen", str(other)]) == 1
    assert not other.exists() and (tmp_path / "other.key.pub").read_text() == "keep me\n"
    # A link planted at the name is not followed.
    target = tmp_path / "elsewhere"
    os.symlink(target, tmp_path / "linked.key")
    assert cli(["keygen", str(tmp_path / "linked.key")]) == 1 and not target.exists()
    # --force replaces both, still 0600.
    assert cli(["keygen", "--force", str(path)]) == 0
    after = path.read_bytes(), (tmp_path / "release.key.pub").read_bytes()
    assert after[0] != before[0] and after[1] != before[1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.load_signing_key(path).public_hex == after[1].decode().strip()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_keygen_into_a_missing_folder_is_one_line(tmp_path, capsys):
    assert cli(["keygen", str(tmp_path / "no" / "such" / "k")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mpy-blox: ") and "no such folder" in err and err.count("\n") == 1


def test_an_hmac_key_file_is_still_an_hmac_key(tmp_path):
    (tmp_path / "update.key").write_text("k" * 64 + "\n")
    assert keys.load_signing_key(tmp_path / "update.key") == b"k" * 64
    trust = keys.trust_of(b"k" * 64)
    assert trust.hmac_key == b"k" * 64 and not trust.pubkeys
