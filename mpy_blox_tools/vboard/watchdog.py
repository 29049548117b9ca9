"""The host side of a virtual board's `machine.WDT`, and how often the supervisor looks.

The board's emulated watchdog (firmware/machine.py) writes to run/wdt; the supervisor
(supervisor.py) looks at that file at each turn of its select loop and kills the board
when the timeout has passed since the last feed it saw. How often the loop turns is
set here, by the timeout, so that a fleet of idle boards does not wake 20 times a
second each and a reset stays late, never early.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# The select loop's tick: at most TICK_S while input is held, where the OS gives no
# pidfd for the board's exit, or while a watchdog of up to 1 s is armed (a
# twentieth of a longer timeout, up to IDLE_TICK_S); IDLE_TICK_S while none is armed.
TICK_S = 0.05
IDLE_TICK_S = 0.5
# Writes this close after an mtime can carry that same mtime (the coarse clock's tick,
# with room to spare).
SAME_MTIME_NS = 50_000_000


class Watchdog:
    """The host side of the emulated `machine.WDT` (firmware/machine.py).

    The board writes its timeout in ms to run/wdt when it arms the watchdog and
    again at every feed: a feed is a moved mtime (or a new timeout), seen here at
    the next turn of the select loop (`tick_s` apart at most). Time runs on this side's clock from
    the moment a feed is seen, so a supervisor slow to look is late to reset,
    never early. An empty file is a disarmed watchdog.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns: int | None = None
        self._read_ns = 0  # wall clock of the last read of the file
        self._timeout_s = 0.0
        self._fed_at = 0.0
        self._armed = False

    def tick_s(self) -> float:
        """How often to look: a twentieth of the timeout, between TICK_S and IDLE_TICK_S
        (so a reset is late by 5 % of the timeout at most, or by 50 ms); IDLE_TICK_S
        while disarmed (an arming is seen that much late: the time counts from then)."""
        if not self._armed:
            return IDLE_TICK_S
        return min(max(self._timeout_s / 20, TICK_S), IDLE_TICK_S)

    def expired(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._armed = False
            return False
        self._armed = bool(st.st_size)
        if not st.st_size:
            return False
        # Mtimes move by the kernel's coarse clock (a few ms): a feed followed at once
        # by a WDT() with a new timeout can leave the same mtime, and the print between
        # them wakes this loop in that window. So the timeout is read again while the
        # mtime is that recent, not only when it moved; then the file rests until the
        # next feed (a fleet's idle boards are not read at every tick).
        moved = st.st_mtime_ns != self._mtime_ns
        if moved or self._read_ns < st.st_mtime_ns + SAME_MTIME_NS:
            read_ns = time.time_ns()
            try:
                timeout_s = int(self.path.read_bytes()) / 1000
            except ValueError:
                return False  # read in the middle of a write: again at the next turn
            self._read_ns = read_ns
            if moved or timeout_s != self._timeout_s:
                self._mtime_ns = st.st_mtime_ns
                self._timeout_s = timeout_s
                self._fed_at = time.monotonic()
        return time.monotonic() - self._fed_at > self._timeout_s
