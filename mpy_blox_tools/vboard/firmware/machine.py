# Emulated `machine` of an ESP32 on the virtual board.
# Shadows the unix port's small built-in module and keeps what it has.
import _vb_host
import utime
from umachine import *  # noqa: F403  (Signal, idle, mem8, ...)

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

_reset_cause = PWRON_RESET
_wdt = None  # run/wdt, opened before the flash is mounted: see WDT
_wdt_line = b""


def _start(reset_cause, wdt_file):
    global _reset_cause, _wdt
    _reset_cause = reset_cause
    _wdt = wdt_file


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


class RTC:
    """The ESP32 port's RTC (ports/esp32/machine_rtc.c, 1.22): the wall clock of
    time.time(), which starts at 2000-01-01 00:00:00 (firmware/time.py).

    datetime() -> (year, month, day, weekday, hours, minutes, seconds, microseconds);
    datetime(tuple) sets it (the weekday is ignored), as ntptime.settime() does."""

    def __init__(self, id=0):
        pass

    def datetime(self, t=None):
        import time

        if t is None:
            n = utime.time() - time._base
            t = time.gmtime(int(n))
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], int((n % 1) * 1000000))
        if len(t) < 7:
            raise ValueError("requested length %d but object has length %d" % (8, len(t)))
        n = t[7] / 1000000 if len(t) > 7 else 0
        time._set(time.mktime((t[0], t[1], t[2], t[4], t[5], t[6])) + n)

    def init(self, t):
        self.datetime(t)


class WDT:
    """The ESP32's task watchdog (ports/esp32/machine_wdt.c, 1.22).

    Arming it writes the timeout, in ms, to run/wdt; each feed writes it again,
    which moves the file's mtime: one write() of bytes made when it was armed,
    to a host file, never a flash write. The supervisor resets a board whose
    file stays untouched for longer than the timeout. As on the ESP32, every
    WDT() is the same watchdog: a second call sets a new timeout (counted from
    then), there is no way to stop it, and only a reset disarms it (the next
    boot opens run/wdt empty).
    """

    def __init__(self, id=0, timeout=5000):
        global _wdt_line
        if not isinstance(timeout, int):
            raise TypeError("can't convert %s to int" % type(timeout).__name__)
        if timeout > 0x7FFFFFFF:  # an ESP32's machine word
            raise OverflowError("overflow converting long int to machine word")
        if id != 0:
            raise ValueError
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        # Fixed width: a shorter timeout overwrites a longer one whole.
        _wdt_line = b"%10d" % timeout
        self.feed()

    def feed(self):
        _wdt.seek(0)
        _wdt.write(_wdt_line)
