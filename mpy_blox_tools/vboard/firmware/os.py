# Emulated `os` of the virtual board: the unix port's, plus uname() as on an ESP32.
import sys

from uos import *  # noqa: F403

_uname = None


def uname():
    global _uname
    if _uname is None:
        from collections import namedtuple

        v = sys.implementation.version
        release = "%d.%d.%d" % (v[0], v[1], v[2])
        _uname = namedtuple(
            "uname_result", ("sysname", "nodename", "release", "version", "machine")
        )(
            "esp32",
            "esp32",
            release,
            "v" + release + " (virtual board)",
            "Virtual board (MicroPython unix port) with ESP32",
        )
    return _uname
