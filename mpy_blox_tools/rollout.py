"""`mpy-blox rollout`: a release to a channel's devices in stages, with no server.

    start(broker, packages, channel="stable", stages="1,10%,50%,100%",
          max_failures="2", bake_s=600, key=key)

The devices that report on the channel (their retained `info`) are put in order by
the SHA256 of their id; each stage sends the release as a signed `cmd` list to the
devices it adds (publish.publish_update), waits until each of them has an outcome
(`ok` after its trial, `failed` or `rolled_back`, or no answer within the timeout),
halts when the failures pass --max-failures, else bakes and goes on. The last step
publishes the channel list, so devices that join later get the release.

Every step is written first to the retained state (rollout_state) and then done,
so `resume` on any workstation carries on from the broker's state.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox.update.manifest import InvalidUpdate
from mpy_blox_tools import keys, mqtt, publish
from mpy_blox_tools import rollout_state as rs
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.fleet import _decode
from mpy_blox_tools.watch import FAILURES

DEFAULT_TIMEOUT_S = 600
HALTED, PAUSED, ABORTED, DONE = 1, 2, 3, 0


@dataclass
class Options:
    """What a run needs besides the state: the key and publish's extra arguments."""

    key: keys.ReleaseKey | bytes | None = None
    publish_kwargs: dict | None = None  # expires, next_pubkey, force, and any new ones
    quiet: bool = False
    out: object = None


def read_state(client, channel: str) -> dict | None:
    t = rs.topic(channel)
    payload = mqtt.collect_retained(client, t).get(t)
    return rs.decode(payload) if payload else None


def channel_devices(client, channel: str) -> list[str]:
    """The devices whose retained info says they are on `channel`."""
    infos = mqtt.collect_retained(client, topics.node_topic("+", "info"))
    out = []
    for t, payload in infos.items():
        node = topics.parse_node(t)
        if node and payload and _decode(payload).get("channel") == channel:
            out.append(node[0])
    return out


def previous_entries(client, channel: str, key) -> list | None:
    """The entries of the channel's retained list (what --revert sends back), or None."""
    t = topics.channel_topic(channel)
    payload = mqtt.collect_retained(client, t).get(t)
    if not payload:
        return None
    try:
        trust = keys.trust_of(key) if key else None
        return manifest.decode(payload, trust, topics.list_to(t)).entries
    except (InvalidUpdate, ValueError, TypeError):
        return None


def fetch_packages(client, entries: list[dict]) -> list[publish.Package]:
    """The release's packages from their retained topics (resume, revert), checked."""
    wanted = [topics.package_topic(e) for e in entries]
    got = mqtt.collect_retained(client, *wanted)
    out = []
    for e, t in zip(entries, wanted):
        data = got.get(t, b"")
        if hashlib.sha256(data).hexdigest() != e["pkg_sha256"]:
            raise MpyBloxError(f"{t}: the package is not retained on the broker (or differs)")
        out.append(publish.Package(e, data, t))
    return out


class Runner:
    """One workstation's run of a rollout: sends, follows the devices, writes the state."""

    def __init__(self, client, broker, doc: dict, packages, opts: Options) -> None:
        self.client, self.broker, self.doc, self.packages = client, broker, doc, packages
        self.opts = opts
        self.out = opts.out or sys.stdout
        self.writer = f"{socket.gethostname()}:{os.getpid()}"
        self.lock = threading.RLock()
        self.changed = threading.Event()
        self.control: dict | None = None  # a pause or abort written by another command
        self.reports: dict[str, dict] = {}  # device -> {"info": {...}, "status": {...}}
        self.shown = ""

    # -- the state on the broker

    def save(self) -> None:
        with self.lock:
            doc = self.doc
            if self.control:  # never write over a pause or an abort
                doc["status"], doc["reason"] = self.control["status"], self.control["reason"]
            doc["rev"] = int(doc.get("rev", 0)) + 1
            doc["writer"], doc["updated"] = self.writer, time.time()
            payload = rs.encode(doc)
        info = self.client.publish(rs.topic(doc["channel"]), payload, qos=1, retain=True)
        info.wait_for_publish(30)

    def _on_state(self, client, userdata, msg) -> None:
        doc = rs.decode(msg.payload)
        if doc is None or msg.retain or doc.get("writer") == self.writer:
            return
        if doc.get("status") in ("paused", "aborted"):
            with self.lock:
                self.control = {"status": doc["status"], "reason": doc.get("reason", "")}
            self.changed.set()

    def _on_report(self, client, userdata, msg) -> None:
        node = topics.parse_node(msg.topic)
        if node is None or node[1] not in ("info", "status") or not msg.payload:
            return
        with self.lock:
            self.reports.setdefault(node[0], {})[node[1]] = _decode(msg.payload)
        self.changed.set()

    def attach(self) -> None:
        self.client.message_callback_add(rs.topic(self.doc["channel"]), self._on_state)
        self.client.message_callback_add(topics.node_topic("+", "#"), self._on_report)
        self.client.subscribe(
            [(rs.topic(self.doc["channel"]), 1), (topics.node_topic("+", "#"), 1)]
        )

    # -- sending

    def _send(self, device_ids: list[str], stage: int) -> None:
        devices = self.doc["devices"]
        calls = iter(device_ids)

        def on_list(seq, payload) -> None:
            # Called before each list goes out, in the order of device_ids (one per
            # cmd topic, each signed for its own): the device is written `sending` first.
            d = next(calls)
            with self.lock:
                devices[d] = {
                    "stage": stage,
                    "state": rs.SENDING,
                    "seq": seq,
                    "list": hashlib.sha256(payload).hexdigest(),
                    "sent_at": time.time(),
                    "reason": "",
                }
            self.save()

        publish.publish_update(
            self.broker,
            self.packages,
            device_ids=tuple(device_ids),
            key=self.opts.key,
            client=self.client,
            log=_quiet,
            on_list=on_list,
            **(self.opts.publish_kwargs or {}),
        )
        with self.lock:
            for d in device_ids:
                devices[d]["state"] = rs.SENT
        self.save()

    def _settle_sending(self) -> None:
        """After a crash: a device left `sending` got its list if the retained cmd is it."""
        stuck = [d for d, v in self.doc["devices"].items() if v.get("state") == rs.SENDING]
        if not stuck:
            return
        cmds = mqtt.collect_retained(self.client, *[topics.node_topic(d, "cmd") for d in stuck])
        for d in stuck:
            payload = cmds.get(topics.node_topic(d, "cmd"), b"")
            if hashlib.sha256(payload).hexdigest() == self.doc["devices"][d].get("list"):
                self.doc["devices"][d]["state"] = rs.SENT
            else:
                del self.doc["devices"][d]  # never went out: sent with its stage
        self.save()

    # -- judging

    def _judge(self, device_id: str, v: dict, now: float) -> None:
        # Only a report that names this device's list decides (its seq, or the list's
        # SHA256 in last_update): retained ones too, so a resume sees what happened.
        r = self.reports.get(device_id, {})
        info, status = r.get("info") or {}, r.get("status") or {}
        last = info.get("last_update") if isinstance(info.get("last_update"), dict) else {}
        seq, digest = v.get("seq"), v.get("list")
        by_info = last.get("list") == digest or (seq is not None and last.get("at") == seq)
        by_status = seq is not None and status.get("seq") == seq
        if by_info and last.get("result") in FAILURES:
            v["state"], v["reason"] = rs.FAILED, _reason(last.get("result"), last.get("error"))
        elif by_status and status.get("state") in FAILURES:
            v["state"], v["reason"] = rs.FAILED, _reason(status["state"], status.get("error"))
        elif (by_info and last.get("result") == "ok") or (
            by_status and status.get("state") == "ok"
        ):
            v["state"], v["reason"] = rs.OK, ""
        elif now - float(v.get("sent_at") or now) > self.doc["timeout_s"]:
            state = status.get("state") if by_status else None
            v["state"] = rs.FAILED
            v["reason"] = (
                f"timed out after {self.doc['timeout_s']}s in state {state}"
                if state
                else f"no answer in {self.doc['timeout_s']}s"
            )

    def _judge_all(self) -> bool:
        """Decide what can be decided; True when something changed."""
        now, changed = time.time(), False
        with self.lock:
            for d, v in self.doc["devices"].items():
                if v.get("state") == rs.SENT:
                    self._judge(d, v, now)
                    changed |= v["state"] != rs.SENT
        return changed

    def failures(self) -> list[str]:
        return [d for d, v in self.doc["devices"].items() if v.get("state") == rs.FAILED]

    # -- the run

    def run(self) -> int:
        doc = self.doc
        self.attach()
        self._settle_sending()
        limit = rs.failure_limit(doc["max_failures"], len(doc["order"]))
        stage_started = time.time()
        durations: list[float] = []
        while True:
            if self.control:
                return self._stopped()
            self._judge_all()
            failed = self.failures()
            if len(failed) > limit:
                self.progress()
                doc["status"] = "halted"
                doc["reason"] = f"{len(failed)} failure(s), more than --max-failures {limit}"
                self.save()
                return HALTED
            i = doc["stage"]
            members = self.members(i)
            unsent = [d for d in members if d not in doc["devices"]]
            if unsent:
                stage_started = time.time()
                self.progress(force=True)
                self._send(unsent, i)
                continue
            pending = [d for d in members if doc["devices"][d]["state"] == rs.SENT]
            if pending:
                self.save_if_decided()
                self.progress()
                self.changed.wait(0.5)
                self.changed.clear()
                continue
            if doc.get("stage_done_at") is None:
                doc["stage_done_at"] = time.time()
                durations.append(time.time() - stage_started)
                self.save()
                self.progress(force=True)
            if i + 1 == len(doc["targets"]):
                return self._finish()
            if time.time() < doc["stage_done_at"] + doc["bake_s"]:
                self.progress()
                self.changed.wait(0.5)
                self.changed.clear()
                continue
            doc["stage"], doc["stage_done_at"] = i + 1, None
            self.save()

    def save_if_decided(self) -> None:
        if self._judge_all():
            self.save()

    def members(self, i: int) -> list[str]:
        t = self.doc["targets"]
        return self.doc["order"][(t[i - 1] if i else 0) : t[i]]

    def _finish(self) -> int:
        doc = self.doc
        sent = doc.get("channel_list") or {}
        if sent.get("state") == rs.SENDING:  # a crash in between: the retained list says
            t = topics.channel_topic(doc["channel"])
            payload = mqtt.collect_retained(self.client, t).get(t, b"")
            if hashlib.sha256(payload).hexdigest() == sent.get("list"):
                sent["state"] = rs.SENT
        if sent.get("state") != rs.SENT:

            def on_list(seq, payload) -> None:
                doc["channel_list"] = {
                    "state": rs.SENDING,
                    "seq": seq,
                    "list": hashlib.sha256(payload).hexdigest(),
                }
                self.save()

            publish.publish_update(
                self.broker,
                self.packages,
                channel=doc["channel"],
                key=self.opts.key,
                client=self.client,
                log=_quiet,
                on_list=on_list,
                **(self.opts.publish_kwargs or {}),
            )
            doc["channel_list"]["state"] = rs.SENT
        doc["status"], doc["reason"] = "done", ""
        self.save()
        self.say(f"channel list published on {topics.channel_topic(doc['channel'])}")
        return DONE

    def _stopped(self) -> int:
        status = self.control["status"]
        self.say(f"rollout {status} by another command: stopped sending")
        return PAUSED if status == "paused" else ABORTED

    # -- output

    def say(self, line: str) -> None:
        if not self.opts.quiet:
            print(line, file=self.out, flush=True)

    def progress(self, force: bool = False) -> None:
        line = stage_line(self.doc)
        if line != self.shown or force:
            self.shown = line
            self.say(line)


def _quiet(line: str) -> None:
    pass  # publish's own lines: the rollout says what it sends in its progress


def _reason(state, error) -> str:
    return f"{state}: {error}" if error else str(state)


def stage_line(doc: dict) -> str:
    """`stage 2/4 (10%): 2 devices, 2 sent, 1 confirmed, 0 failed, ETA 1m30s`."""
    i, t = doc["stage"], doc["targets"]
    members = doc["order"][(t[i - 1] if i else 0) : t[i]]
    states = [doc["devices"].get(d, {}).get("state") for d in members]
    sent = sum(s in (rs.SENT, rs.OK, rs.FAILED) for s in states)
    ok, failed = states.count(rs.OK), states.count(rs.FAILED)
    label = doc["stages"][min(i, len(doc["stages"]) - 1)] if len(t) == len(doc["stages"]) else ""
    line = (
        f"stage {i + 1}/{len(t)}{f' ({label})' if label else ''}: {len(members)} device(s), "
        f"{sent} sent, {ok} confirmed, {failed} failed"
    )
    if doc.get("stage_done_at") and i + 1 < len(t):
        left = doc["stage_done_at"] + doc["bake_s"] - time.time()
        line += f", baking ({max(0, int(left))}s left)"
    return line


def summary(doc: dict) -> str:
    rows = [("DEVICE", "STAGE", "RESULT", "DETAIL")]
    for d in doc["order"]:
        v = doc["devices"].get(d)
        if v is None:
            rows.append((d, "-", "not sent", ""))
        else:
            result = {rs.OK: "ok", rs.FAILED: "FAILED"}.get(v["state"], v["state"])
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
    plan = rs.parse_stages(stages)
    ordered = rs.order(devices)
    return {
        "v": rs.FORMAT_VERSION,
        "channel": channel,
        "status": "running",
        "stages": plan,
        "targets": rs.targets(plan, len(ordered)),
        "max_failures": rs.parse_max_failures(max_failures),
        "bake_s": bake_s,
        "timeout_s": timeout_s,
        "entries": entries,
        "signed": False,  # set by start: resume and revert need the key again
        "previous": previous,
        "order": ordered,
        "stage": 0,
        "stage_done_at": None,
        "devices": {},
        "channel_list": None,
        "reason": "",
        "rev": 0,
    }


def start(
    broker: mqtt.BrokerURL,
    packages: list[publish.Package],
    *,
    channel: str,
    stages: str,
    max_failures: str = "0",
    bake_s: float = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    opts: Options | None = None,
) -> int:
    """Start a rollout and run it to its end: 0 when every device confirmed and the
    channel list went out, HALTED, PAUSED or ABORTED otherwise."""
    opts = opts or Options()
    rs.parse_stages(stages), rs.parse_max_failures(max_failures)  # before connecting
    publish.check_targets(channel, ())
    client = mqtt.connect(broker)
    try:
        old = read_state(client, channel)
        if old and old.get("status") in ("running", "paused"):
            raise MpyBloxError(
                f"a rollout on {channel} is {old['status']}: resume it, or abort it first"
            )
        devices = channel_devices(client, channel)
        if not devices:
            raise MpyBloxError(f"no device reports on channel {channel}: nothing to roll out to")
        previous = previous_entries(client, channel, opts.key)
        doc = new_state(
            channel,
            stages,
            max_failures,
            bake_s,
            timeout_s,
            [p.entry for p in packages],
            previous,
            devices,
        )
        doc["signed"] = opts.key is not None
        runner = Runner(client, broker, doc, packages, opts)
        runner.save()
        runner.say(
            f"rollout on {channel}: {len(doc['order'])} device(s) in stages of "
            f"{', '.join(map(str, doc['targets']))}"
        )
        return _run(runner)
    finally:
        mqtt.disconnect(client)


def _run(runner: Runner) -> int:
    code = runner.run()
    if not runner.opts.quiet or code != DONE:
        print(summary(runner.doc), file=runner.out, flush=True)
    return code


def resume(broker: mqtt.BrokerURL, channel: str, opts: Options | None = None) -> int:
    """Carry on a paused or interrupted rollout from the state on the broker."""
    opts = opts or Options()
    client = mqtt.connect(broker)
    try:
        doc = _existing(client, channel)
        if doc["status"] not in ("running", "paused"):
            raise MpyBloxError(f"the rollout on {channel} is {doc['status']}: nothing to resume")
        _check_key(doc, opts.key)
        packages = fetch_packages(client, doc["entries"])
        doc["status"], doc["reason"] = "running", ""
        runner = Runner(client, broker, doc, packages, opts)
        runner.save()
        runner.say(f"resuming the rollout on {channel} at stage {doc['stage'] + 1}")
        return _run(runner)
    finally:
        mqtt.disconnect(client)


def _check_key(doc: dict, key) -> None:
    # The devices hold an update key: an unsigned list would be refused by each.
    if doc.get("signed") and key is None:
        raise MpyBloxError(
            f"the rollout on {doc['channel']} sends signed lists: give its --key-file "
            "(or $MPY_BLOX_UPDATE_KEY)"
        )


def _existing(client, channel: str) -> dict:
    publish.check_targets(channel, ())
    doc = read_state(client, channel)
    if doc is None:
        raise MpyBloxError(f"no rollout on channel {channel} ({rs.topic(channel)} is empty)")
    return doc


def control(
    broker: mqtt.BrokerURL,
    channel: str,
    status: str,
    revert: bool = False,
    key=None,
    out=None,
) -> int:
    """`pause` or `abort` (with `revert`: the previous release to every device sent one)."""
    out = out or sys.stdout
    client = mqtt.connect(broker)
    try:
        doc = _existing(client, channel)
        if doc["status"] in ("done", "aborted", "halted") and not (status == "aborted" and revert):
            raise MpyBloxError(f"the rollout on {channel} is {doc['status']} already")
        if status == "paused" and doc["status"] != "running":
            raise MpyBloxError(f"the rollout on {channel} is {doc['status']}: nothing to pause")
        packages = None
        sent = [d for d, v in doc["devices"].items() if v.get("state") != rs.SENDING]
        if revert:
            if not doc.get("previous"):
                raise MpyBloxError(
                    f"no previous release to revert to: {channel} had no list when it started"
                )
            _check_key(doc, key)
            packages = fetch_packages(client, doc["previous"])
        doc["status"] = status
        doc["reason"] = f"{status} by {socket.gethostname()}"
        doc["rev"] = int(doc.get("rev", 0)) + 1
        doc["writer"], doc["updated"] = f"{socket.gethostname()}:{os.getpid()}", time.time()
        client.publish(rs.topic(channel), rs.encode(doc), qos=1, retain=True).wait_for_publish(30)
        print(f"rollout on {channel} {status}", file=out)
        if packages and sent:
            publish.publish_update(
                broker, packages, device_ids=tuple(sent), key=key, client=client, log=_quiet
            )
            print(f"reverted {len(sent)} device(s) to the previous release", file=out)
        return 0
    finally:
        mqtt.disconnect(client)


def status(broker: mqtt.BrokerURL, channel: str) -> dict:
    client = mqtt.connect(broker)
    try:
        return _existing(client, channel)
    finally:
        mqtt.disconnect(client)


# -- the command line (cli.py registers it)

START_DROPS = ("device_ids", "wait", "json")  # publish's flags a rollout decides itself


def _duration(flag: str, text: str | None) -> int:
    if text is None:
        return 0
    try:
        return publish.parse_duration(text)
    except MpyBloxError:
        raise MpyBloxError(
            f"{flag} {text!r}: expected a number and a unit, s m h d or w (e.g. 10m)"
        ) from None


def _broker(args) -> mqtt.BrokerURL:
    broker = mqtt.BrokerURL.parse(args.broker) if args.broker else mqtt.BrokerURL.from_settings()
    return broker.with_tls(args.ca_file, args.client_cert, args.client_key)


def _publish_kwargs(args) -> dict:
    """publish_update's keyword arguments from the release flags: --expires and
    --next-pubkey as `release` makes them, any other flag of publish by its name."""
    import inspect

    known = set(inspect.signature(publish.publish_update).parameters)
    out = {
        name: getattr(args, name)
        for name in known
        - {"broker", "packages", "channel", "device_ids", "key", "client"}
        - {"log", "on_list", "expires", "next_pubkey"}
        if getattr(args, name, None) not in (None, False)
    }
    if getattr(args, "expires", None):
        out["expires"] = int(time.time()) + publish.parse_duration(args.expires)
    if getattr(args, "next_pubkey", None):
        out["next_pubkey"] = keys.load_public_key(args.next_pubkey)
    return out


def _start_cli(args) -> int:
    from pathlib import Path

    from mpy_blox_tools import build

    channel = args.channel or publish.default_channel()
    rs.parse_stages(args.stages), rs.parse_max_failures(args.max_failures)
    bake_s, timeout_s = _duration("--bake", args.bake), _duration("--timeout", args.timeout)
    publish.check_targets(channel, ())
    key = publish.load_key(args.key_file)
    sources = [publish.parse_src_arg(str(f)) for f in args.extra_src_files or ()]
    wheel = args.wheel or build.build(platform=args.platform, dev=args.dev)
    packages = [publish.wheel_package(Path(wheel)), *sources]
    opts = Options(key, _publish_kwargs(args), args.quiet)
    return start(
        _broker(args),
        packages,
        channel=channel,
        stages=args.stages,
        max_failures=args.max_failures,
        bake_s=bake_s,
        timeout_s=timeout_s,
        opts=opts,
    )


def _status_cli(args) -> int:
    import json

    doc = status(_broker(args), args.channel or publish.default_channel())
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(summary(doc))
        if doc["status"] == "running":
            print(stage_line(doc))
    return 0


def _resume_cli(args) -> int:
    opts = Options(publish.load_key(args.key_file), {}, args.quiet)
    return resume(_broker(args), args.channel or publish.default_channel(), opts)


def _pause_cli(args) -> int:
    return control(_broker(args), args.channel or publish.default_channel(), "paused")


def _abort_cli(args) -> int:
    key = publish.load_key(args.key_file) if args.revert else None
    return control(
        _broker(args), args.channel or publish.default_channel(), "aborted", args.revert, key
    )


def add_parser(sub, command) -> None:
    """`mpy-blox rollout start|status|pause|resume|abort`; `command` is cli._command."""
    p = command(
        sub,
        "rollout",
        "roll a release out to a channel in stages, halting on failures",
        "mpy-blox rollout start --channel stable --stages 1,10%,50%,100% \\\n"
        "    --max-failures 2 --bake 10m --key-file release.key --extra-src-files user_main.py",
        "The state is retained on mpypi/rollouts/CHANNEL: `status`, `pause`, `resume` and\n"
        "`abort` work from any workstation. Exit status 0 only when every device confirmed.",
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="ACTION")

    def common(q, key_help: str | None = None) -> None:
        q.add_argument(
            "--channel",
            help="the channel of the rollout (default: update.channel of ./settings.json)",
        )
        mqtt.add_connect_arguments(
            q, "mqtt[s]://[user[:password]@]host[:port] (default: mqtt of ./settings.json)"
        )
        if key_help:
            q.add_argument("--key-file", help=key_help)

    s = command(
        verbs,
        "start",
        "start a rollout of a release (publish's flags) and follow it to its end",
        "mpy-blox rollout start --channel stable --stages 1,10%,50%,100% \\\n"
        "    --max-failures 2 --bake 10m --key-file release.key --extra-src-files user_main.py",
        "The devices reporting on the channel are ordered by a hash of their id; each stage\n"
        "sends signed cmd lists to the devices it adds, waits until each confirmed (ok after\n"
        "its trial), failed or timed out, and bakes; failures over --max-failures halt it.\n"
        "The channel list goes out last.",
    )
    scratch = argparse.ArgumentParser(add_help=False)
    publish.add_arguments(scratch)
    for action in scratch._actions:
        if action.dest not in START_DROPS:
            s._add_action(action)
    s.add_argument(
        "--stages",
        required=True,
        help="devices per stage, cumulative: counts and percentages, the last 100%% "
        "(e.g. 1,10%%,50%%,100%%: a canary, then 10%% of the devices, ...)",
    )
    s.add_argument(
        "--max-failures",
        default="0",
        help="halt when more devices fail than this: a count or a percentage of the devices "
        "(default 0: the first failure halts)",
    )
    s.add_argument(
        "--bake", metavar="DURATION", help="wait this long after a stage confirmed, e.g. 10m"
    )
    s.add_argument(
        "--timeout",
        metavar="DURATION",
        default="10m",
        help="a device that has not confirmed this long after its list went out has failed "
        "(default 10m)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress; the summary if it fails")
    s.set_defaults(func=_start_cli)

    q = command(
        verbs,
        "status",
        "the rollout's state: each device's stage and outcome",
        "mpy-blox rollout status --channel stable",
    )
    common(q)
    q.add_argument("--json", action="store_true", help="the state document, as retained")
    q.set_defaults(func=_status_cli)

    q = command(
        verbs,
        "pause",
        "stop sending: the running rollout stops before its next step",
        "mpy-blox rollout pause --channel stable",
    )
    common(q)
    q.set_defaults(func=_pause_cli)

    q = command(
        verbs,
        "resume",
        "carry on a paused or interrupted rollout from the state on the broker",
        "mpy-blox rollout resume --channel stable --key-file release.key",
    )
    common(q, "the release key that signs the lists (as for start)")
    q.add_argument("--quiet", action="store_true", help="no progress; the summary if it fails")
    q.set_defaults(func=_resume_cli)

    q = command(
        verbs,
        "abort",
        "stop the rollout for good; --revert sends the previous release back",
        "mpy-blox rollout abort --channel stable --revert --key-file release.key",
    )
    common(q, "the release key that signs the revert lists")
    q.add_argument(
        "--revert",
        action="store_true",
        help="send the channel's list from before the rollout to every device sent one",
    )
    q.set_defaults(func=_abort_cli)
