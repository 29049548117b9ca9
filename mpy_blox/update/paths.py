# Path safety for everything an update writes. Pure: shared with the publisher
# (CPython) so a bad path is refused before it is ever published.
#
# A path is relative to the device root ("user_main.py", "lib/x.py"), made of
# ASCII segments of [A-Za-z0-9._-] (plus "+" inside wheels, for local versions):
# no "..", no ".", no empty segment, no absolute path, no backslash, nothing
# that cannot be an MQTT topic level (+ #), no spaces (the journal is
# space-separated).
#
# Names are compared as FAT compares them (fold()): without case, and without
# the trailing dots and spaces of each segment, so MAIN.PY and "main.py." are
# main.py (on a FAT flash they open that file). One rule on every file system:
# the publisher does not know which one a device has.
#
# Reserved, so that no update can break recovery or hide the framework
# (docs/protocol.md, "Paths"): the boot files; /.mpypi; for src files any
# .dist-info under /lib (a planted RECORD names what an upgrade deletes); and
# the boot modules, at the root and at the top of /lib, both on sys.path.
#
# InvalidUpdate, the update's one error, lives here: the lowest module that
# raises it, loaded wherever it can be raised (mpy_blox.update.manifest
# re-exports it for the publisher).


class InvalidUpdate(ValueError):
    """The list or a package is bad: refuse it, report the reason, change nothing."""


class HeapShort(InvalidUpdate):
    """Refused for want of heap at this moment, where a fresh heap may have it (the
    install boot tries again after a reset); refused for good on the last try."""


_MAX_PATH = 200
_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
# Written only by a deployment, never by an update; "lib" holds the framework.
_BOOT_FILES = ("main.py", "boot.py", "lib")
INTERNAL = ".mpypi"
# What the boot path imports: main.py, mpypi_recover, the framework, and what
# their frozen modules import (ssl: tls; asyncio: select). The device searches
# sys.path ('', '.frozen', '/lib') before an extensible built-in (os, json,
# time...), so NAME.py, NAME.mpy or a folder NAME at the root or at the top of
# /lib would be imported instead. One string: no tuple of qstrs in the heap.
# tests/update/test_update_paths.py checks that every import of the boot path is here.
_BOOT = (
    " mpypi_recover mpy_blox array asyncio binascii cryptolib deflate errno esp32 gc"
    " hashlib io json machine micropython network os random select socket ssl struct"
    " sys time tls "
)


def fold(path):
    """`path` as FAT compares names: lower case, each segment without trailing dots and spaces."""
    out = ""
    for seg in path.lower().split("/"):
        out += "/" + seg.rstrip(". ")
    return out[1:]


def check_path(path, extra=""):
    """Return `path` if it is a safe relative path, else raise InvalidUpdate."""
    if not isinstance(path, str) or not path:
        raise InvalidUpdate("empty path")
    if len(path) > _MAX_PATH:
        raise InvalidUpdate("path too long: %s..." % path[:40])
    if path[0] == "/":
        raise InvalidUpdate("absolute path: %s" % path)
    for seg in path.split("/"):
        if not seg.rstrip(". "):  # "", ".", "..", and "..." (nothing on FAT)
            raise InvalidUpdate("unsafe path: %s" % path)
        for c in seg:
            if c not in _SAFE and c not in extra:
                if ord(c) > 127:
                    raise InvalidUpdate("non-ASCII character in path: %s" % path)
                raise InvalidUpdate("unsafe character %r in path: %s" % (c, path))
    return path


def _imported(p):
    # True if the folded path p, in a sys.path folder, would be imported as a boot module.
    i = p.find("/")
    if i >= 0:
        name = p[:i]  # a folder: a package
    elif p.endswith(".py"):
        name = p[:-3]
    elif p.endswith(".mpy"):
        name = p[:-4]
    else:
        return False
    return " " + name + " " in _BOOT


def check_src_path(path):
    """A src package's target: safe, and none of the boot path's or the agent's files."""
    check_path(path)
    p = fold(path)
    seg = p.split("/")
    if (
        p in _BOOT_FILES
        or seg[0] == INTERNAL
        or _imported(p)
        or (seg[0] == "lib" and (_imported(p[4:]) or seg[1].endswith(".dist-info")))
    ):
        raise InvalidUpdate("reserved path: %s" % path)
    return path


def check_wheel_path(path, dist=None):
    """A file inside a wheel, installed under /lib.

    With `dist`, the wheel's .dist-info folder (as the list names it, or as
    installed): it writes into no other .dist-info, and takes no boot module's
    name but its own (the framework's wheel, mpy_blox, has the mpy_blox folder).
    """
    check_path(path, "+")
    if dist is None:
        return path
    p = fold(path)
    top = p.split("/")[0]
    if top.endswith(".dist-info") and (path.split("/")[0] != dist or top == p):
        raise InvalidUpdate("not in the wheel's own .dist-info folder: %s" % path)
    if _imported(p) and not (top == "mpy_blox" and dist.lower().startswith("mpy_blox-")):
        raise InvalidUpdate("reserved path: %s" % path)
    return path
