"""Publishing an update: packages first (retained, by SHA256), then the signed list.

    publish_update(broker, [wheel_package(p), src_package(f, "user_main.py")],
                   channel="stable", key=b"...")

`publish_release(channel="stable", extra_src_files=["user_main.py"], wait=300)` is
the whole `mpy-blox publish`: build, publish, follow the devices.

The list format, its signature and the topics come from `mpy_blox.update.manifest`,
the same module the devices run. Packages are published before the list that names
them, so a device never sees a list whose packages are missing.

A package larger than the chunk size goes out as chunks and a hash list
(`mpy_blox_tools.chunks`, docs/protocol.md "Chunked packages"). The chunk size is
--chunk-size, else the default lowered to fit the Maximum Packet Size the broker
states in its MQTT 5 CONNACK. Every message is checked against that limit before
the first is sent: a release the broker would refuse is refused whole, here.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox.update.manifest import InvalidUpdate
from mpy_blox.update.paths import check_src_path, check_wheel_path, fold
from mpy_blox_tools import build, fit, fleet, keys, mqtt, wheel
from mpy_blox_tools.errors import MpyBloxError, read_file
from mpy_blox_tools.firmware import read_image
from mpy_blox_tools.keys import ReleaseKey
from mpy_blox_tools.micropython import format_size

KEY_ENV = "MPY_BLOX_UPDATE_KEY"
STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "mpy-blox"
# Lists of every topic: the sequence number must grow across all of them, since a
# device keeps one counter for its channel and its own commands.
LIST_FILTERS = (topics.channel_topic("#"), topics.node_topic("+", "cmd"))
# NVS keeps the device's counter as a signed 32-bit integer.
MAX_SEQ = 2**31 - 1
# How far this workstation's last seq and the highest retained list it verifies may
# be apart before a publish needs --force (docs/workstation.md, "Sequence numbers").
SEQ_JUMP_LIMIT = 1000
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


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
        if e["type"] == "src":
            return e["path"]
        return f"{e.get('name', e['type'])} {e['version']}"


def _field(text: str, name: str) -> str | None:
    m = re.search(rf"^{name}: *(.+?) *$", text, re.M)
    return m.group(1) if m else None


def wheel_package(path: Path) -> Package:
    """A wheel, repacked for the device's deflate window (our own wheels come out the same)."""
    read_file(path)
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
    data = read_file(wheel.repack(path, STATE_DIR / "repacked"))
    entry = manifest.wheel_entry(name, version, hashlib.sha256(data).hexdigest(), len(data), tag)
    try:
        manifest.check_entry(entry, True)
    except InvalidUpdate as e:
        raise MpyBloxError(f"{path}: {e}") from None
    return Package(entry, data, str(path))


def firmware_package(path: Path) -> Package:
    """A firmware image (an ESP32 app image or a virtual-board image), checked as
    mpy_blox_tools.firmware reads it: its chip, version, size and SHA256 make the
    list entry (docs/protocol.md, "Firmware")."""
    image = read_image(path)
    if not image.version:
        raise MpyBloxError(
            f"{path}: the image names no version (no esp_app_desc_t in its first "
            "segment): a device could not tell it from another"
        )
    entry = manifest.firmware_entry(image.chip, image.version, image.sha256, image.size)
    try:
        manifest.check_entry(entry, True)
    except InvalidUpdate as e:
        raise MpyBloxError(f"{path}: {e}") from None
    return Package(entry, read_file(Path(path)), str(path))


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
    data = read_file(local)
    entry = manifest.src_entry(device_path, hashlib.sha256(data).hexdigest(), len(data))
    return Package(entry, data, str(local))


def parse_src_arg(arg: str) -> Package:
    """`FILE` or `FILE:DEVICE_PATH` (as in --extra-src-files)."""
    local, sep, device_path = arg.partition(":")
    return src_package(Path(local), device_path if sep else None)


def load_key(key_file: str | None) -> ReleaseKey | bytes | None:
    """The release key from --key-file (an Ed25519 private key from `mpy-blox keygen`,
    or an HMAC key text file), else the HMAC key in $MPY_BLOX_UPDATE_KEY, else None
    (unsigned)."""
    if key_file:
        return keys.load_signing_key(key_file)
    text = os.environ.get(KEY_ENV, "").strip()
    return keys.hmac_key(text, f"key in ${KEY_ENV}") if text else None


def parse_duration(text: str, flag: str = "--expires") -> int:
    """Seconds in `30d`, `12h`, `90m`, `3600s` or `2w` (--expires, --expire)."""
    m = re.fullmatch(r"([1-9][0-9]{0,6})([smhdw])", text.strip())
    if not m:
        raise MpyBloxError(
            f"{flag} {text!r}: expected a number and a unit, s m h d or w (e.g. 30d)"
        )
    return int(m.group(1)) * DURATION_UNITS[m.group(2)]


def parse_expire(text: str) -> int:
    """--expire: the packages' MQTT 5 Message Expiry Interval, in seconds."""
    seconds = parse_duration(text, "--expire")
    if seconds > mqtt.MAX_EXPIRY_S:
        raise MpyBloxError(f"--expire {text!r}: at most {mqtt.MAX_EXPIRY_S} s (MQTT 5's limit)")
    return seconds


def _verified_seqs(client, key: ReleaseKey | bytes, log) -> dict[str, int]:
    # The seq of each retained list that verifies with our own key, by topic; one
    # warning line for each list that does not (its seq is not counted).
    trust = keys.trust_of(key)
    out = {}
    for topic, payload in sorted(mqtt.collect_retained(client, *LIST_FILTERS).items()):
        if not payload.startswith((manifest.SIGNED_HEADER, manifest.ED25519_HEADER)):
            log(f"warning: the list on {topic} is not signed: not counted")
            continue
        try:
            got = manifest.decode(payload, trust)  # our own seq, whatever topic it is on
        except InvalidUpdate as e:
            log(f"warning: the list on {topic} does not verify with this key ({e}): not counted")
            continue
        except Exception as e:  # junk of any shape is a warning, never a crash
            log(f"warning: the list on {topic} is unreadable ({type(e).__name__}): not counted")
            continue
        if got.seq is not None:  # always, for a list verified with a key
            out[topic] = got.seq
    return out


def _read_state(state: Path, log) -> dict:
    try:
        local = json.loads(state.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log(f"warning: {state}: unreadable ({e}): ignored")
        return {}
    if not isinstance(local, dict):
        log(f"warning: {state}: not a JSON object: ignored")
        return {}
    return local


def next_seq(
    client, broker: mqtt.BrokerURL, key: ReleaseKey | bytes, force: bool = False, log=print
) -> int:
    """One more than the highest seq this workstation used (its state file) or that a
    retained list signed with `key` carries; lists that do not verify are not counted.
    A jump of more than SEQ_JUMP_LIMIT between the two is refused without `force`."""
    state = STATE_DIR / "seq.json"
    local = _read_state(state, log)
    mine = local.get(str(broker))
    if mine is not None and (not isinstance(mine, int) or not 0 <= mine <= MAX_SEQ):
        log(f"warning: {state}: the seq of {broker} is not a number in 0..2**31-1: ignored")
        mine = None
    seen = _verified_seqs(client, key, log)
    retained = max(seen.values(), default=None)
    highest = max(mine or 0, retained or 0)
    apart = abs((retained or 0) - (mine or 0)) if None not in (mine, retained) else 0
    if apart > SEQ_JUMP_LIMIT and not force:
        topic = max(seen, key=seen.get)
        raise MpyBloxError(
            f"seq {retained} on {topic} and {mine} in {state} are more than "
            f"{SEQ_JUMP_LIMIT} apart: check both, then --force to publish as seq {highest + 1}"
        )
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
    payload_bytes: int  # everything this publish sent: packages, chunks, hash lists, lists
    entries: list[dict]
    chunk_size: int = 0  # of the chunked packages; 0: none was chunked


def publish_update(
    broker: mqtt.BrokerURL,
    packages: list[Package],
    *,
    channel: str | None = None,
    device_ids: tuple[str, ...] = (),
    key: ReleaseKey | bytes | None = None,
    expires: int | None = None,
    next_pubkey: str | None = None,
    force: bool = False,
    chunk_size: int | None = None,
    package_expiry: int | None = None,
    client=None,
    log=print,
    on_list: Callable[[int | None, bytes], None] | None = None,
    before_lists: Callable[[int | None, list[tuple[str, bytes]]], None] | None = None,
    send_packages: bool = True,
) -> Published:
    """Publish `packages` and a list naming them to `channel` and/or each device's cmd.

    `key` signs the list (a ReleaseKey: Ed25519; bytes: an HMAC update.key; None:
    the unsigned seed form). `expires` (Unix time) and `next_pubkey` (64 hex, the
    release key that comes next) go into a signed list's body. `chunk_size`: bytes
    (--chunk-size), 0 for one message a package, None for the default that fits the
    broker. `package_expiry`: seconds after which the broker drops the packages and
    their chunks (MQTT 5 message expiry; refused on an MQTT 3.1.1 broker).
    `on_list(seq, payload)` is called before each list goes out
    (`watch.Watcher.expect_list`); `before_lists(seq, [(topic, payload), ...])` once,
    with every list, before the first goes out (a rollout's write-ahead).
    `send_packages=False`: the packages are retained already, as this call would cut
    them (a rollout's later stages, or packages just read back from the broker): only
    the lists go out, naming the same entries. A `client` of our own comes from
    `mqtt.connect(broker, mqtt5=True)`; another 3.1.1 client learns no limit."""
    check_targets(channel, device_ids)
    if key is None and (expires is not None or next_pubkey is not None):
        raise MpyBloxError("--expires and --next-pubkey need a signed list: give --key-file")
    own = client is None
    client = client or mqtt.connect(broker, mqtt5=True)
    try:
        limits = mqtt.broker_limits(client)
        if package_expiry is not None and not limits.mqtt5:
            raise MpyBloxError(
                f"--expire: the broker at {broker} speaks only MQTT 3.1.1, which has no "
                "message expiry; nothing was published: publish without --expire and "
                "remove old packages with `mpy-blox prune`"
            )
        if package_expiry is not None and expires and time.time() + package_expiry < expires:
            log(
                "warning: the packages leave the broker (--expire) before devices stop "
                "taking the list (--expires): a device that comes later fails with "
                "'package not on the broker'"
            )
        size, why = fit.chunk_size_to_use(chunk_size, limits)
        cuts = [fit.cut(p, size) for p in packages]
        outgoing = [m for c in cuts for m in c.messages]
        expiring = {m.topic for m in outgoing} if package_expiry is not None else set()
        # Every package message first, then the seq: a release refused for its size
        # sends nothing and uses no seq.
        fit.check_sizes(outgoing, limits, expiring, broker)
        seq = next_seq(client, broker, key, force, log) if key else None
        entries = [c.entry for c in cuts]
        targets = ([topics.channel_topic(channel)] if channel else []) + [
            topics.node_topic(d, "cmd") for d in device_ids
        ]
        lists = []
        for topic in targets:
            suffix = topics.list_to(topic) if key else None
            payload = manifest.encode_list(entries, seq, key, suffix, expires, next_pubkey)
            lists.append(fit.Message(topic, payload, "the list"))
        fit.check_sizes(lists, limits, set(), broker)
        if any(c.chunked for c in cuts):
            log(f"chunks of {format_size(size)} bytes ({why})")
        sent = 0
        for c in cuts if send_packages else ():
            p = c.package
            if c.chunked:
                n = c.entry["chunks"]
                log(
                    f"package {p.label}: {len(p.data)} bytes in {n} chunks -> "
                    f"{p.topic}/{c.entry['chunk_size']}/0..{n - 1}, /hashes"
                )
            else:
                log(f"package {p.label}: {len(p.data)} bytes -> {p.topic}")
            for m in c.messages:
                try:
                    mqtt.publish_retained(client, m.topic, m.payload, expiry_s=package_expiry)
                except mqtt.HungUp as e:
                    raise MpyBloxError(fit.hung_up(e, m, limits)) from None
                sent += len(m.payload)
        if before_lists:
            before_lists(seq, [(m.topic, m.payload) for m in lists])
        for m in lists:
            if on_list:
                on_list(seq, m.payload)
            try:
                mqtt.publish_retained(client, m.topic, m.payload, timeout=30)
            except mqtt.HungUp as e:
                raise MpyBloxError(fit.hung_up(e, m, limits)) from None
            sent += len(m.payload)
            log(f"list{f' seq {seq}' if seq else ' (unsigned)'} -> {m.topic}")
        chunked = size if any(c.chunked for c in cuts) else 0
        return Published(seq, targets, sent, entries, chunked)
    finally:
        if own:
            mqtt.disconnect(client)


def release_packages(
    firmware: str | Path | None,
    wheel: str | Path | None,
    dev: bool,
    platform: str | None,
    extra_src_files: Sequence[str | Path] = (),
) -> list[Package]:
    """What a release publishes, from the release flags (publish and rollout start).

    With a firmware image: the image, and only the packages asked for: no framework
    build unless --wheel or --dev says so (docs/protocol.md, "Firmware": installed
    together, the packages applied once the new firmware boots). Without: the
    framework (--wheel, or built) and the src files."""
    sources = [parse_src_arg(str(f)) for f in extra_src_files]
    if firmware:
        packages = [firmware_package(Path(firmware))]
        if wheel:
            packages.append(wheel_package(Path(wheel)))
        elif dev:
            packages.append(wheel_package(build.build(platform=platform, dev=dev)))
        return packages + sources
    if wheel:
        framework = wheel_package(Path(wheel))
    else:
        framework = wheel_package(build.build(platform=platform, dev=dev))
    return [framework, *sources]


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


@dataclass
class Release:
    """What `release` did: the lists it published and, with `wait`, each device's outcome."""

    published: Published
    devices: list  # watch.Progress, by device id; empty without wait
    ok: bool  # published and, with wait, every device done in time

    def as_dict(self) -> dict:
        """The document `mpy-blox publish --json` prints (docs/workstation.md)."""
        return {
            "ok": self.ok,
            "seq": self.published.seq,
            "lists": self.published.list_topics,
            "packages": self.published.entries,
            "devices": [p.as_dict() for p in self.devices],
        }


def publish_release(**kwargs) -> bool:
    """Build (or take `wheel`), publish it with `extra_src_files` and, with `wait`,
    follow the devices; True when published and every device updated in time.

    What `mpy-blox publish` and scripts/publish_ota_update.py run, with the same
    defaults: the broker and channel of ./settings.json, the key of $MPY_BLOX_UPDATE_KEY.
    The keyword arguments are those of `release`."""
    return release(**kwargs).ok


def release(
    *,
    broker: str | mqtt.BrokerURL | None = None,
    channel: str | None = None,
    device_ids: Sequence[str] = (),
    extra_src_files: Sequence[str | Path] = (),
    wheel: str | Path | None = None,
    firmware: str | Path | None = None,
    platform: str = "esp32",
    dev: bool = False,
    key_file: str | Path | None = None,
    expires: str | None = None,
    next_pubkey: str | Path | None = None,
    force: bool = False,
    chunk_size: str | int | None = None,
    expire: str | None = None,
    wait: float | None = None,
    ca_file: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
    out=None,
) -> Release:
    """`publish_release`, with each device's outcome. `firmware` publishes a firmware
    image, with `wheel`, a `dev` build and `extra_src_files` when given (the framework
    is not built otherwise). `extra_src_files` are `FILE` or
    `FILE:DEVICE_PATH`; `chunk_size` is --chunk-size (`64K`, `off`; None: fit the
    broker), `expire` is --expire (`30d`: the broker drops the packages after that);
    `ca_file`, `client_cert` and `client_key` are the TLS files of an mqtts:// broker
    (`mqtt.BrokerURL.with_tls`); the progress goes to `out` (stdout)."""
    from mpy_blox_tools import watch

    out = out or sys.stdout

    def log(line: str = "") -> None:
        print(line, file=out, flush=True)

    implicit = []  # what came from ./settings.json or the built-in defaults: said, once
    if broker is None:
        broker = mqtt.BrokerURL.from_settings()
        implicit.append(f"broker {broker}")
    elif isinstance(broker, str):
        broker = mqtt.BrokerURL.parse(broker)
    broker = broker.with_tls(ca_file, client_cert, client_key)
    key = load_key(str(key_file) if key_file else None)
    expires_at = int(time.time()) + parse_duration(expires) if expires else None
    next_hex = keys.load_public_key(next_pubkey) if next_pubkey else None
    chunk_bytes = fit.parse_chunk_size(chunk_size) if chunk_size is not None else None
    package_expiry = parse_expire(expire) if expire else None
    if key is None and (expires_at or next_hex):
        raise MpyBloxError("--expires and --next-pubkey need a signed list: give --key-file")
    device_ids = tuple(device_ids)
    if not channel and not device_ids:
        channel = default_channel()
        implicit.append(f"channel {channel}")
    check_targets(channel, device_ids)
    if implicit:
        source = "./settings.json" if Path("settings.json").is_file() else "built-in defaults"
        log(f"mpy-blox: publishing with {' and '.join(implicit)} ({source})")
    packages = release_packages(firmware, wheel, dev, platform, extra_src_files)
    client = mqtt.connect(broker, mqtt5=True)
    try:
        watcher = None
        if wait:
            watcher = watch.Watcher([p.entry for p in packages], channel=channel)
            watcher.attach(client, device_ids)
        done = publish_update(
            broker,
            packages,
            channel=channel,
            device_ids=device_ids,
            key=key,
            expires=expires_at,
            next_pubkey=next_hex,
            force=force,
            chunk_size=chunk_bytes,
            package_expiry=package_expiry,
            client=client,
            log=log,
            on_list=watcher.expect_list if watcher else None,
        )
        log(
            f"published {len(packages)} package(s), {done.payload_bytes} bytes, "
            f"to {', '.join(done.list_topics)}"
        )
        if watcher is None:
            return Release(done, [], True)
        ok = watcher.wait(wait, out)
        log()
        if not watcher.devices:
            log(f"mpy-blox: no device on channel {channel} answered in {wait:.0f}s")
            return Release(done, [], False)
        log(watcher.summary())
        return Release(done, watcher.outcomes(), ok)
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
        "--firmware",
        metavar="FILE",
        help="publish this firmware image for the devices' next OTA partition: an ESP32 "
        "application image (ESP32_GENERIC-*.app-bin, not the full flash image) or a "
        "virtual-board image (`mpy-blox vboard firmware`); with it, the framework is "
        "published only with --wheel or --dev, and --extra-src-files go in the same list",
    )
    mqtt.add_connect_arguments(
        p, "mqtt[s]://[user[:password]@]host[:port] (default: mqtt of ./settings.json)"
    )
    p.add_argument(
        "--key-file",
        help="the release key that signs the list: an Ed25519 private key from "
        f"`mpy-blox keygen`, or an HMAC update.key text file (or ${KEY_ENV}: HMAC)",
    )
    p.add_argument(
        "--expires",
        metavar="DURATION",
        help="devices refuse the list after this long, e.g. 30d, 12h (s m h d w)",
    )
    p.add_argument(
        "--chunk-size",
        metavar="SIZE",
        help="cut packages larger than SIZE into chunks of SIZE (e.g. 64K, 1M; 0 or off: "
        "one message a package); default: 64K, lowered to fit the broker's MQTT 5 "
        "Maximum Packet Size",
    )
    p.add_argument(
        "--expire",
        metavar="DURATION",
        help="the broker drops the packages and chunks after this long, e.g. 30d (an MQTT 5 "
        "message expiry; not the lists); refused on an MQTT 3.1.1 broker",
    )
    p.add_argument(
        "--next-pubkey",
        metavar="FILE.pub",
        help="announce the release key that comes next (key rotation, docs/workstation.md)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help=f"publish even if the seq jumps by more than {SEQ_JUMP_LIMIT} (see docs)",
    )
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="follow the devices and exit non-zero unless all updated in time "
        "(a device on trial is not done until it confirms)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="the outcome per device as one JSON document on stdout (progress on stderr)",
    )
