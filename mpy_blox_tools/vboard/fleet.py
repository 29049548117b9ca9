"""Many virtual boards under one supervisor process: `mpy-blox vboard fleet DIR...`.

A `vboard run` supervisor is a CPython process of about 30 MB for one board whose
own process (the 32-bit build) holds 2-3 MB: a fleet of hundreds of boards would
spend most of the machine on supervisors. Here one process runs a `Supervisor`
per board, each in a thread of its own with its own select loop, so every board
keeps what `vboard run` gives it: its own MicroPython process, pseudo-terminals,
reboots, watchdog, power cuts and run/ files. The threads spend their time in
select(), where they do not hold the GIL.

Every board is checked and locked before any boots, so a bad folder, a board that
runs elsewhere or two folders of the same device change nothing. SIGTERM, SIGINT
or SIGHUP switch every board off.
"""

from __future__ import annotations

import resource
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

from mpy_blox_tools import micropython
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.supervisor import Supervisor, signals_stop

# Open files a running board holds in the supervisor: two pseudo-terminals (both
# ends), the wake-up pipe, the selector, the lock and the console log, plus the
# pipes of a Popen while it boots.
FILES_PER_BOARD = 12
JOIN_S = 0.5  # the main thread wakes this often, so signals are handled at once


def check_boards(directories: list[str | Path]) -> list[Board]:
    """The boards in `directories`, refusing none, a folder given twice or a device
    twice (two folders copied from one board would fight over its MQTT topics)."""
    if not directories:
        raise MpyBloxError("vboard fleet: give at least one board folder")
    boards: list[Board] = []
    seen: dict[str, Board] = {}
    for directory in directories:
        board = Board(directory)
        other = seen.get(board.device_id)
        if other is not None:
            what = "given twice" if other.dir == board.dir else f"the same device as {other.dir}"
            raise MpyBloxError(f"{directory}: {what} ({board.device_id})")
        seen[board.device_id] = board
        boards.append(board)
    return boards


def _open_files_for(count: int) -> None:
    # The soft limit is often 1024: raise it to the hard limit when a fleet needs it.
    need = 64 + FILES_PER_BOARD * count
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise MpyBloxError(
            f"{count} boards need about {need} open files; this shell allows {hard} "
            "(ulimit -Hn): run fewer boards per fleet"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def run_fleet(
    directories: list[str | Path],
    *,
    heap: str = micropython.DEFAULT_HEAP,
    executable: str | None = None,
    cut_at: int = 0,
    cut_nvs_at: int = 0,
    once: bool = False,
) -> int:
    """`mpy-blox vboard fleet`: boot every board until signalled (with `once`, until
    each switched itself off); 1 if any bricked. `cut_at` and `cut_nvs_at` are
    `vboard run`'s, for every board: the building's power failing at once."""
    boards = check_boards(directories)
    supervisors = [
        Supervisor(
            b,
            heap=heap,
            executable=executable,
            prefix=b.device_id,
            cut_at=cut_at,
            cut_nvs_at=cut_nvs_at,
            once=once,
        )
        for b in boards
    ]
    _open_files_for(len(boards))
    statuses: dict[str, int] = {}

    def serve(s: Supervisor) -> None:
        try:
            statuses[s.board.device_id] = s.serve()
        except Exception as e:  # the top of a board's thread: the others keep running
            statuses[s.board.device_id] = 1
            print(f"mpy-blox: {s.board.dir}: {type(e).__name__}: {e}", file=sys.stderr)

    with ExitStack() as held, signals_stop(supervisors):
        for b in boards:  # all or nothing: a board running elsewhere stops the fleet here
            held.enter_context(b.lock())
        threads = [
            threading.Thread(target=serve, args=(s,), name=s.board.device_id, daemon=True)
            for s in supervisors
        ]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(JOIN_S)
    return max(statuses.values(), default=0)
