# The virtual board's link to its host: the board folder, the files the
# supervisor reads, and the power switch.
#
# Once the flash is mounted at "/", the host filesystem is gone from the board's
# view. Files the emulation needs at run time are opened before that and stay
# usable; the rare atomic host write (an NVS commit) mounts the board folder for
# the duration of one synchronous call, so no board code ever sees it.
import json
import os
import vfs

_HOST_MOUNT = "/_vboard_host"

board = None  # the board.json dict, plus "dir"
_reason = None


def start(board_config, reason_file):
    global board, _reason
    board = board_config
    _reason = reason_file


def power_off(reason):
    """Stop the board at once, as a reset or a power cut does: no cleanup runs."""
    _reason.seek(0)
    _reason.write(reason.encode())
    # The board is this process; `kill -9` from a child shell is the only
    # immediate exit the unix port offers (sys.exit can be caught).
    os.system("kill -9 $PPID")
    while True:
        pass


class mounted:
    """`with mounted() as root:` gives the board folder at `root` for a moment."""

    def __enter__(self):
        # The whole host tree, not VfsPosix(board_dir): with a root prefix, the
        # unix port's VfsPosix.rename() misses it on one of its two paths (1.29).
        vfs.mount(vfs.VfsPosix(), _HOST_MOUNT)
        return _HOST_MOUNT + board["dir"]

    def __exit__(self, *exc):
        vfs.umount(_HOST_MOUNT)


def write_json_atomic(name, obj):
    """Replace a file in the board folder with `obj` as JSON, so that a crash leaves
    the old or the new copy. Streamed to the file: the emulation must not ask the
    board's heap for a block the size of the whole document (an ESP32 keeps NVS
    outside the MicroPython heap)."""
    with mounted() as root:
        with open(root + "/" + name + ".tmp", "wb") as f:
            json.dump(obj, f)
        os.rename(root + "/" + name + ".tmp", root + "/" + name)


def read(name, default=None):
    with mounted() as root:
        try:
            with open(root + "/" + name, "rb") as f:
                return f.read()
        except OSError:
            return default
