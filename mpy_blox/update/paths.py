# Path safety for everything an update writes. Pure: shared with the publisher
# (CPython) so a bad path is refused before it is ever published.
#
# A path is relative to the device root ("user_main.py", "lib/x.py"), made of
# segments of [A-Za-z0-9._-] (plus "+" inside wheels, for local versions):
# no "..", no ".", no empty segment, no absolute path, no backslash, nothing
# that cannot be an MQTT topic level (+ #), no spaces (the journal is
# space-separated). The agent's own files are refused as src targets: the boot
# files (an update must never be able to break recovery) and /.mpypi.
#
# InvalidUpdate, the update's one error, lives here: the lowest module that
# raises it, loaded wherever it can be raised (mpy_blox.update.manifest
# re-exports it for the publisher).


class InvalidUpdate(ValueError):
    """The list or a package is bad: refuse it, report the reason, change nothing."""


_MAX_PATH = 200
_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
# Written only by a deployment, never by an update (see docs/protocol.md).
RESERVED = ("main.py", "boot.py", "mpypi_recover.py", "mpypi_recover.mpy")
INTERNAL = ".mpypi"


def check_path(path, extra=""):
    """Return `path` if it is a safe relative path, else raise InvalidUpdate."""
    if not isinstance(path, str) or not path:
        raise InvalidUpdate("empty path")
    if len(path) > _MAX_PATH:
        raise InvalidUpdate("path too long: %s..." % path[:40])
    if path[0] == "/":
        raise InvalidUpdate("absolute path: %s" % path)
    for seg in path.split("/"):
        if seg in ("", ".", ".."):
            raise InvalidUpdate("unsafe path: %s" % path)
        for c in seg:
            if c not in _SAFE and c not in extra:
                raise InvalidUpdate("unsafe character %r in path: %s" % (c, path))
    return path


def check_src_path(path):
    """A src package's target: safe, and none of the agent's own files."""
    check_path(path)
    if path in RESERVED or path.split("/")[0] == INTERNAL:
        raise InvalidUpdate("reserved path: %s" % path)
    return path


def check_wheel_path(path):
    """A file inside a wheel, installed under /lib."""
    return check_path(path, "+")
