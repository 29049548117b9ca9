"""`--wait`: follow the targeted devices through an update and tell how each one ended.

Devices report on their retained `mpypi/nodes/{id}/status` (progress) and `info`
(what is installed, and `last_update`: what the last install did). With trial boots
(docs/protocol.md, "Trial and rollback") a device that installed the list first runs
it on trial, then confirms it or rolls it back by itself. So, from live reports only:

- **done**: an `info` shows every package of the list installed and a
  `last_update` that names this list (by `list`, the SHA256 of the list as
  published, or `at`, its seq) with the result `ok` (a device that confirmed its
  trial, one without trial boots that reports `ok` at once, or one that had the
  versions already); or a `status` `ok` naming this list's seq after such an `info`
  on trial;
- **in progress**: `trial` (the new set runs, not yet confirmed): shown with the time
  left, counted down here from the device's `left_s`;
- **failed**: a `status` `failed` or `rolled_back` (for this list's seq when it names
  one), or an `info` whose `last_update` names this list with the result `failed` or
  `rolled_back`;
- otherwise it timed out.

Retained reports (what the device said before this publish) are shown but never
decide the outcome.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mpy_blox import topics
from mpy_blox.update.names import normalize
from mpy_blox_tools import fleet

DONE, FAILED, WAITING = "done", "failed", "waiting"
# The outcome of a list, as a device reports it in status.state / last_update.result.
FAILURES = ("failed", "rolled_back")


@dataclass
class Progress:
    device_id: str
    state: str = "no answer"
    detail: str = ""
    outcome: str = WAITING
    heard: bool = False  # anything from the device since the list went out
    installed: bool = False  # its last live info showed the list installed
    trial_left: int | None = None  # a live trial status's left_s, as the device said it
    trial_until: float | None = None  # when that trial ends, on the watcher's clock
    packages: dict = field(default_factory=dict)  # from its last info
    src: dict = field(default_factory=dict)

    def left_s(self, now: float) -> int | None:
        """Seconds of the trial left, counted down from the device's last `left_s`."""
        if self.trial_until is None:
            return None
        return max(0, math.ceil(self.trial_until - now))

    def versions(self) -> str:
        return versions(self.packages, self.src)

    def as_dict(self) -> dict:
        """The outcome as `publish --json` reports it (docs/workstation.md)."""
        return {
            "device": self.device_id,
            "result": "ok" if self.outcome == DONE else "failed",
            "state": self.state,
            "detail": self.detail,
            "versions": {"packages": self.packages, "src": self.src},
        }


@dataclass
class Watcher:
    entries: list[dict]
    devices: dict[str, Progress] = field(default_factory=dict)
    channel: str | None = None  # follow every device reporting this channel, too
    seq: int | None = None  # of the list published (signed lists)
    digests: set[str] = field(default_factory=set)  # SHA256 of each list payload published
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Event = field(default_factory=threading.Event)
    clock: Callable[[], float] = time.monotonic
    # For a log: every change of a device's line, in order, as the reports arrive.
    _pending: list[str] = field(default_factory=list)
    _logged: dict[str, str] = field(default_factory=dict)

    def attach(self, client, device_ids: tuple[str, ...]) -> None:
        """Subscribe before the list is published, so no report is missed."""
        for d in device_ids:
            self.devices[d] = Progress(d)
        client.message_callback_add(topics.node_topic("+", "#"), self._on_message)
        client.subscribe(topics.node_topic("+", "#"), qos=1)

    def expect_list(self, seq: int | None, payload: bytes) -> None:
        """Called for each list before it is published: how devices will name it."""
        with self.lock:
            self.seq = seq
            self.digests.add(hashlib.sha256(payload).hexdigest())

    def _on_message(self, client, userdata, msg) -> None:
        node = topics.parse_node(msg.topic)
        if node is None or node[1] not in ("info", "status") or not msg.payload:
            return  # our own commands come back on this filter too
        device_id, kind = node
        body = fleet._decode(msg.payload)
        with self.lock:
            p = self.devices.get(device_id)
            if p is None:
                if not (self.channel and kind == "info" and body.get("channel") == self.channel):
                    return
                p = self.devices[device_id] = Progress(device_id)
            live = not msg.retain
            p.heard |= live
            if p.outcome != WAITING:
                return  # decided: later reports (a reconnect's online) change nothing
            if kind == "info":
                self._on_info(p, body, live)
            else:
                self._on_status(p, body, live)
            self._note(p)
        self.changed.set()

    def _note(self, p: Progress) -> None:
        line = self._line(p, None)
        if self._logged.get(p.device_id) != line:
            self._logged[p.device_id] = line
            self._pending.append(line)

    def _names_this_list(self, report: dict, key: str) -> bool:
        # A report names a list by its digest (any list) or its seq (signed lists).
        if report.get("list") in self.digests:
            return True
        return self.seq is not None and report.get(key) == self.seq

    def _on_info(self, p: Progress, info: dict, live: bool) -> None:
        p.packages = dict(info.get("packages") or {})
        p.src = dict(info.get("src") or {})
        if not live:
            return  # a retained info that already lists the versions proves nothing
        last = info.get("last_update")
        last = last if isinstance(last, dict) else {}
        result = str(last.get("result") or "")
        # What the last install did is about this list only if it names it: a
        # device confirming an earlier set (a deploy's, say) says "ok" too, and
        # one that has the versions already still reports ok for this list.
        ours = self._names_this_list(last, "at")
        p.installed = ours and self._installed(info)
        if result in FAILURES and ours:
            # A device that failed or rolled back reports its old versions after.
            self._fail(p, result, last.get("error"))
        elif p.installed and result == "ok":
            self._done(p)
        elif p.installed and result == "trial" and p.state != "trial":
            p.state, p.detail = "trial", ""

    def _on_status(self, p: Progress, status: dict, live: bool) -> None:
        state = str(status.get("state") or "?")
        p.state = state
        p.detail = fleet.progress_text(status)
        p.trial_left = p.trial_until = None
        left = status.get("left_s")
        if state == "trial" and isinstance(left, int) and not isinstance(left, bool):
            if live:  # counted down from now; a retained one is as old as it is
                p.trial_left, p.trial_until = left, self.clock() + left
            else:
                p.detail = f"{left}s left when reported"
        if not live:
            return
        named = status.get("seq")
        ours = named is None or self.seq is None or named == self.seq
        if state == "trial" and not ours:  # the device holds lists until that verdict
            p.detail = f"seq {named}, an earlier update: this list waits for its verdict"
        elif state == "ok" and not ours:
            p.detail = f"seq {named}, an earlier update"
        if state in FAILURES and ours:
            error = status.get("error")
            package = status.get("package")
            self._fail(p, state, f"{package}: {error}" if package and error else error)
        elif state == "ok" and p.installed and self.seq is not None and named == self.seq:
            self._done(p)

    @staticmethod
    def _done(p: Progress) -> None:
        p.outcome, p.state, p.trial_left, p.trial_until = DONE, "ok", None, None
        p.detail = p.versions()

    @staticmethod
    def _fail(p: Progress, state: str, error) -> None:
        p.outcome, p.state, p.trial_left, p.trial_until = FAILED, state, None, None
        p.detail = f"{state}: {error}" if error else state

    def _installed(self, info: dict) -> bool:
        packages = {normalize(k): v for k, v in (info.get("packages") or {}).items()}
        src = info.get("src") or {}
        for e in self.entries:
            if e["type"] == "wheel" and packages.get(normalize(e["name"])) != e["version"]:
                return False
            if e["type"] == "src" and src.get(e["path"]) != e["pkg_sha256"]:
                return False
            if (
                e["type"] == "firmware"
                and (info.get("firmware") or {}).get("version") != e["version"]
            ):
                return False
        return True

    def wait(self, timeout: float, out=None) -> bool:
        """Show progress until every device is done or failed, or `timeout`; True if all done.

        In a terminal the block of lines is redrawn in place (a trial's time left
        counts down); otherwise one line is written each time a device's report changes."""
        out = out or sys.stdout
        deadline = self.clock() + timeout
        tty = out.isatty()
        drawn = 0
        shown: dict[str, str] = {}
        while True:
            now = self.clock()
            with self.lock:
                ordered = sorted(self.devices.values(), key=lambda p: p.device_id)
                rows = {p.device_id: self._line(p, now) for p in ordered}
                for p in ordered:  # a device with no report yet: "no answer"
                    self._note(p)
                logged, self._pending = self._pending, []
                finished = self.devices and all(
                    p.outcome != WAITING for p in self.devices.values()
                )
            if tty and rows != shown:  # redraw the block of lines in place
                if drawn:
                    out.write(f"\x1b[{drawn}F\x1b[J")
                out.write("\n".join(rows.values()) + "\n")
                drawn, shown = len(rows), rows
                out.flush()
            elif not tty and logged:  # a log: each change, in the order it came
                out.write("".join(line + "\n" for line in logged))
                out.flush()
            if finished or now >= deadline:
                break
            self.changed.wait(0.2)
            self.changed.clear()
        with self.lock:
            for p in self.devices.values():
                if p.outcome == WAITING:
                    p.outcome = FAILED
                    state = self._state(p, self.clock())
                    p.detail = (
                        f"timed out after {timeout:.0f}s in state {state}"
                        if p.heard
                        else f"no answer in {timeout:.0f}s"
                    )
            return bool(self.devices) and all(p.outcome == DONE for p in self.devices.values())

    @staticmethod
    def _state(p: Progress, now: float | None) -> str:
        # A trial with a live left_s: "trial (95s left)", counted down when `now` is
        # given (a terminal), else as the device said it (a log is not a clock).
        if p.trial_until is None:
            return p.state
        return f"{p.state} ({p.left_s(now) if now is not None else p.trial_left}s left)"

    def _line(self, p: Progress, now: float | None) -> str:
        state = self._state(p, now)
        return f"{p.device_id:<20} {state:<12} {p.detail}".rstrip()

    def outcomes(self) -> list[Progress]:
        with self.lock:
            return sorted(self.devices.values(), key=lambda p: p.device_id)

    def summary(self) -> str:
        rows = [("DEVICE", "RESULT", "DETAIL")]
        for p in self.outcomes():
            rows.append((p.device_id, "ok" if p.outcome == DONE else "FAILED", p.detail))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def versions(packages: dict, src: dict) -> str:
    """`mpy_blox 0.2.0, user_main.py 3f2a9c1b`: wheels and src files (short SHA256)."""
    return ", ".join(
        [f"{k} {v}" for k, v in sorted(packages.items())]
        + [f"{k} {str(v)[:8]}" for k, v in sorted(src.items())]
    )
