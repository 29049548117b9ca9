# Emulated `machine` of an ESP32 on the virtual board.
# Shadows the unix port's small built-in module and keeps what it has.
import _vb_host
from umachine import *  # noqa: F403  (Signal, idle, mem8, ...)

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

_reset_cause = PWRON_RESET


def _start(reset_cause):
    global _reset_cause
    _reset_cause = reset_cause


def unique_id():
    # An ESP32 reports its 6-byte base MAC; fixed per board in board.json.
    return bytes.fromhex(_vb_host.board["unique_id"])


def reset():
    _vb_host.power_off("reset")


def soft_reset():
    # On an ESP32 a soft reset restarts the interpreter and reruns boot.py and
    # main.py; the supervisor boots the board again for the same effect.
    _vb_host.power_off("soft-reset")


def reset_cause():
    return _reset_cause


def freq(hz=None):
    if hz is None:
        return 160000000


def deepsleep(time_ms=0):
    _vb_host.power_off("deepsleep")


def lightsleep(time_ms=0):
    import time

    time.sleep_ms(time_ms)
