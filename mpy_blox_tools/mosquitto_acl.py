"""Mosquitto ACL files, enforced by the embedded broker: one file serves both brokers.

The format Mosquitto 2.0 reads with `acl_file` (its `mosquitto.conf(5)`):

    # a comment
    topic read mpypi/channels/#        before any `user` line: anonymous clients
    user publisher                     the `topic` lines after it are this user's
    topic readwrite mpypi/#
    pattern read mpypi/nodes/%u/cmd    every client; %u its user name, %c its client id

Access is `read`, `write`, `readwrite` (the default when left out) or `deny`; a
`deny` rule that matches wins over any grant. Like Mosquitto, a pattern is not
applied for a client whose user name (client id) contains `/`, `+` or `#`, or has
none: `mpypi/nodes/%u/info` must never grow into another device's topics.

Reading is checked per message, retained ones included; a subscription is accepted
when some read rule may overlap its filter (so `mpypi/#` is a valid subscription for
a device, which then receives only what it may read), as Mosquitto does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError

READ, WRITE = "read", "write"
ACCESS = {"read": {READ}, "write": {WRITE}, "readwrite": {READ, WRITE}, "deny": set()}
_UNSAFE = ("/", "+", "#")


@dataclass(frozen=True)
class Rule:
    access: frozenset[str]  # empty: deny
    topic: str  # a topic filter; for a pattern, with %u / %c still in it
    pattern: bool

    def expand(self, username: str | None, client_id: str | None) -> str | None:
        """The filter for this client, None when a pattern cannot be filled safely."""
        if not self.pattern:
            return self.topic
        topic = self.topic
        for token, value in (("%u", username), ("%c", client_id)):
            if token in topic:
                if not value or any(c in value for c in _UNSAFE):
                    return None
                topic = topic.replace(token, value)
        return topic


@dataclass(frozen=True)
class Acl:
    anonymous: tuple[Rule, ...]
    users: dict[str, tuple[Rule, ...]]
    patterns: tuple[Rule, ...]

    def _filters(self, username: str | None, client_id: str | None):
        own = self.users.get(username, ()) if username is not None else self.anonymous
        for rule in (*own, *self.patterns):
            topic = rule.expand(username, client_id)
            if topic is not None:
                yield rule.access, topic

    def may_publish(self, username: str | None, client_id: str | None, topic: str) -> bool:
        return self._allows(username, client_id, topic, WRITE, matches)

    def may_receive(self, username: str | None, client_id: str | None, topic: str) -> bool:
        return self._allows(username, client_id, topic, READ, matches)

    def may_subscribe(
        self, username: str | None, client_id: str | None, topic_filter: str
    ) -> bool:
        return self._allows(username, client_id, topic_filter, READ, overlap)

    def _allows(self, username, client_id, topic, access, test) -> bool:
        rules = list(self._filters(username, client_id))
        if any(not granted and matches(f, topic) for granted, f in rules):
            return False
        return any(access in granted and test(f, topic) for granted, f in rules)


def matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` (no wildcards) falls under `topic_filter` (MQTT 3.1.1 4.7)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def overlap(a: str, b: str) -> bool:
    """Whether some topic falls under both filters."""
    x, y = a.split("/"), b.split("/")
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == "#" or q == "#":
            return True
        if p is None or q is None:
            return False
        if p != q and "+" not in (p, q):
            return False
    return True


def load(path: Path) -> Acl:
    """The rules of an acl_file; MpyBloxError names the first line it cannot use."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise MpyBloxError(f"{path}: cannot read the ACL file ({e.strerror})") from e
    anonymous: list[Rule] = []
    users: dict[str, list[Rule]] = {}
    patterns: list[Rule] = []
    current = anonymous
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user" and rest:
            current = users.setdefault(rest, [])
            continue
        access, _, topic = rest.partition(" ")
        if access not in ACCESS:  # `topic a/b`: readwrite
            access, topic = "readwrite", rest
        topic = topic.strip()
        if keyword not in ("topic", "pattern") or not topic or not _valid_filter(topic):
            raise MpyBloxError(
                f"{path}:{number}: not an ACL line "
                "(user NAME | topic|pattern [read|write|readwrite|deny] FILTER)"
            )
        rule = Rule(frozenset(ACCESS[access]), topic, keyword == "pattern")
        (patterns if rule.pattern else current).append(rule)
    return Acl(tuple(anonymous), {u: tuple(r) for u, r in users.items()}, tuple(patterns))


def _valid_filter(topic_filter: str) -> bool:
    levels = topic_filter.split("/")
    return (
        all(level in ("+", "#") or ("+" not in level and "#" not in level) for level in levels)
        and "#" not in levels[:-1]
    )
