"""`--wait`: follow the targeted devices through an update and tell how each one ended.

Devices report on their retained `mpypi/nodes/{id}/status` (progress) and `info`
(what is installed). A device is done when its `info` shows every package of the
list installed; it failed when its `status` says `failed` or `rolled_back` after the
list was published; otherwise it timed out. Retained reports (what the device said
before this publish) are shown but never decide the outcome.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from mpy_blox import topics
from mpy_blox.update.names import normalize
from mpy_blox_tools import fleet

DONE, FAILED, WAITING = "done", "failed", "waiting"


@dataclass
class Progress:
    device_id: str
    state: str = "no answer"
    detail: str = ""
    outcome: str = WAITING
    heard: bool = False  # anything from the device since the list went out


@dataclass
class Watcher:
    entries: list[dict]
    devices: dict[str, Progress] = field(default_factory=dict)
    channel: str | None = None  # follow every device reporting this channel, too
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Event = field(default_factory=threading.Event)

    def attach(self, client, device_ids: tuple[str, ...]) -> None:
        """Subscribe before the list is published, so no report is missed."""
        for d in device_ids:
            self.devices[d] = Progress(d)
        client.message_callback_add(topics.node_topic("+", "#"), self._on_message)
        client.subscribe(topics.node_topic("+", "#"), qos=1)

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
            # Only a live report counts: a retained info that already lists the
            # versions says nothing about whether the device accepted this list.
            # A device that failed reports its (old, maybe equal) versions after.
            if (
                kind == "info"
                and live
                and p.outcome != FAILED
                and self._installed(body)
                and _last_result(body) not in ("failed", "rolled_back")
            ):
                p.outcome, p.state, p.detail = DONE, "updated", _versions(body)
            elif kind == "status" and p.outcome == WAITING:
                state = str(body.get("state") or "?")
                p.state = state
                p.detail = _detail(body)
                if live and state in ("failed", "rolled_back"):
                    p.outcome = FAILED
        self.changed.set()

    def _installed(self, info: dict) -> bool:
        packages = {normalize(k): v for k, v in (info.get("packages") or {}).items()}
        src = info.get("src") or {}
        for e in self.entries:
            if e["type"] == "wheel" and packages.get(normalize(e["name"])) != e["version"]:
                return False
            if e["type"] == "src" and src.get(e["path"]) != e["pkg_sha256"]:
                return False
        return True

    def wait(self, timeout: float, out=None) -> bool:
        """Show progress until every device is done or failed, or `timeout`; True if all done."""
        out = out or sys.stdout
        deadline = time.monotonic() + timeout
        tty = out.isatty()
        drawn = 0
        shown: dict[str, str] = {}
        while True:
            with self.lock:
                rows = {
                    p.device_id: self._line(p)
                    for p in sorted(self.devices.values(), key=lambda p: p.device_id)
                }
                finished = self.devices and all(
                    p.outcome != WAITING for p in self.devices.values()
                )
            if rows != shown:
                if tty:  # redraw the block of lines in place
                    if drawn:
                        out.write(f"\x1b[{drawn}F\x1b[J")
                    out.write("\n".join(rows.values()) + "\n")
                    drawn = len(rows)
                else:  # a log: only the lines that changed
                    out.write(
                        "".join(line + "\n" for d, line in rows.items() if shown.get(d) != line)
                    )
                out.flush()
                shown = rows
            if finished or time.monotonic() >= deadline:
                break
            self.changed.wait(0.2)
            self.changed.clear()
        with self.lock:
            for p in self.devices.values():
                if p.outcome == WAITING:
                    p.outcome = FAILED
                    p.detail = (
                        f"timed out after {timeout:.0f}s in state {p.state}"
                        if p.heard
                        else f"no answer in {timeout:.0f}s"
                    )
            return bool(self.devices) and all(p.outcome == DONE for p in self.devices.values())

    @staticmethod
    def _line(p: Progress) -> str:
        return f"{p.device_id:<20} {p.state:<12} {p.detail}".rstrip()

    def summary(self) -> str:
        rows = [("DEVICE", "RESULT", "DETAIL")]
        for p in sorted(self.devices.values(), key=lambda p: p.device_id):
            rows.append((p.device_id, "ok" if p.outcome == DONE else "FAILED", p.detail))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _last_result(info: dict) -> str:
    last = info.get("last_update")
    return str(last.get("result") or "") if isinstance(last, dict) else ""


def _versions(info: dict) -> str:
    packages = info.get("packages") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(packages.items()))


def _detail(status: dict) -> str:
    package = status.get("package") or ""
    done, total = status.get("done"), status.get("total")
    if isinstance(done, int) and isinstance(total, int) and total:
        return f"{package} {100 * done // total}% ({done // 1024}K/{total // 1024}K)"
    if status.get("error"):
        return f"{package}: {status['error']}" if package else str(status["error"])
    return str(package)
