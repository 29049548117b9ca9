"""Virtual boards running in the background: what tests, benchmarks and the demo drive.

`RunningBoard` starts `mpy-blox vboard run DIR` as a child process (the same code
path a user runs), waits for its serial port, follows its console and switches it
off. `RunningFleet` does the same for many boards under one `mpy-blox vboard fleet`
process; each of its boards is followed as a `RunningBoard` that shares it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mpy_blox_tools import micropython
from mpy_blox_tools.child import end_process
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard.board import Board

# The folder mpy_blox_tools is imported from: the supervisor runs the same code as its
# caller, whatever folder the caller is in (a test's chdir, an installed copy).
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _child_env(extra: dict[str, str] | None, executable: str | None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    if executable:
        # `vboard run` is a command line: it takes the executable the way a user's
        # shell gives it one, in the child's environment only.
        env[micropython.ENV_VAR] = executable
    return env


class RunningBoard:
    def __init__(
        self,
        board: Board,
        *,
        heap: str | int = micropython.DEFAULT_HEAP,
        cut_at: int = 0,
        cut_nvs_at: int = 0,
        once: bool = False,
        env: dict[str, str] | None = None,
        executable: str | None = None,
    ) -> None:
        self.board = board
        self.executable = executable  # None: the supervisor's default (micropython.executable)
        self.heap = heap
        self.cut_at = cut_at
        self.cut_nvs_at = cut_nvs_at
        self.once = once
        self.env = env
        self.process: subprocess.Popen | None = None
        self._log_start = 0

    def start(self, timeout: float = 15) -> RunningBoard:
        log = self.board.console_log
        self._log_start = log.stat().st_size if log.exists() else 0
        (self.board.run_dir / "serial").unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "mpy_blox_tools.cli",
            "vboard",
            "run",
            str(self.board.dir),
            "--quiet",
            "--heap",
            str(self.heap),
        ]
        if self.cut_at:
            cmd += ["--cut-at", str(self.cut_at)]
        if self.cut_nvs_at:
            cmd += ["--cut-nvs-at", str(self.cut_nvs_at)]
        if self.once:
            cmd.append("--once")
        self.board.run_dir.mkdir(exist_ok=True)
        errors = self.board.run_dir / "supervisor.err"
        with open(errors, "wb") as err:  # a file, not a pipe: nobody must drain it
            self.process = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=self._child_env(),
            )
        deadline = time.monotonic() + timeout
        while not self.board.serial_port():
            if self.process.poll() is not None:
                err = errors.read_text(errors="replace").strip()
                raise MpyBloxError(f"board {self.board.dir} did not start: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise MpyBloxError(f"board {self.board.dir} did not start in {timeout}s")
            time.sleep(0.01)
        return self

    def _child_env(self) -> dict[str, str]:
        return _child_env(self.env, self.executable)

    @property
    def serial_port(self) -> str:
        return self.board.serial_port() or ""

    def console(self) -> str:
        """What the board printed since this start()."""
        try:
            with open(self.board.console_log, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = 20, count: int = 1) -> re.Match:
        """Wait until `pattern` (a regex) has appeared `count` times on the console."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            matches = list(regex.finditer(self.console()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.process and self.process.poll() is not None:
                raise MpyBloxError(
                    f"board stopped while waiting for {pattern!r}:\n{self.console()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {pattern!r} on the console in {timeout}s:\n{self.console()[-3000:]}"
                )
            time.sleep(0.02)

    def boots(self) -> int:
        return len(re.findall(r"^\[vboard\] boot \d+", self.console(), re.M))

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process:
            end_process(self.process)
        self.process = None

    def __enter__(self) -> RunningBoard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FleetBoard(RunningBoard):
    """One board of a `RunningFleet`: its console and serial port; it starts and stops
    with its fleet."""

    def start(self, timeout: float = 15) -> RunningBoard:
        raise MpyBloxError(f"{self.board.dir}: a fleet's board starts with its fleet")

    def stop(self) -> None:
        raise MpyBloxError(f"{self.board.dir}: a fleet's board stops with its fleet")


class RunningFleet:
    """Boards under one `mpy-blox vboard fleet` process (docs/vboard.md)."""

    def __init__(
        self,
        boards: list[Board],
        *,
        heap: str | int = micropython.DEFAULT_HEAP,
        env: dict[str, str] | None = None,
        executable: str | None = None,
        power: tuple[str, ...] = (),
    ) -> None:
        self.heap = heap
        self.executable = executable
        self.env = env
        self.power = power  # `vboard fleet`'s --cut-at N, --cut-nvs-at N, --once
        self.process: subprocess.Popen | None = None
        self.boards = [FleetBoard(b, heap=heap, executable=executable) for b in boards]
        self.errors = boards[0].run_dir / "fleet.err" if boards else None

    def start(self, timeout: float = 60) -> RunningFleet:
        for fb in self.boards:
            log = fb.board.console_log
            fb._log_start = log.stat().st_size if log.exists() else 0
            (fb.board.run_dir / "serial").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "mpy_blox_tools.cli", "vboard", "fleet"]
        cmd += [str(fb.board.dir) for fb in self.boards] + ["--heap", str(self.heap)]
        cmd += self.power
        env = _child_env(self.env, self.executable)
        self.errors.parent.mkdir(exist_ok=True)
        with open(self.errors, "wb") as err:  # a file, not a pipe: nobody must drain it
            self.process = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env
            )
        for fb in self.boards:
            fb.process = self.process
        deadline = time.monotonic() + timeout
        # Each board's supervisor logs its port once (a bricked board's is gone at once).
        while not all("] board " in fb.console() for fb in self.boards):
            if self.process.poll() is not None:
                err = self.errors.read_text(errors="replace").strip()
                raise MpyBloxError(f"the fleet did not start: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise MpyBloxError(f"the fleet did not start in {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process:
            end_process(self.process)
        self.process = None
        for fb in self.boards:
            fb.process = None

    def __enter__(self) -> RunningFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
