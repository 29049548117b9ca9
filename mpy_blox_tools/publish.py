"""Publishing an update: packages first (retained, by SHA256), then the signed list.

    publish_update(broker, [wheel_package(p), src_package(f, "user_main.py")],
                   channel="stable", key=b"...")

`publish_release(channel="stable", extra_src_files=["user_main.py"], wait=300)` is
the whole `mpy-blox publish`: build, publish, follow the devices.

The list format, its signature and the topics come from `mpy_blox.update.manifest`,
the same module the devices run. Packages are published before the list that names
them, so a device never sees a list whose packages are missing.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox.update.manifest import InvalidUpdate
from mpy_blox.update.paths import check_src_path, check_wheel_path, fold
from mpy_blox_tools import build, fleet, mqtt, wheel
from mpy_blox_tools.errors import MpyBloxError

KEY_ENV = "MPY_BLOX_UPDATE_KEY"
STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "mpy-blox"
# Lists of every topic: the sequence number must grow across all of them, since a
# device keeps one counter for its channel and its own commands.
LIST_FILTERS = (topics.channel_topic("#"), topics.node_topic("+", "cmd"))
# NVS keeps the device's counter as a signed 32-bit integer.
MAX_SEQ = 2**31 - 1


@dataclass
class Package:
    entry: dict  # the list entry (manifest.wheel_entry / src_entry)
    data: bytes
    source: str  # where it came from, for messages

    @property
    def topic(self) -> str:
        return topics.package_topic(self.entry)

    @property
    def label(self) -> str:
        e = self.entry
        return f"{e['name']} {e['version']}" if e["type"] == "wheel" else e["path"]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MpyBloxError(f"{path}: no such file") from None
    except OSError as e:
        raise MpyBloxError(f"{path}: cannot read it ({e.strerror})") from None


def _field(text: str, name: str) -> str | None:
    m = re.search(rf"^{name}: *(.+?) *$", text, re.M)
    return m.group(1) if m else None


def wheel_package(path: Path) -> Package:
    """A wheel, repacked for the device's deflate window (our own wheels come out the same)."""
    _read(path)
    files = wheel.read_wheel(path)
    metas = [n for n in files if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
    if len(metas) != 1:
        raise MpyBloxError(f"{path}: not a wheel (no single .dist-info/METADATA)")
    try:
        check_wheel_names(files, metas[0].split("/")[0])
    except InvalidUpdate as e:
        raise MpyBloxError(f"{path}: {e}") from None
    meta = files[metas[0]].decode(errors="replace")
    name, version = _field(meta, "Name"), _field(meta, "Version")
    tag = _field(files.get(metas[0].replace("METADATA", "WHEEL"), b"").decode(), "Tag")
    if not name or not version:
        raise MpyBloxError(f"{path}: METADATA has no Name or Version")
    # Repacking is deterministic: a wheel already in device form comes out the
    # same bytes, any other (wbits 15, poetry build's) gets the device window.
    data = _read(wheel.repack(path, STATE_DIR / "repacked"))
    entry = manifest.wheel_entry(name, version, hashlib.sha256(data).hexdigest(), len(data), tag)
    try:
        manifest.check_entry(entry, True)
    except InvalidUpdate as e:
        raise MpyBloxError(f"{path}: {e}") from None
    return Package(entry, data, str(path))


def check_wheel_names(files: dict[str, bytes], dist: str) -> None:
    """The device's checks of a wheel's names, with the device's own functions
    (mpy_blox.update.paths): each file and each RECORD line a safe path of this
    wheel (ASCII, no boot module, no other .dist-info), once as FAT compares names.
    (That RECORD lists exactly the files the device checks when it unpacks them.)"""
    own = f"{dist}/RECORD"
    found: set[str] = set()
    for name in files:
        check_wheel_path(name, dist)
        if fold(name) in found:
            raise InvalidUpdate(f"listed twice: {name}")
        found.add(fold(name))
    listed: set[str] = set()
    text = files.get(own, b"").decode("utf-8", errors="replace")
    for row in csv.reader(text.splitlines()):
        if not row or row[0] == own:
            continue
        check_wheel_path(row[0], dist)
        if fold(row[0]) in listed:
            raise InvalidUpdate(f"RECORD lists a file twice: {row[0]}")
        listed.add(fold(row[0]))


def src_package(local: Path, device_path: str | None = None) -> Package:
    """A file to write at `device_path` on the device (default: its own name)."""
    device_path = device_path or local.name
    try:
        check_src_path(device_path)
    except InvalidUpdate as e:
        raise MpyBloxError(
            f"{local}: cannot publish to device path {device_path!r}: {e}"
        ) from None
    data = _read(local)
    entry = manifest.src_entry(device_path, hashlib.sha256(data).hexdigest(), len(data))
    return Package(entry, data, str(local))


def parse_src_arg(arg: str) -> Package:
    """`FILE` or `FILE:DEVICE_PATH` (as in --extra-src-files)."""
    local, sep, device_path = arg.partition(":")
    return src_package(Path(local), device_path if sep else None)


def load_key(key_file: str | None) -> bytes | None:
    """The update key from --key-file, else $MPY_BLOX_UPDATE_KEY, else None (unsigned)."""
    if key_file:
        try:
            text = Path(key_file).read_text().strip()
        except FileNotFoundError:
            raise MpyBloxError(f"key file {key_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MpyBloxError(f"key file {key_file}: unreadable ({e})") from None
    else:
        text = os.environ.get(KEY_ENV, "").strip()
        if not text:
            return None
    if len(text) < 16 or any(c.isspace() for c in text):
        raise MpyBloxError(
            f"key {'file ' + key_file if key_file else 'in $' + KEY_ENV}: "
            "expected one line of at least 16 characters (e.g. 64 hex digits)"
        )
    return text.encode()


def _seq_of(payload: bytes) -> int:
    if not payload.startswith(manifest.SIGNED_HEADER):
        return 0
    try:
        return int(json.loads(payload.split(b"\n", 1)[1]).get("seq") or 0)
    except (ValueError, IndexError, AttributeError):
        return 0


def next_seq(client, broker: mqtt.BrokerURL) -> int:
    """One more than any seq this workstation used or any list the broker retains."""
    state = STATE_DIR / "seq.json"
    try:
        local = json.loads(state.read_text())
    except (OSError, ValueError):
        local = {}
    highest = int(local.get(str(broker), 0))
    for payload in mqtt.collect_retained(client, *LIST_FILTERS).values():
        highest = max(highest, _seq_of(payload))
    seq = highest + 1
    if seq > MAX_SEQ:
        raise MpyBloxError("sequence numbers exhausted for this broker")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    local[str(broker)] = seq
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(local, indent=2) + "\n")
    tmp.replace(state)
    return seq


@dataclass
class Published:
    seq: int | None
    list_topics: list[str]
    payload_bytes: int  # everything this publish sent: packages and lists
    entries: list[dict]


def publish_update(
    broker: mqtt.BrokerURL,
    packages: list[Package],
    *,
    channel: str | None = None,
    device_ids: tuple[str, ...] = (),
    key: bytes | None = None,
    client=None,
    log=print,
) -> Published:
    """Publish `packages` and a list naming them to `channel` and/or each device's cmd."""
    check_targets(channel, device_ids)
    own = client is None
    client = client or mqtt.connect(broker)
    try:
        sent = 0
        for p in packages:
            log(f"package {p.label}: {len(p.data)} bytes -> {p.topic}")
            client.publish(p.topic, p.data, qos=1, retain=True).wait_for_publish(120)
            sent += len(p.data)
        seq = next_seq(client, broker) if key else None
        entries = [p.entry for p in packages]
        targets = ([topics.channel_topic(channel)] if channel else []) + [
            topics.node_topic(d, "cmd") for d in device_ids
        ]
        for topic in targets:
            suffix = topics.list_to(topic)
            payload = manifest.encode_list(entries, seq, key, suffix if key else None)
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(30)
            sent += len(payload)
            log(f"list{f' seq {seq}' if seq else ' (unsigned)'} -> {topic}")
        return Published(seq, targets, sent, entries)
    finally:
        if own:
            mqtt.disconnect(client)


def check_targets(channel: str | None, device_ids: Sequence[str]) -> None:
    """Refuse, before anything is built or published, a target a list cannot go to."""
    if not channel and not device_ids:
        raise MpyBloxError("nothing to publish to: give a channel or device ids")
    if channel is not None and (
        not channel or any(c in channel for c in "+#\0") or channel.strip("/") != channel
    ):
        raise MpyBloxError(
            f"channel {channel!r}: a channel name has no MQTT wildcard (+ #) and does not "
            "start or end with '/'"
        )
    for device_id in device_ids:
        fleet.check_device_id(device_id)


def default_channel(settings: Path = Path("settings.json")) -> str:
    try:
        update = json.loads(settings.read_text()).get("update") or {}
    except (OSError, ValueError, AttributeError):
        return "stable"
    return str(update.get("channel") or "stable")


def publish_release(
    *,
    broker: str | mqtt.BrokerURL | None = None,
    channel: str | None = None,
    device_ids: Sequence[str] = (),
    extra_src_files: Sequence[str | Path] = (),
    wheel: str | Path | None = None,
    platform: str = "esp32",
    dev: bool = False,
    key_file: str | Path | None = None,
    wait: float | None = None,
) -> bool:
    """Build (or take `wheel`), publish it with `extra_src_files` and, with `wait`,
    follow the devices; True when published and every device updated in time.

    What `mpy-blox publish` and scripts/publish_ota_update.py run, with the same
    defaults: the broker and channel of ./settings.json, the key of $MPY_BLOX_UPDATE_KEY.
    `extra_src_files` are `FILE` or `FILE:DEVICE_PATH`.
    """
    from mpy_blox_tools import watch

    implicit = []  # what came from ./settings.json or the built-in defaults: said, once
    if broker is None:
        broker = mqtt.BrokerURL.from_settings()
        implicit.append(f"broker {broker}")
    elif isinstance(broker, str):
        broker = mqtt.BrokerURL.parse(broker)
    key = load_key(str(key_file) if key_file else None)
    device_ids = tuple(device_ids)
    if not channel and not device_ids:
        channel = default_channel()
        implicit.append(f"channel {channel}")
    check_targets(channel, device_ids)
    if implicit:
        source = "./settings.json" if Path("settings.json").is_file() else "built-in defaults"
        print(f"mpy-blox: publishing with {' and '.join(implicit)} ({source})", flush=True)
    sources = [parse_src_arg(str(f)) for f in extra_src_files]
    if wheel:
        framework = wheel_package(Path(wheel))
    else:
        framework = wheel_package(build.build(platform=platform, dev=dev))
    packages = [framework, *sources]
    client = mqtt.connect(broker)
    try:
        watcher = None
        if wait:
            watcher = watch.Watcher([p.entry for p in packages], channel=channel)
            watcher.attach(client, device_ids)
        done = publish_update(
            broker, packages, channel=channel, device_ids=device_ids, key=key, client=client
        )
        print(
            f"published {len(packages)} package(s), {done.payload_bytes} bytes, "
            f"to {', '.join(done.list_topics)}",
            flush=True,
        )
        if watcher is None:
            return True
        ok = watcher.wait(wait)
        print()
        if not watcher.devices:
            print(f"mpy-blox: no device on channel {channel} answered in {wait:.0f}s")
            return False
        print(watcher.summary())
        return ok
    finally:
        mqtt.disconnect(client)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `mpy-blox publish` and scripts/publish_ota_update.py (DESIGN §6),
    named as the keyword arguments of `publish_release`."""
    p.add_argument(
        "--device-ids",
        nargs="+",
        metavar="ID",
        help="send the list to these devices' cmd topics (installed even with auto-update off)",
    )
    p.add_argument(
        "--channel",
        help="publish the list on mpypi/channels/NAME "
        "(default: update.channel of ./settings.json when no --device-ids)",
    )
    p.add_argument("--dev", action="store_true", help="build a dev version, unique per build")
    p.add_argument(
        "--platform",
        choices=build.PLATFORMS,
        default="esp32",
        help="the platform to build for (default esp32)",
    )
    p.add_argument(
        "--extra-src-files",
        nargs="+",
        metavar="FILE[:PATH]",
        help="source files to install at PATH on the device (default: the file name)",
    )
    p.add_argument("--wheel", help="publish this wheel instead of building the framework")
    p.add_argument(
        "--broker",
        help="mqtt[s]://[user[:password]@]host[:port] (default: mqtt of ./settings.json)",
    )
    p.add_argument("--key-file", help=f"the update key, to sign the list (or ${KEY_ENV})")
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="follow the devices and exit non-zero unless all updated in time",
    )
