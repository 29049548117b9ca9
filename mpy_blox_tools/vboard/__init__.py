"""The virtual board: a real MicroPython process with emulated ESP32 flash, NVS, WLAN and reset."""

from mpy_blox_tools.vboard.board import Board

__all__ = ["Board"]
