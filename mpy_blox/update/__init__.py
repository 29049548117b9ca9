# mpy_blox.update: the over-the-air install core (see docs/protocol.md).
# Import-safe on CPython: the publisher imports mpy_blox.update.manifest.
