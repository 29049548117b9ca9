# Emulated `time` of an ESP32 on the virtual board: the wall clock of the ESP32
# port of MicroPython 1.22, where the unix port's comes from the host.
#
# On an ESP32 time.time() counts seconds since 2000-01-01 (the port's epoch:
# gmtime(0) is 2000) and the RTC starts at 2000-01-01 00:00:00 at power-on,
# until machine.RTC().datetime(...) sets it (ntptime.settime() does just that).
# A software reset (machine.reset(), the watchdog) keeps it running: ESP-IDF
# keeps the system time in the RTC domain, lost only at power-on. Here the
# board's clock is the host's clock minus `_base`, kept in run/clock over resets
# of one `vboard run`; board.json's "clock": "host" starts it set instead.
# time.time() is an int, as on an ESP32 (the unix port's is a float).
import utime as _host
from utime import *  # noqa: F403  (sleep, sleep_ms, ticks_ms, ticks_diff, ...)

_EPOCH_2000 = 946684800  # Unix time of 2000-01-01
_base = 0.0  # host Unix time at which the board's clock read 2000-01-01 00:00:00
_file = None  # run/clock, opened before the flash is mounted


def _start(clock_file, keep, host_set):
    # keep: a software reset (the RTC ran on); host_set: board.json says "host".
    global _base, _file
    _file = clock_file
    saved = clock_file.read() if keep else b""
    if saved:
        _base = float(saved)
    elif host_set:
        _set(_host.time() - _EPOCH_2000)
    else:
        _set(0)


def _set(seconds):
    # The board's clock reads `seconds` (since 2000) now.
    global _base
    _base = _host.time() - seconds
    _file.seek(0)
    _file.write(b"%24.6f" % _base)  # fixed width: a new value overwrites the old whole
    _file.flush()


def _now():
    return _host.time() - _base


def time():
    return int(_now())


def time_ns():
    return int(_now() * 1000000) * 1000


def _days(y, m, d):
    # Days from 2000-01-01 to y-m-d (proleptic Gregorian), for mktime.
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 730425


def mktime(t):
    return _days(t[0], t[1], t[2]) * 86400 + t[3] * 3600 + t[4] * 60 + t[5]


def gmtime(secs=None):
    # (year, month, mday, hour, minute, second, weekday, yearday): 8 fields, as
    # the ESP32 port returns.
    if secs is None:
        secs = time()
    return _host.gmtime(int(secs) + _EPOCH_2000)[:8]


localtime = gmtime  # an ESP32 has no time zone
