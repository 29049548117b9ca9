# Mpy-BLOX: MicroPython building blox for ESP32 devices.
# The version is rewritten into the device wheel by `mpy-blox build`.
__version__ = "0.1.0"
