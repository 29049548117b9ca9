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
# time.time() is an int, as on an ESP32 (the unix port's is a float). Few names:
# each new one is a qstr of the board's pool, which on a 64-bit build moved when
# the pool next grows, and with it the 64-bit app's layout at 100K.
import utime
from utime import *  # noqa: F403  (sleep, sleep_ms, ticks_ms, ticks_diff, ...)

_base = 0.0  # host Unix time at which the board's clock read 2000-01-01 00:00:00
_file = None  # run/clock, opened before the flash is mounted


def _start(file, keep, host):
    # keep: a software reset (the RTC ran on); host: board.json's "clock" is "host".
    global _base, _file
    _file = file
    data = file.read() if keep else b""
    if data:
        _base = float(data)
    else:
        _set(utime.time() - 946684800 if host else 0)  # 946684800: 2000-01-01


def _set(t):
    # The board's clock reads `t` (seconds since 2000) now.
    global _base
    _base = utime.time() - t
    _file.seek(0)
    _file.write(b"%24.6f" % _base)  # fixed width: a new value overwrites the old whole
    _file.flush()


def time():
    return int(utime.time() - _base)


def time_ns():
    return int((utime.time() - _base) * 1000000) * 1000


def mktime(t):
    # Seconds since 2000 of (year, month, mday, hour, minute, second, ...): the days
    # from 2000-01-01 (proleptic Gregorian), then the time of day.
    y, m = t[0] - (t[1] <= 2), t[1]
    n = y // 400
    y -= n * 400
    n = n * 146097 + y * 365 + y // 4 - y // 100 + (153 * (m + (-3 if m > 2 else 9)) + 2) // 5
    return (n + t[2] - 730426) * 86400 + t[3] * 3600 + t[4] * 60 + t[5]


def gmtime(t=None):
    # (year, month, mday, hour, minute, second, weekday, yearday): 8 fields, as
    # the ESP32 port returns.
    return utime.gmtime(int(time() if t is None else t) + 946684800)[:8]


localtime = gmtime  # an ESP32 has no time zone
