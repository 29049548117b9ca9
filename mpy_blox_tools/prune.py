"""`mpy-blox prune`: the retained packages and chunks no current list references.

    survey = prune.survey(client)         # read everything retained under mpypi/
    print(prune.format_survey(survey))    # what is unreferenced, with sizes
    prune.delete(client, survey.orphans)  # an empty retained message on each topic

A package is referenced when a retained list names it: a channel list
(`mpypi/channels/#`) or a device's command list (`mpypi/nodes/+/cmd`), signed or
not (the bodies are read with `manifest.decode` and no key: nothing is trusted,
only which packages are named). A chunked entry references its `chunks` chunk
topics and its hash list; a plain one its package topic. Everything else under
`mpypi/packages/` that is a package, a chunk or a hash list is unreferenced.

Fail closed: a retained list that cannot be read stops everything (a package
only it names would look unreferenced), and so do lists that change while
prune reads (a publish under way): nothing is deleted. The packages are read
before the lists, so a release published meanwhile (packages first, then its
list) is either seen whole or its packages are not seen at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import mqtt
from mpy_blox_tools.errors import MpyBloxError

LIST_FILTERS = (topics.channel_topic("#"), topics.node_topic("+", "cmd"))
PACKAGE_FILTER = topics.PREFIX + "packages/#"
# Reading every retained package is reading every package's bytes: give a slow
# link time (collect_retained's default is for lists and reports).
READ_TIMEOUT = 120.0
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass
class Orphan:
    """The unreferenced retained messages of one package: its whole, chunks, hash list."""

    package_topic: str
    sizes: dict[str, int] = field(default_factory=dict)  # {topic: bytes}

    @property
    def size(self) -> int:
        return sum(self.sizes.values())

    @property
    def kind(self) -> str:
        """`package`, `5 chunks + hash list`, `hash list`..."""
        parts = []
        if self.package_topic in self.sizes:
            parts.append("package")
        n = sum(
            1 for t in self.sizes if t.rsplit("/", 1)[-1].isdigit() and t != self.package_topic
        )
        if n:
            parts.append(f"{n} chunk{'s' if n != 1 else ''}")
        hash_lists = sum(1 for t in self.sizes if t.endswith("/hashes"))
        if hash_lists:
            parts.append("hash list" if hash_lists == 1 else f"{hash_lists} hash lists")
        return " + ".join(parts)


@dataclass
class Survey:
    lists: dict[str, bytes]  # the retained lists read, by topic
    package_messages: int  # retained messages under mpypi/packages/ read
    package_bytes: int
    orphans: list[Orphan]  # by package topic
    unknown: list[str]  # under mpypi/packages/ but no package, chunk or hash list: left alone

    @property
    def orphan_messages(self) -> int:
        return sum(len(o.sizes) for o in self.orphans)

    @property
    def orphan_bytes(self) -> int:
        return sum(o.size for o in self.orphans)


def package_of(topic: str) -> str | None:
    """The package topic a retained topic under mpypi/packages/ belongs to (the topic
    itself, or the package of a chunk or hash list); None for anything else."""
    parts = topic.split("/")
    shas = [i for i, part in enumerate(parts) if _SHA.fullmatch(part)]
    if not shas or parts[:2] != ["mpypi", "packages"]:
        return None
    i = shas[-1]  # a src path may hold 64 hex digits too: the last is the SHA256
    if not ((parts[2] == "wheel" and i == 3) or (parts[2] == "src" and i >= 4)):
        return None
    rest = parts[i + 1 :]
    # A chunk or hash list: {package topic}/{chunk_size}/{k or "hashes"}.
    if rest and not (
        len(rest) == 2 and rest[0].isdigit() and (rest[1] == "hashes" or rest[1].isdigit())
    ):
        return None
    return "/".join(parts[: i + 1])


def referenced(entries: list[dict]) -> set[str]:
    """The retained topics a list's entries name."""
    out = set()
    for e in entries:
        if "chunks" in e:
            out.update(topics.chunk_topic(e, k) for k in range(e["chunks"]))
            out.add(topics.chunk_topic(e, None))
        else:
            out.add(topics.package_topic(e))
    return out


def read_lists(client, limit: float = READ_TIMEOUT) -> tuple[dict[str, bytes], set[str]]:
    """Every retained list and the topics they reference; MpyBloxError, naming the
    topic, for one that cannot be read."""
    lists = mqtt.collect_retained(client, *LIST_FILTERS, limit=limit)
    names: set[str] = set()
    for topic, payload in sorted(lists.items()):
        try:
            entries = manifest.decode(payload, None).entries  # no key: bodies only
        except Exception as e:  # junk of any shape: refuse, never guess
            raise MpyBloxError(
                f"the retained list on {topic} cannot be read ({e or type(e).__name__}): "
                "nothing deleted (a package only it names would look unreferenced); "
                "publish a good list there or clear the topic, then prune again"
            ) from None
        names |= referenced(entries)
    return lists, names


def survey(client, limit: float = READ_TIMEOUT) -> Survey:
    """What is retained under mpypi/packages/ and which of it no list references."""
    packages = mqtt.collect_retained(client, PACKAGE_FILTER, limit=limit)  # before the lists
    lists, names = read_lists(client, limit)
    orphans: dict[str, Orphan] = {}
    unknown = []
    for topic, payload in sorted(packages.items()):
        owner = package_of(topic)
        if owner is None:
            unknown.append(topic)
        elif topic not in names:
            orphans.setdefault(owner, Orphan(owner)).sizes[topic] = len(payload)
    return Survey(
        lists,
        len(packages),
        sum(len(p) for p in packages.values()),
        list(orphans.values()),
        unknown,
    )


def delete(client, orphans: list[Orphan], log: Callable[[str], None] = print) -> int:
    """Clear each orphan's retained messages (an empty retained publish); their count."""
    n = 0
    for o in orphans:
        for topic in o.sizes:
            mqtt.publish_retained(client, topic, b"", timeout=30)
            n += 1
        log(f"deleted {o.package_topic} ({o.kind}, {o.size} bytes)")
    return n


def format_survey(s: Survey, broker) -> str:
    lines = [
        f"read {len(s.lists)} list(s) and {s.package_messages} package message(s), "
        f"{s.package_bytes} bytes, on {broker}"
    ]
    for topic in s.unknown:
        lines.append(f"left alone (not a package, chunk or hash list): {topic}")
    if not s.orphans:
        lines.append("nothing to prune: every retained package is in a current list")
        return "\n".join(lines)
    lines.append(f"{'BYTES':>10}  {'WHAT':<26}  PACKAGE TOPIC")
    for o in s.orphans:
        lines.append(f"{o.size:>10}  {o.kind:<26}  {o.package_topic}")
    lines.append(
        f"{s.orphan_bytes:>10}  total: {len(s.orphans)} package(s), "
        f"{s.orphan_messages} retained message(s) no list references"
    )
    return "\n".join(lines)


def prune(broker: mqtt.BrokerURL, yes: bool = False, log: Callable[[str], None] = print) -> int:
    """`mpy-blox prune`: list the unreferenced packages; with `yes`, delete them.

    Before deleting, the lists are read again: if they changed (a publish under way),
    nothing is deleted. Returns the number of retained messages deleted."""
    client = mqtt.connect(broker)
    try:
        s = survey(client)
        log(format_survey(s, broker))
        if not s.orphans:
            return 0
        if not yes:
            log("nothing deleted: run again with --yes to delete them")
            return 0
        again, _ = read_lists(client)
        if again != s.lists:
            changed = sorted(
                set(again) ^ set(s.lists) | {t for t in again if again[t] != s.lists.get(t)}
            )
            raise MpyBloxError(
                f"the lists changed while prune read them ({', '.join(changed)}): a publish "
                "under way? nothing deleted; prune again when it is done"
            )
        n = delete(client, s.orphans, log)
        log(f"deleted {n} retained message(s), {s.orphan_bytes} bytes")
        return n
    finally:
        mqtt.disconnect(client)
