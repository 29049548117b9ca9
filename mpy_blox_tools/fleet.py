"""`mpy-blox status`: the fleet as the broker remembers it.

Every device keeps a retained `info` and `status` on `mpypi/nodes/{device_id}/...`
(DESIGN §4); the will sets `status` to offline when a device vanishes. This reads
them all and makes one row per device. The STATE column says why a device is in a
state that needs a look: `trial (95s left)` (a new set running, not yet confirmed),
`rolled_back: <reason>`, `failed: <reason>`, `safe_mode: <reason>` (user code stopped).
LAST SEEN is `now` for a connected device (its will has not fired), else the time of
the last `ts` it published (devices whose clock NTP set put one in `info` and
`status`; the will that marks them offline has none), `-` without one.
`watch` follows the same topics live (`status --watch`).

Both then ask every device to announce itself (`mpypi/announce`, not retained): each
live device answers with its info and status again, within ANSWER_WINDOW. That shows
the devices a broker does not send retained messages to a wildcard subscription for
(RabbitMQ's MQTT plugin, docs/scaling.md), and proves who is there now.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from mpy_blox import topics
from mpy_blox_tools import mqtt, rollout_state
from mpy_blox_tools.errors import MpyBloxError

# What mpy_blox.node.device_id() makes: "esp32-" and the lower-case hex of the
# 6-byte base MAC.
DEVICE_ID = re.compile(r"^esp32-([0-9a-f]{12})$")
# A device answers an announce request at most once per 2 s (mpy_blox/presence.py), a
# request inside that at its end: half a second more covers the round trip.
ANSWER_WINDOW = 2.5


def check_device_id(device_id: str) -> None:
    """Raise MpyBloxError unless `device_id` is a device id (one line, with an example)."""
    if not DEVICE_ID.match(device_id):
        raise MpyBloxError(
            f"device id {device_id!r}: an ESP32's id is 'esp32-' and its 12-digit "
            "lower-case hex MAC, e.g. esp32-840d8ed29760"
        )


@dataclass
class Device:
    device_id: str
    state: str = "unknown"
    framework: str = ""
    packages: dict = field(default_factory=dict)
    channel: str = ""
    seq: int | None = None
    last_update: str = ""
    error: str = ""  # last_update's error
    reason: str = ""  # why the device is in `state`: failed, rolled_back, safe_mode
    left_s: int | None = None  # of a trial, as reported (counted down by watch)
    mem_free: int | None = None
    fs_free: int | None = None
    boot_count: int | None = None
    last_seen: str = ""
    last_ts: int | None = None  # the newest `ts` of its info and status (UTC Unix time)
    rollout_stage: str = ""  # `2/4 ok (stable)`: its stage in a rollout (rollout_state)
    firmware: str = ""  # `v1.22.2 (ota_1)`: info.firmware, on a device with OTA partitions
    info: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)


def _decode(payload: bytes) -> dict:
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"_malformed": payload[:80].decode(errors="replace")}
    return value if isinstance(value, dict) else {"_malformed": str(value)[:80]}


def _ts(report: dict) -> int | None:
    """A report's `ts`: UTC seconds since 1970 (an int) from a device whose clock is set;
    None without one, or for anything else (a bool, a float, a string, before 2000)."""
    value = report.get("ts")
    if type(value) is int and 946684800 <= value < 253402300800:  # 2000 to 9999
        return value
    return None


def _when(value: int | None) -> str:
    if value is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def devices_from(messages: dict[str, bytes], ages: dict[str, float] | None = None) -> list[Device]:
    """Rows from retained {topic: payload} of `mpypi/nodes/+/info|status`; `ages`
    (seconds since a live status arrived, by topic) counts a trial's time left down."""
    devices: dict[str, Device] = {}
    for topic, payload in messages.items():
        node = topics.parse_node(topic)
        if node is None or node[1] not in ("info", "status") or not payload:
            continue
        d = devices.setdefault(node[0], Device(node[0]))
        setattr(d, node[1], _decode(payload))
    for d in devices.values():
        info, status = d.info, d.status
        d.state = status.get("state") or ("online" if info else "unknown")
        d.framework = str(info.get("framework") or "")
        d.packages = info.get("packages") or {}
        d.channel = str(info.get("channel") or "")
        fw = info.get("firmware")
        if isinstance(fw, dict):
            d.firmware = f"{fw.get('version') or '?'} ({fw.get('partition') or '?'})"
        d.seq = info.get("seq")
        last = info.get("last_update") or {}
        d.last_update = str(last.get("result") or "") if isinstance(last, dict) else ""
        d.error = str((last.get("error") if isinstance(last, dict) else "") or "")
        if d.state in ("failed", "rolled_back", "safe_mode"):
            d.reason = str(status.get("error") or "")
        left = status.get("left_s")
        if d.state == "trial" and isinstance(left, int) and not isinstance(left, bool):
            age = (ages or {}).get(topics.node_topic(d.device_id, "status"), 0.0)
            d.left_s = max(0, math.ceil(left - age))
        d.mem_free, d.fs_free, d.boot_count = (
            info.get("mem_free"),
            info.get("fs_free"),
            info.get("boot_count"),
        )
        # A device whose status is not offline holds a connection: its will has
        # not fired, so the broker has heard from it within 1.5 keepalives.
        connected = d.state not in ("offline", "unknown")
        stamps = [t for t in (_ts(info), _ts(status)) if t is not None]
        d.last_ts = max(stamps, default=None)
        d.last_seen = "now" if connected else _when(d.last_ts)
    return sorted(devices.values(), key=lambda d: d.device_id)


FILTERS = (topics.node_topic("+", "info"), topics.node_topic("+", "status"))


def fetch(
    broker: mqtt.BrokerURL, limit: float = mqtt.RETAINED_TIMEOUT, listen: float = 0.0
) -> list[Device]:
    """Every device's retained info and status, as rows (one round trip: the
    broker's answer marks the end of the retained messages, mqtt.collect_retained).

    `listen` > 0: then ask the devices to announce themselves and take their answers
    for up to `listen` seconds (less once every device not offline has answered).
    """
    client = mqtt.connect(broker)
    try:
        messages = mqtt.collect_retained(client, *FILTERS, rollout_state.topic("#"), limit=limit)
        if listen > 0:
            messages.update(ask_to_announce(client, messages, listen, limit))
    finally:
        mqtt.disconnect(client)
    devices = devices_from(messages)
    stages = rollout_state.stages_by_device(messages)
    for d in devices:
        d.rollout_stage = stages.get(d.device_id, "")
    return devices


def ask_to_announce(
    client, retained: dict[str, bytes], listen: float, limit: float = mqtt.RETAINED_TIMEOUT
) -> dict[str, bytes]:
    """Publish an announce request and collect the answers: {topic: payload}.

    Subscribed first, so no answer is lost. Returns early once every device the
    `retained` reports show not offline has answered (its status comes after its
    info); otherwise after `listen` seconds. A redelivered retained report is kept
    (it is as new as the one read before) but proves no device there.
    """
    expected = {d.device_id for d in devices_from(retained) if d.state != "offline"}
    answers: dict[str, bytes] = {}
    answered: set[str] = set()
    cond = threading.Condition()
    subscribed = threading.Event()

    def on_message(c, userdata, msg) -> None:
        node = topics.parse_node(msg.topic)
        with cond:
            answers[msg.topic] = msg.payload
            if node and node[1] == "status" and not msg.retain:
                answered.add(node[0])
                cond.notify_all()

    chained = client.on_subscribe
    client.on_subscribe = lambda *args: subscribed.set()
    for f in FILTERS:
        client.message_callback_add(f, on_message)
    try:
        client.subscribe([(f, 1) for f in FILTERS])
        if not subscribed.wait(limit):
            raise MpyBloxError(
                f"no answer from the broker at {client.host}:{client.port} to a subscription"
            )
        client.publish(topics.ANNOUNCE, b"", qos=0, retain=False)
        with cond:
            cond.wait_for(lambda: expected and expected <= answered, timeout=listen)
            found = dict(answers)
        client.unsubscribe(list(FILTERS))
        return found
    finally:
        client.on_subscribe = chained
        for f in FILTERS:
            client.message_callback_remove(f)


def state_text(d: Device) -> str:
    """The STATE column: `trial (95s left)`, `rolled_back: <reason>`, `downloading
    (big.bin 52% (2048K/4096K), resumed at 1024K)`, or the state."""
    if d.left_s is not None:
        return f"{d.state} ({d.left_s}s left)"
    if d.state == "downloading":
        return f"{d.state} ({progress_text(d.status)})"
    return f"{d.state}: {d.reason}" if d.reason else d.state


def progress_text(status: dict) -> str:
    """A status's package and progress: `big.bin 52% (2048K/4096K), resumed at 1024K`
    (a chunked download that resumed), or its error."""
    package = status.get("package") or ""
    done, total = status.get("done"), status.get("total")
    if isinstance(done, int) and isinstance(total, int) and total:
        if total < 10240:  # a small file in bytes, not "0K/0K"
            text = f"{package} {100 * done // total}% ({done}/{total} bytes)"
        else:
            text = f"{package} {100 * done // total}% ({done // 1024}K/{total // 1024}K)"
        resumed = status.get("resumed_at")
        if isinstance(resumed, int) and resumed > 0:
            text += f", resumed at {resumed // 1024}K"
        return text
    if status.get("error"):
        return f"{package}: {status['error']}" if package else str(status["error"])
    return str(package)


def _kb(n) -> str:
    return f"{n // 1024}K" if isinstance(n, int) else "-"


def format_table(devices: list[Device]) -> str:
    if not devices:
        return "no devices have reported on this broker"
    header = (
        "DEVICE",
        "STATE",
        "FRAMEWORK",
        "PACKAGES",
        "CHANNEL",
        "LAST UPDATE",
        "HEAP",
        "FLASH",
        "LAST SEEN",
    )
    rows = [header]
    for d in devices:
        others = ", ".join(
            f"{k} {v}"
            for k, v in sorted(d.packages.items())
            if k.lower().replace("-", "_") != "mpy_blox"
        )
        result = d.last_update + (f": {d.error}" if d.error else "")
        rows.append(
            (
                d.device_id,
                state_text(d),
                d.framework or "-",
                others or "-",
                d.channel or "-",
                result or "-",
                _kb(d.mem_free),
                _kb(d.fs_free),
                d.last_seen or "-",
            )
        )
    if any(d.firmware for d in devices):  # a column only where firmware is reported
        rows = [
            (*r[:3], "FIRMWARE" if i == 0 else devices[i - 1].firmware or "-", *r[3:])
            for i, r in enumerate(rows)
        ]
        header = rows[0]
    if any(d.rollout_stage for d in devices):  # a column only while there is a rollout
        rows = [
            (*r, "STAGE" if i == 0 else devices[i - 1].rollout_stage or "-")
            for i, r in enumerate(rows)
        ]
        header = rows[0]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def as_json(devices: list[Device]) -> str:
    return json.dumps([asdict(d) for d in devices], indent=2)


def log_line(d: Device) -> str:
    """One line of `status --watch` in a log: the device, its state, its last update."""
    result = d.last_update + (f": {d.error}" if d.error else "")
    return f"{d.device_id} {state_text(d)}" + (f" (last update {result})" if result else "")


def watch(
    broker: mqtt.BrokerURL,
    out=None,
    clock: Callable[[], float] = time.monotonic,
    stop: threading.Event | None = None,
    tick: float = 1.0,
) -> None:
    """`status --watch`: the table, redrawn in place in a terminal (a trial's time
    left counts down), or one line per change in a log, until `stop` is set or
    KeyboardInterrupt. Starts from the retained reports, then follows live ones."""
    out = out or sys.stdout
    stop = stop or threading.Event()
    filters = FILTERS
    client = mqtt.connect(broker)
    lock, changed = threading.Lock(), threading.Event()
    arrived: dict[str, float] = {}  # when a live status arrived, by topic
    logged: dict[str, str] = {}  # a log's last line of each device
    pending: list[str] = []  # a log's lines not written yet, in the order of the reports

    def note(device_id: str) -> None:  # with the lock held
        # A log line shows a trial's left_s as the device said it: a log is not a clock.
        mine = (topics.node_topic(device_id, "info"), topics.node_topic(device_id, "status"))
        rows = devices_from({t: messages[t] for t in mine if t in messages})
        line = log_line(rows[0]) if rows else None
        if line and logged.get(device_id) != line:
            pending.append(f"{time.strftime('%H:%M:%S')} {line}")
        logged[device_id] = line

    try:
        messages = mqtt.collect_retained(client, *filters)
        for device_id in sorted({topics.parse_node(t)[0] for t in messages}):
            note(device_id)

        def on_message(c, userdata, msg) -> None:
            with lock:
                messages[msg.topic] = msg.payload
                if msg.retain:
                    arrived.pop(msg.topic, None)  # as old as it is: no countdown
                else:
                    arrived[msg.topic] = clock()
                note(topics.parse_node(msg.topic)[0])
            changed.set()

        for f in filters:
            client.message_callback_add(f, on_message)
        # The retained ones come again (equal or newer): nothing between the two is lost.
        # Drawn once subscribed, so a report published after the first drawing is live.
        subscribed = threading.Event()
        client.on_subscribe = lambda *args: subscribed.set()
        client.subscribe([(f, 1) for f in filters])
        if not subscribed.wait(mqtt.RETAINED_TIMEOUT):
            raise MpyBloxError(f"the broker at {broker} did not answer a subscription")
        # Live devices answer with their reports: the ones retained messages do
        # not bring (RabbitMQ) show up too.
        client.publish(topics.ANNOUNCE, b"", qos=0, retain=False)
        tty = out.isatty()
        drawn, shown = 0, []
        while not stop.is_set():
            now = clock()
            with lock:
                ages = {t: now - at for t, at in arrived.items()}
                table = format_table(devices_from(dict(messages), ages)).splitlines()
                lines, pending[:] = list(pending), []
            if tty and table != shown:
                out.write((f"\x1b[{drawn}F\x1b[J" if drawn else "") + "\n".join(table) + "\n")
                drawn, shown = len(table), table
            elif not tty and lines:
                out.write("".join(line + "\n" for line in lines))
            out.flush()
            changed.wait(tick)
            changed.clear()
    finally:
        mqtt.disconnect(client)
