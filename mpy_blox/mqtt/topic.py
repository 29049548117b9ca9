# Topic filters: which subscription a received topic belongs to.
#
# Written without str.split() so matching allocates nothing: it runs for every
# message received.


def matches(pattern, topic):
    """True if `topic` matches the filter `pattern` (MQTT 3.1.1 section 4.7)."""
    # "$SYS/..." and other "$" topics never match a filter that starts with a
    # wildcard (4.7.2).
    if topic[:1] == "$" and pattern[:1] in ("+", "#"):
        return False
    p = t = 0
    np, nt = len(pattern), len(topic)
    while p < np:
        c = pattern[p]
        if c == "#":
            return True  # matches the parent level too: "a/#" matches "a"
        if c == "+":
            p += 1  # skip the rest of this topic level
            while t < nt and topic[t] != "/":
                t += 1
        elif t < nt and c == topic[t]:
            p += 1
            t += 1
        else:
            # "a/#" also matches "a": here the pattern is at "/#" and the topic ended.
            return t == nt and pattern[p:] == "/#"
    return t == nt


def respelled(pattern, topic):
    """True if `topic` is the exact filter `pattern` with some '.' delivered as '/'.

    RabbitMQ's MQTT plugin maps topics to AMQP routing keys, where '.' separates
    words, and back again on delivery: a message published on "a/b.py" reaches
    the subscriber of "a/b.py" as "a/b/py". A device subscribes to exact
    topics, so the subscription says what the message is (a package's SHA256
    check still proves its bytes). Wildcard filters never match this way.
    """
    n = len(pattern)
    if n != len(topic):
        return False
    for i in range(n):
        c = pattern[i]
        if c in "+#":
            return False
        if c != topic[i] and not (c == "." and topic[i] == "/"):
            return False
    return True


def check_filter(pattern):
    """Raise ValueError unless `pattern` is a well-formed topic filter."""
    if not pattern or len(pattern) > 65535:
        raise ValueError("empty or oversize topic filter")
    n = len(pattern)
    for i in range(n):
        c = pattern[i]
        if c in "+#":
            # A wildcard fills a whole level, and "#" only the last one.
            if (i and pattern[i - 1] != "/") or (i + 1 < n and pattern[i + 1] != "/"):
                raise ValueError("wildcard not alone in its level: %s" % pattern)
            if c == "#" and i != n - 1:
                raise ValueError("'#' not last in %s" % pattern)
