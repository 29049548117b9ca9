"""Verifying an update list on the device: Ed25519 (mpy_blox.ed25519) against HMAC-SHA256.

Each lane (the 64-bit `micropython` of the venv, the 32-bit one of
$MPY_BLOX_MICROPYTHON32) loads the modules as a device does, compiled with
mpy-cross, and verifies what manifest._verify verifies: for Ed25519, SHA-256 of
a 1 KiB list body, then the signature over that digest (made by `cryptography`);
for HMAC, HMAC-SHA256 of the same body and a constant-time compare.

Columns:
  verify ms       median of 15 verifications (one process, after one warm-up)
  vs hmac         that time over the HMAC row's, same lane
  module bytes    gc.mem_alloc() grown by importing the module (stays while loaded)
  verify heap     the smallest --heap the snippet verifies in, minus the smallest it
                  runs in without verifying (256-byte steps): the heap the
                  verification itself needs above what is already there
  edge heap       that smallest --heap with the verification

Side by side in one run: the ratios hold on a noisy machine; the absolute times
are this machine's, not an ESP32's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mpy_blox_tools import build, micropython

TITLE = "Update list verification: Ed25519 vs HMAC-SHA256, 32-bit and 64-bit lanes"
REPO = Path(__file__).resolve().parents[1]
RUNS = 15

SNIPPET = """
import gc, time, binascii
u = binascii.unhexlify
case = {case!r}
gc.collect()
before = gc.mem_alloc()
if case["method"] == "ed25519":
    import hashlib
    from mpy_blox import ed25519
    def check(body, pub, sig):
        return ed25519.verify(pub, hashlib.sha256(body).digest(), sig)
else:
    from mpy_blox import hmac
    def check(body, key, tag):
        return hmac.compare_digest(hmac.hmac_sha256(key, body), tag)
gc.collect()
module = gc.mem_alloc() - before
body, key, sig = u(case["body"]), u(case["key"]), u(case["sig"])
gc.collect()
times = []
for i in range(case["runs"]):
    t = time.ticks_us()
    ok = check(body, key, sig) if case["verify"] else True
    times.append(time.ticks_diff(time.ticks_us(), t))
    if not ok:
        raise SystemExit("BAD")
times.sort()
print("RESULT", module, times[len(times) // 2])
"""


def _cases() -> dict[str, dict]:
    body = json.dumps({"v": 1, "seq": 42, "to": "channels/stable", "pad": "x" * 960}).encode()
    body = body[:1024]
    private = Ed25519PrivateKey.generate()
    pub = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    sig = private.sign(hashlib.sha256(body).digest())
    hkey = os.urandom(32).hex().encode()
    import hmac

    tag = hmac.new(hkey, body, hashlib.sha256).digest()
    return {
        "hmac-sha256": {"method": "hmac", "body": body.hex(), "key": hkey.hex(), "sig": tag.hex()},
        "ed25519": {"method": "ed25519", "body": body.hex(), "key": pub.hex(), "sig": sig.hex()},
    }


def _run(lane, root: Path, case: dict, heap: int, verify: bool, runs: int):
    code = SNIPPET.format(case={**case, "verify": verify, "runs": runs})
    proc = micropython.run_snippet(
        code, heap=heap, path=[str(root)], executable=lane.executable, timeout=120
    )
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return [int(v) for v in line.split()[1:]]
    return None


def _edge(lane, root: Path, case: dict, verify: bool) -> int:
    # The smallest heap (256-byte steps) the snippet completes in: bisection.
    lo, hi = 1024, 64 * 1024
    if _run(lane, root, case, hi, verify, 1) is None:
        raise RuntimeError(f"{lane.name}: does not run in {hi} bytes of heap")
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        if _run(lane, root, case, mid, verify, 1) is None:
            lo = mid
        else:
            hi = mid
    return hi


def run(workdir: Path) -> list[dict]:
    root = workdir / "device"
    build.compile_framework(root, REPO / "mpy_blox")
    lanes = [micropython.lane64(), micropython.lane32()]
    cases = _cases()
    rows = []
    for lane in lanes:
        if lane is None:
            rows.append({"lane": "32-bit", "method": "n/a (MPY_BLOX_MICROPYTHON32 unset)"})
            continue
        got = {}
        for name, case in cases.items():
            module, median_us = _run(lane, root, case, 256 * 1024, True, RUNS)
            edge = _edge(lane, root, case, True)
            got[name] = {
                "lane": lane.name,
                "method": name,
                "verify ms": median_us / 1000,
                "module bytes": module,
                "verify heap": edge - _edge(lane, root, case, False),
                "edge heap": edge,
            }
        base = got["hmac-sha256"]["verify ms"]
        for row in got.values():
            row["vs hmac"] = row["verify ms"] / base if base else float("nan")
            rows.append(row)
    return rows
