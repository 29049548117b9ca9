"""The one error type of the workstation tools: its message is shown to the user as is."""


class MpyBloxError(Exception):
    """A failure the user can act on; the CLI prints `mpy-blox: <message>` and exits 1."""
