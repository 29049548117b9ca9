"""`mpy-blox rollout`: a release to a channel's devices in stages, with no server.

    start(broker, packages, channel="stable", stages="1,10%,50%,100%",
          max_failures="2", bake_s=600, opts=Options(key=key))

The devices that report on the channel (their retained `info`) are put in order by
the SHA256 of their id; each stage sends the release as a signed `cmd` list to the
devices it adds (publish.publish_update), waits until each of them has an outcome
(`ok` after its trial, `failed` or `rolled_back`, or no answer within the timeout),
halts when the failures pass --max-failures, else bakes and goes on. The last step
publishes the channel list, so devices that join later get the release.

Every step is written first to the retained state (rollout_state) and then done,
so `resume` on any workstation carries on from the broker's state. A stage writes
that state a bounded number of times (its write-ahead, its `sent`, its outcomes in
batches), not once per device; the release's packages go out once, with the first
stage's lists (content-addressed and retained: later stages and the channel list
only name them), again on each publish only with --expire.
"""

from __future__ import annotations

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
SAVE_EVERY_S = 5.0  # outcomes are written at most this often while a stage runs,
SAVE_RATE = 8192  # and at most this many bytes of state a second (a fleet of thousands)
SETTLE_BATCH = 500  # retained cmd lists asked for at once (Mosquitto queues 1000 a client)
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


CHUNK_FIELDS = ("chunk_size", "chunks", "chunks_sha256")


def fetch_packages(client, entries: list[dict]) -> list[publish.Package]:
    """The release's packages from their retained topics (resume, revert), checked
    against their SHA256: one message, or the chunks of a chunked one put together.
    Each comes back as `wheel_package`/`src_package` make it (no chunk fields), so
    publish_update publishes it as it would a new one."""
    wanted = []
    for e in entries:
        n = e.get("chunks")
        wanted += [topics.chunk_topic(e, k) for k in range(n)] if n else [topics.package_topic(e)]
    got = mqtt.collect_retained(client, *wanted)
    out = []
    for e in entries:
        n = e.get("chunks")
        parts = [topics.chunk_topic(e, k) for k in range(n)] if n else [topics.package_topic(e)]
        data = b"".join(got.get(t, b"") for t in parts)
        if hashlib.sha256(data).hexdigest() != e["pkg_sha256"]:
            raise MpyBloxError(
                f"{topics.package_topic(e)}: the package is not retained on the broker "
                "(or differs): publish the release again"
            )
        plain = {k: v for k, v in e.items() if k not in CHUNK_FIELDS}
        out.append(publish.Package(plain, data, topics.package_topic(e)))
    return out


def _cut_as(entries: list[dict]) -> dict:
    """publish_update's chunk_size that cuts fetch_packages' packages into `entries`
    again: one chunk size for every package of a publish, none (0) if none was cut."""
    sizes = {e["chunk_size"] for e in entries if e.get("chunks")}
    return {"chunk_size": sizes.pop() if len(sizes) == 1 else 0}


class Runner:
    """One workstation's run of a rollout: sends, follows the devices, writes the state."""

    def __init__(
        self, client, broker, doc: dict, packages, opts: Options, packages_out: bool = False
    ) -> None:
        self.client, self.broker, self.doc, self.packages = client, broker, doc, packages
        self.opts = opts
        self.out = opts.out or sys.stdout
        self.writer = f"{socket.gethostname()}:{os.getpid()}"
        self.lock = threading.RLock()
        self.changed = threading.Event()
        self.control: dict | None = None  # a pause or abort written by another command
        self.reports: dict[str, dict] = {}  # device -> {"info": {...}, "status": {...}}
        self.shown = ""
        # Whether the release's packages are on the broker: sent by this run, or read
        # back from it (resume); then a stage sends only its lists.
        self.packages_out = packages_out
        self.dirty = False  # outcomes judged since the last write
        self.saved_at = 0.0  # time.monotonic() of the last write
        self.save_gap = SAVE_EVERY_S  # before outcomes are written again

    # -- the state on the broker

    def save(self) -> None:
        with self.lock:
            doc = self.doc
            if self.control:  # never write over a pause or an abort
                doc["status"], doc["reason"] = self.control["status"], self.control["reason"]
            doc["rev"] = int(doc.get("rev", 0)) + 1
            doc["writer"], doc["updated"] = self.writer, time.time()
            payload = rs.encode(doc)
            self.dirty, self.saved_at = False, time.monotonic()
            self.save_gap = max(SAVE_EVERY_S, len(payload) / SAVE_RATE)
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
        """The stage's lists: one write-ahead naming each device `sending` with its
        list's seq and SHA256, the lists, then one write naming them `sent`. A pause
        or abort seen between two lists stops the sending there."""
        devices = self.doc["devices"]
        by_topic = {topics.node_topic(d, "cmd"): d for d in device_ids}

        def before_lists(seq, lists) -> None:
            now = time.time()
            with self.lock:
                if self.control:
                    raise _Stopped
                for topic, payload in lists:
                    devices[by_topic[topic]] = {
                        "stage": stage,
                        "state": rs.SENDING,
                        "seq": seq,
                        "list": hashlib.sha256(payload).hexdigest(),
                        "sent_at": now,
                        "reason": "",
                    }
            self.save()

        listed = [0]  # lists acknowledged by the broker (publish_retained waits)

        def on_list(seq, payload) -> None:
            # Called before each list goes out, in the order of device_ids.
            with self.lock:
                if self.control:
                    raise _Stopped
            listed[0] += 1

        try:
            done = publish.publish_update(
                self.broker,
                self.packages,
                device_ids=tuple(device_ids),
                key=self.opts.key,
                client=self.client,
                log=_quiet,
                on_list=on_list,
                before_lists=before_lists,
                send_packages=self._packages_needed(),
                **(self.opts.publish_kwargs or {}),
            )
        except _Stopped:
            # Stopped between two lists: those acknowledged went out, the rest did
            # not and go with their stage if the rollout is resumed.
            with self.lock:
                for n, d in enumerate(device_ids):
                    if d in devices and devices[d]["state"] == rs.SENDING:
                        if n < listed[0]:
                            devices[d]["state"] = rs.SENT
                        else:
                            del devices[d]
            return
        self.packages_out = True
        with self.lock:
            # The entries as listed (chunk fields, if publish chunked a package): where
            # resume and revert find the packages again.
            self.doc["entries"] = done.entries
            for d in device_ids:
                devices[d]["state"] = rs.SENT
        self.save()

    def _packages_needed(self) -> bool:
        # The packages are content-addressed and retained: once out (or read back from
        # the broker by resume) they are not sent again; but with --expire, where each
        # publish restarts their time on the broker, as `publish` would.
        expiring = (self.opts.publish_kwargs or {}).get("package_expiry") is not None
        return not self.packages_out or expiring

    def _settle_sending(self) -> None:
        """After a crash: a device left `sending` got its list if its retained cmd is
        that list, byte for byte; else it did not, and goes with its stage.

        The SHA256 recorded is of bytes this rollout signed for that device's topic
        with a seq no list had before (publish.next_seq): only the key holder's
        publish of them can have put them there, so an equal hash is proof enough,
        and a list of anyone else (or none) is not this one."""
        stuck = [d for d, v in self.doc["devices"].items() if v.get("state") == rs.SENDING]
        if not stuck:
            return
        cmds: dict[str, bytes] = {}
        for n in range(0, len(stuck), SETTLE_BATCH):  # under the broker's queue per client
            batch = stuck[n : n + SETTLE_BATCH]
            cmds.update(
                mqtt.collect_retained(self.client, *[topics.node_topic(d, "cmd") for d in batch])
            )
        with self.lock:
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
        while True:
            if self.control:
                return self._stopped()
            # Outcomes go to the broker in batches, for `rollout status`: at most one
            # write each SAVE_EVERY_S (longer for a document of thousands of devices),
            # and at the stage's end. They need no write to be safe: a resume judges
            # again from the devices' retained reports.
            self.dirty |= self._judge_all()
            if self.dirty and time.monotonic() - self.saved_at >= self.save_gap:
                self.save()
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
                if not any(doc["devices"].get(d) for d in members):
                    doc["stage_started_at"] = time.time()
                self.progress(force=True)
                self._send(unsent, i)
                continue
            pending = [d for d in members if doc["devices"][d]["state"] == rs.SENT]
            if pending:
                self.progress()
                self.changed.wait(0.5)
                self.changed.clear()
                continue
            if doc.get("stage_done_at") is None:
                doc["stage_done_at"] = time.time()
                started = doc.get("stage_started_at") or doc["stage_done_at"]
                doc.setdefault("stage_s", []).append(round(doc["stage_done_at"] - started, 1))
                self.save()
                self.progress(force=True)
            if i + 1 == len(doc["targets"]):
                return self._finish()
            if time.time() < doc["stage_done_at"] + doc["bake_s"]:
                self.progress()
                self.changed.wait(0.5)
                self.changed.clear()
                continue
            # The next stage's write-ahead writes this too (a crash before it resumes
            # here, the bake already over).
            doc["stage"], doc["stage_done_at"] = i + 1, None

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
                send_packages=self._packages_needed(),
                **(self.opts.publish_kwargs or {}),
            )
            self.packages_out = True
            doc["channel_list"]["state"] = rs.SENT
        doc["status"], doc["reason"] = "done", ""
        self.save()
        self.say(f"channel list published on {topics.channel_topic(doc['channel'])}")
        # Done, but 0 only when every device confirmed: failures within --max-failures
        # still ask for a look.
        return HALTED if self.failures() else DONE

    def _stopped(self) -> int:
        status = self.control["status"]
        # Written again with what this run knows (a device sent since the pause read
        # the state), the pause or abort kept: a resume must not send it twice.
        self.save()
        self.say(f"rollout {status} by another command: stopped sending")
        return PAUSED if status == "paused" else ABORTED

    # -- output

    def say(self, line: str) -> None:
        if not self.opts.quiet:
            print(line, file=self.out, flush=True)

    def progress(self, force: bool = False) -> None:
        # A new line when a count changes, not for each second of a countdown.
        line = rs.stage_line(self.doc)
        key = line.split(", baking")[0].split(", ETA")[0]
        if key != self.shown or force:
            self.shown = key
            self.say(line)


class _Stopped(Exception):
    """A pause or abort by another command, seen between two lists of a stage."""


def _quiet(line: str) -> None:
    pass  # publish's own lines: the rollout says what it sends in its progress


def _reason(state, error) -> str:
    return f"{state}: {error}" if error else str(state)


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
        doc = rs.new_state(
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
    failed = len(runner.failures())
    if runner.doc["status"] == "done" and failed:
        runner.doc["reason"] = f"{failed} failure(s), within --max-failures"
        runner.save()
    if not runner.opts.quiet or code != DONE:
        print(rs.summary(runner.doc), file=runner.out, flush=True)
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
        # Cut as they were, so the lists name the chunks the broker retains.
        opts.publish_kwargs = {**(opts.publish_kwargs or {}), **_cut_as(doc["entries"])}
        doc["status"], doc["reason"] = "running", ""
        runner = Runner(client, broker, doc, packages, opts, packages_out=True)
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
        if doc["status"] == "done":
            raise MpyBloxError(
                f"the rollout on {channel} is done: the channel has its list; publish the "
                "previous release to the channel to go back"
            )
        if doc["status"] in ("aborted", "halted") and not (status == "aborted" and revert):
            raise MpyBloxError(f"the rollout on {channel} is {doc['status']} already")
        if status == "paused" and doc["status"] != "running":
            raise MpyBloxError(f"the rollout on {channel} is {doc['status']}: nothing to pause")
        packages = None
        sent = list(doc["devices"])  # a `sending` one may have it: the previous is harmless
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
            publish.publish_update(  # the packages were just read back from the broker
                broker,
                packages,
                device_ids=tuple(sent),
                key=key,
                client=client,
                log=_quiet,
                send_packages=False,
                **_cut_as(doc["previous"]),
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
