"""What a device trusts (mpy_blox/update/trust.py), run on MicroPython without a board:
the fail-closed policy, Ed25519 key rotation, and `expires` against the clock.

NVS is a dict-backed `esp32` stand-in that counts writes; the board tests
(test_update_trust_board.py) use the virtual board's emulation.
"""

from __future__ import annotations

import re

import pytest

FAKE_ESP32 = """
class NVS:
    data = {}
    writes = 0

    def __init__(self, namespace):
        self.ns = namespace

    def _get(self, key):
        try:
            return NVS.data[self.ns + "/" + key]
        except KeyError:
            raise OSError(-0x1102, "ESP_ERR_NVS_NOT_FOUND")

    def get_i32(self, key):
        return self._get(key)

    def set_i32(self, key, value):
        NVS.data[self.ns + "/" + key] = value
        NVS.writes += 1

    def set_blob(self, key, value):
        NVS.data[self.ns + "/" + key] = bytes(value)
        NVS.writes += 1

    def get_blob(self, key, buf):
        value = self._get(key)
        buf[: len(value)] = value
        return len(value)

    def erase_key(self, key):
        self._get(key)
        del NVS.data[self.ns + "/" + key]
        NVS.writes += 1

    def commit(self):
        pass
"""

PRELUDE = """
import sys
sys.path.insert(0, {tmp!r})
import esp32
from mpy_blox.config import Config
from mpy_blox.update import manifest, record, trust

UNSIGNED = manifest.encode_list([])

def refusal(t):
    try:
        manifest.decode(UNSIGNED, t)
        return "accepted"
    except manifest.InvalidUpdate as e:
        return str(e)
"""


@pytest.fixture
def run_trust(run_mpy, tmp_path, lane):
    (tmp_path / "esp32.py").write_text(FAKE_ESP32)

    def run(code: str) -> list[str]:
        out = run_mpy(PRELUDE.format(tmp=str(tmp_path)) + code, heap="80K", lane=lane)
        return [line for line in out.splitlines() if not re.match(r"[DIWE] \d", line)]

    return run


def test_a_key_that_cannot_be_read_locks_updates_instead_of_reading_as_no_key(run_trust):
    # Finding 2: each of these read as "no key" and the device took unsigned lists.
    lines = run_trust(
        """
def show(settings=None, secure=None, key_error=None):
    c = Config(settings, secure)
    if key_error:
        c.key_error = key_error
    t = trust.trust(c)
    print(trust.mode(c), "|", refusal(t), "|", trust.signed(c))

show()
show(secure={"update.key": ""})
show(secure={"update.key": 12345})
show(secure={"update.key": ["k"]})
show(settings={"update": {"pubkey": "zz"}})
show(secure={"update.pubkey": ""})
show(secure={"update.pubkey": "ab" * 33})
show(key_error="secure store unreadable")
show(secure={"update.key": "k"}, key_error="/provision.json not provisioned")
record.lock()
record.lock()  # once locked, a boot writes nothing
print("writes", esp32.NVS.writes)
show()
show(secure={"update.key": "k"})
record.unlock()
show()
"""
    )
    assert lines == [
        "none | accepted | False",
        "locked: update.key is empty or not text | updates locked: update.key is empty or not"
        " text | True",
        "locked: update.key is empty or not text | updates locked: update.key is empty or not"
        " text | True",
        "locked: update.key is empty or not text | updates locked: update.key is empty or not"
        " text | True",
        "locked: update.pubkey is not 64 hex digits | updates locked: update.pubkey is not 64"
        " hex digits | True",
        "locked: update.pubkey is not 64 hex digits | updates locked: update.pubkey is not 64"
        " hex digits | True",
        "locked: update.pubkey is not 64 hex digits | updates locked: update.pubkey is not 64"
        " hex digits | True",
        "locked: secure store unreadable | updates locked: secure store unreadable | True",
        "locked: /provision.json not provisioned | updates locked: /provision.json not"
        " provisioned | True",
        "writes 1",
        "locked: this device held an update key and has none now | updates locked: this device"
        " held an update key and has none now | True",
        "hmac | unsigned list refused: this device has an update key | True",
        "none | accepted | False",
    ]


def test_key_rotation_trusts_at_most_the_current_and_the_next_key(run_trust):
    lines = run_trust(
        """
K0, K1, K2, K9 = (bytes([i]) * 32 for i in (1, 2, 3, 9))
NAMES = {K0: "K0", K1: "K1", K2: "K2", K9: "K9"}
cfg = Config({}, {"update.pubkey": "01" * 32})

def keys(c=cfg):
    return " ".join(NAMES[k] for k in trust.trust(c).pubkeys)

def note(signer, nxt=None):
    before = esp32.NVS.writes
    trust.note(cfg, manifest.UpdateList([], 5, signer, None, nxt))
    print(keys(), esp32.NVS.writes - before)

print(keys())
note(0, K1)      # the current key announces K1
note(0, K1)      # again: nothing new, no write
note(0)          # a list without next_pubkey keeps it
note("hmac", K2)  # an HMAC list rotates nothing
note(1)          # K1 signed: K1 is current, K0 forgotten
note(0, K2)      # K1 announces K2
note(1, K0)      # K2 signed and announces K0 again: K2, K0
print(keys(Config({}, {"update.pubkey": "09" * 32})))  # provisioned anew: rotation reset
trust.forget_rotation()
print(keys())
"""
    )
    assert lines == [
        "K0",
        "K0 K1 1",
        "K0 K1 0",
        "K0 K1 0",
        "K0 K1 0",
        "K1 1",
        "K1 K2 1",
        "K2 K0 1",
        "K9",
        "K0",
    ]


def test_expires_is_enforced_once_the_clock_is_set(run_trust):
    # Finding 7: an old signed list replayed onto a device; `expires` limits it,
    # on a clock that is set (past 2025-01-01; an ESP32 without NTP starts in 2000).
    lines = run_trust(
        """
import time
def check(expires, at):
    try:
        trust.check_expires(manifest.UpdateList([], 3, "hmac", expires), at)
        print("ok")
    except manifest.InvalidUpdate as e:
        print(e)

now = trust.now()
print(now is not None and abs(now - time.time()) < 5 or time.gmtime(0)[0] == 2000)
check(None, now)
check(now + 3600, now)
check(now - 1, now)
check(1000, None)  # an unset clock: nothing is enforced
check(1000, 1735689600)
"""
    )
    assert lines == ["True", "ok", "ok", "list expired", "ok", "list expired"]
