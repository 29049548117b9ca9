# The update's one error, shared by the list format, the path checks and the
# installer without any of them importing another. Pure (CPython imports it
# through mpy_blox.update.manifest, which re-exports it).


class InvalidUpdate(ValueError):
    """The list or a package is bad: refuse it, report the reason, change nothing."""
