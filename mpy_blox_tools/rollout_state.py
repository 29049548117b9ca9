"""A staged rollout's plan and state: pure functions and the retained document.

The state lives on the broker, retained on `mpypi/rollouts/{channel}`, so any
workstation can read it, pause it, resume it or abort it (docs/protocol.md, "Rollouts"):

    {"v": 1, "channel": "stable",
     "status": "running",            # running | paused | halted | aborted | done
     "stages": ["1", "10%", "100%"], # as given
     "targets": [1, 2, 12],          # devices covered once each stage is sent (cumulative)
     "max_failures": "2",            # a count, or a percentage of the devices in the rollout
     "bake_s": 600, "timeout_s": 600,
     "entries": [...],               # the release: the list's entries
     "previous": [...],              # the channel list's entries before (abort --revert), or null
     "order": ["esp32-...", ...],    # the devices, by the SHA256 of their id
     "stage": 1,                     # the stage being sent or waited for (0: the canary)
     "stage_done_at": null,          # when every device of `stage` had an outcome (bake from)
     "devices": {"esp32-...": {"stage": 0, "state": "ok", "seq": 43, "list": "<sha256>",
                               "sent_at": 1764587000.0, "reason": ""}},
     "channel_list": null,           # {"state": "sending"|"sent", "seq", "list"} at the end
     "reason": "",                   # why it halted, paused or aborted
     "rev": 7, "writer": "host:pid", "updated": 1764587000.0}

A device's `state` is `sending`, `sent`, then `ok` or `failed` (with `reason`). A stage
costs a few writes, whatever its size: one write-ahead naming each of its devices
`sending` with its list's seq and SHA256 (the lists are signed before the first goes
out), the lists, one write naming them `sent`; the outcomes in batches (at most one
write every few seconds, and one when the stage is over). A crash between `sending` and
`sent` is settled by each device's retained cmd list: the very bytes recorded, it went
out; anything else, it did not, and is sent then (never twice, never skipped).

Version 1 since the first rollout: that the writes became fewer changed no field and
no meaning, so a workstation of either kind reads the other's document.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time

from mpy_blox import topics
from mpy_blox_tools.errors import MpyBloxError

FORMAT_VERSION = 1
STATUSES = ("running", "paused", "halted", "aborted", "done")
SENDING, SENT, OK, FAILED = "sending", "sent", "ok", "failed"


def topic(channel: str) -> str:
    """The retained topic of the rollout on `channel` ("+" for a filter)."""
    return f"{topics.PREFIX}rollouts/{channel}"


def parse_stages(text: str) -> list[str]:
    """`1,10%,50%,100%`: counts and percentages, each growing, the last 100%."""
    stages = [s.strip() for s in text.split(",")]
    counts, percents = [], []
    for s in stages:
        m = re.fullmatch(r"([0-9]{1,6})(%?)", s)
        if not m:
            raise MpyBloxError(
                f"--stages {text!r}: {s!r} is not a count or a percentage (e.g. 1,10%,50%,100%)"
            )
        n = int(m.group(1))
        if m.group(2):
            if not 0 < n <= 100:
                raise MpyBloxError(f"--stages {text!r}: {s} is not a percentage in 1%..100%")
            if percents and n <= percents[-1]:
                raise MpyBloxError(f"--stages {text!r}: {s} does not grow from {percents[-1]}%")
            percents.append(n)
        else:
            if n < 1:
                raise MpyBloxError(f"--stages {text!r}: a stage has at least one device")
            if counts and n <= counts[-1]:
                raise MpyBloxError(f"--stages {text!r}: {s} does not grow from {counts[-1]}")
            counts.append(n)
    if stages[-1] != "100%":
        raise MpyBloxError(
            f"--stages {text!r}: the last stage is 100% (every device of the channel)"
        )
    return stages


def parse_max_failures(text: str) -> str:
    """`2` (devices) or `10%` (of the devices in the rollout); 0 halts at the first."""
    if not re.fullmatch(r"[0-9]{1,6}%?", text.strip()) or (
        text.endswith("%") and int(text[:-1]) > 100
    ):
        raise MpyBloxError(
            f"--max-failures {text!r}: a number of devices (e.g. 2) or a percentage (e.g. 10%)"
        )
    return text.strip()


def failure_limit(max_failures: str, devices: int) -> int:
    """How many failures are tolerated: the rollout halts when there are more."""
    if max_failures.endswith("%"):
        return int(max_failures[:-1]) * devices // 100
    return int(max_failures)


def targets(stages: list[str], devices: int) -> list[int]:
    """How many devices each stage covers, cumulatively; a stage that adds none
    (10% of 4 devices after a canary of 1) is left out."""
    out: list[int] = []
    for s in stages:
        n = math.ceil(int(s[:-1]) * devices / 100) if s.endswith("%") else int(s)
        n = min(max(n, 1), devices)
        if not out or n > out[-1]:
            out.append(n)
    return out


def order(device_ids) -> list[str]:
    """The devices in rollout order: by the SHA256 of the id, so a rerun picks the same."""
    return sorted(set(device_ids), key=lambda d: (hashlib.sha256(d.encode()).hexdigest(), d))


def decode(payload: bytes) -> dict | None:
    """The state document, or None for an empty (cleared) or foreign payload."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
        return None
    return doc


def encode(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def device_stage(doc: dict, device_id: str) -> str:
    """`2/4 ok`: the stage a device was sent in and how it went; "" if not sent yet."""
    d = (doc.get("devices") or {}).get(device_id)
    if not isinstance(d, dict):
        return ""
    total = len(doc.get("targets") or ()) or "?"
    return f"{int(d.get('stage', 0)) + 1}/{total} {d.get('state', '?')}"


def stages_by_device(messages: dict[str, bytes]) -> dict[str, str]:
    """{device_id: `2/4 ok` and the channel} from retained rollout documents."""
    out = {}
    for t, payload in messages.items():
        if not t.startswith(topic("")):
            continue
        doc = decode(payload)
        if doc is None:
            continue
        for device_id in doc.get("devices") or {}:
            out[device_id] = f"{device_stage(doc, device_id)} ({doc.get('channel')})"
    return out


def stage_line(doc: dict) -> str:
    """`stage 2/4 (10%): 2 devices, 2 sent, 1 confirmed, 0 failed, ETA 1m30s`."""
    i, t = doc["stage"], doc["targets"]
    members = doc["order"][(t[i - 1] if i else 0) : t[i]]
    states = [doc["devices"].get(d, {}).get("state") for d in members]
    sent = sum(s in (SENT, OK, FAILED) for s in states)
    ok, failed = states.count(OK), states.count(FAILED)
    label = doc["stages"][min(i, len(doc["stages"]) - 1)] if len(t) == len(doc["stages"]) else ""
    line = (
        f"stage {i + 1}/{len(t)}{f' ({label})' if label else ''}: {len(members)} device(s), "
        f"{sent} sent, {ok} confirmed, {failed} failed"
    )
    if doc.get("stage_done_at") and i + 1 < len(t):
        left = doc["stage_done_at"] + doc["bake_s"] - time.time()
        line += f", baking ({max(0, int(left))}s left)"
    eta = _eta(doc)
    return line + (f", ETA {_hms(eta)}" if eta is not None else "")


def _eta(doc: dict) -> float | None:
    """Seconds to the end: the stages so far took `stage_s` each on average; a bake
    after each stage but the last. None before the first stage has finished."""
    took = doc.get("stage_s") or []
    if not took or doc["status"] != "running":
        return None
    i, n, now = doc["stage"], len(doc["targets"]), time.time()
    mean = sum(took) / len(took)
    if doc.get("stage_done_at"):  # baking: the rest of the bake, then the stages after
        left = max(0.0, doc["stage_done_at"] + doc["bake_s"] - now)
        return left + (n - i - 1) * (mean + doc["bake_s"]) - doc["bake_s"]
    current = max(0.0, mean - (now - (doc.get("stage_started_at") or now)))
    return current + (n - i - 1) * (mean + doc["bake_s"])


def _hms(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def summary(doc: dict) -> str:
    rows = [("DEVICE", "STAGE", "RESULT", "DETAIL")]
    for d in doc["order"]:
        v = doc["devices"].get(d)
        if v is None:
            rows.append((d, "-", "not sent", ""))
        else:
            result = {OK: "ok", FAILED: "FAILED"}.get(v["state"], v["state"])
            rows.append((d, str(v["stage"] + 1), result, v.get("reason", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    reason = f": {doc['reason']}" if doc.get("reason") else ""
    return f"rollout on {doc['channel']} {doc['status']}{reason}\n{table}"


def new_state(
    channel: str,
    stages: str,
    max_failures: str,
    bake_s: float,
    timeout_s: float,
    entries: list,
    previous: list | None,
    devices: list[str],
) -> dict:
    plan = parse_stages(stages)
    ordered = order(devices)
    return {
        "v": FORMAT_VERSION,
        "channel": channel,
        "status": "running",
        "stages": plan,
        "targets": targets(plan, len(ordered)),
        "max_failures": parse_max_failures(max_failures),
        "bake_s": bake_s,
        "timeout_s": timeout_s,
        "entries": entries,
        "signed": False,  # set by start: resume and revert need the key again
        "previous": previous,
        "order": ordered,
        "stage": 0,
        "stage_done_at": None,
        "stage_started_at": None,
        "stage_s": [],
        "devices": {},
        "channel_list": None,
        "reason": "",
        "rev": 0,
    }
