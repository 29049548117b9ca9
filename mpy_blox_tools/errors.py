"""The one error type of the workstation tools: its message is shown to the user as is.

`read_file` reads a file the user named, failing with that error."""

from __future__ import annotations

from pathlib import Path


class MpyBloxError(Exception):
    """A failure the user can act on; the CLI prints `mpy-blox: <message>` and exits 1."""


def read_file(path: Path, what: str = "") -> bytes:
    """The bytes of `path`; a missing or unreadable file is one MpyBloxError naming
    it (`what` says what it is for, e.g. "key file")."""
    name = f"{what} {path}" if what else str(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MpyBloxError(f"{name}: no such file") from None
    except OSError as e:
        raise MpyBloxError(f"{name}: cannot read it ({e.strerror})") from None
