"""Running a virtual board: the power supply, the serial cable and the reset line.

The supervisor boots the board (one `micropython` process running the boot ROM),
relays its console between two pseudo-terminals and boots it again whenever it
stops: `machine.reset()`, a soft reset, a crash or an emulated power cut. Only a
signal to the supervisor (SIGTERM, SIGINT, SIGHUP) switches the board off.

Two pseudo-terminals, because a pty has one end per side: the board holds the
slave of the first as its controlling terminal (so Ctrl-C interrupts main.py with
SIGINT, as on hardware); users open the slave of the second (`mpremote connect
<path>`). The supervisor holds both masters and copies bytes between them, and
keeps the user side open so the port outlives every reboot.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import subprocess
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mpy_blox_tools import micropython
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard import bootloader
from mpy_blox_tools.vboard.board import FIRMWARE, Board
from mpy_blox_tools.vboard.watchdog import TICK_S, Watchdog

# machine.reset_cause() values of the ESP32 port, by what stopped the last boot.
PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 2, 3, 4, 5
CAUSES = {
    "reset": HARD_RESET,
    "soft-reset": SOFT_RESET,
    "deepsleep": DEEPSLEEP_RESET,
    "watchdog": WDT_RESET,
}
WATCHDOG_REASON = "watchdog reset"
# A boot loop: this many boots started within FAST_WINDOW_S. The supervisor waits a
# second before the next, so a board that resets at once does not eat a core; an
# update's resets (two or three a second at most, back to back) never reach it.
FAST_REBOOTS = 10
FAST_WINDOW_S = 2.0
# The emulated hardware (machine, esp32, network, os, the flash driver and the
# boot ROM) is Python living in the board's heap, where an ESP32 has C outside it.
# The process gets this much more than --heap so the board's own code finds about
# --heap free, as it would on the hardware, by word size: with it, main.py finds
# 97.5 KB free at --heap 100K on either lane (measured, 1.29 64-bit and 1.28
# 32-bit; the emulation's objects are ~5.5 KB smaller on the 32-bit build). The
# NVS cut points and esp32.Partition added 2.2 KB (64-bit) and 1.3 KB (32-bit),
# machine.WDT 992 and 512 bytes, the whole partition table (find, RUNNING,
# writeblocks' erase, get_next_update) 3776 and 2656 bytes, the clock (firmware/time.py,
# machine.RTC) 2688 and 1200 bytes.
EMULATION_HEAP = {64: 30112, 32: 21008}
# On a board with OTA partitions, the emulation's OTA half (_vb_ota, three open
# partition files and set_boot's buffers) on top of that (measured as above).
OTA_HEAP = {64: 4192, 32: 3120}
# The smallest --heap in which the boot ROM still runs a one-line main.py
# (measured: 12K fails on a 64-bit build, 4K on a 32-bit one). Below it the
# board would print a MemoryError and stop at its REPL.
MIN_HEAP = {64: 16 * 1024, 32: 8 * 1024}
# What the unix port's REPL prints on entering the raw REPL and on leaving it.
RAW_REPL_BANNER = b"raw REPL; CTRL-B to exit"
FRIENDLY_REPL_BANNER = b'Type "help()" for more information.'
SOFT_REBOOT = (
    b"MPY: soft reboot\r\n"  # boots in a row under a second before the supervisor slows down
)
# What the REPL prints when it waits for input: the friendly prompt, the raw
# REPL's after its banner and after each command's result.
PROMPTS = (b"\r\n>>> ", RAW_REPL_BANNER + b"\r\n>", b"\x04>")
# Bytes the user sent after a Ctrl-C (or at a soft reset into the raw REPL) wait
# for the REPL's prompt this long at most, then go to the board as they are.
HOLD_S = 3.0


class Supervisor:
    def __init__(
        self,
        board: Board,
        *,
        heap: str | int = micropython.DEFAULT_HEAP,
        cut_at: int = 0,
        cut_nvs_at: int = 0,
        echo: BinaryIO | None = None,
        once: bool = False,
        executable: str | None = None,
        prefix: str = "",
    ) -> None:
        self.board = board
        self.prefix = prefix  # in a fleet: whose the [vboard] lines on stderr are
        self.executable = executable or micropython.executable()
        # A board with OTA partitions runs the firmware in them (the bootloader
        # picks it at each boot); the executable above is for boards without.
        self.ota = bool(bootloader.slots(board.config))
        self.named = executable is not None or bool(os.environ.get(micropython.ENV_VAR))
        self.firmware: bootloader.Boot | None = None  # what the last bootloader run chose
        self.bricked = False
        self.word_bits = micropython.word_bits(self.executable)
        self.heap = micropython.parse_size(heap)
        least = MIN_HEAP[self.word_bits]
        if self.heap < least:
            raise MpyBloxError(
                f"--heap {heap}: a board needs at least {least // 1024}K to boot "
                f"on this {self.word_bits}-bit MicroPython (an ESP32 has about 100K)"
            )
        self.cut_at = cut_at
        self.cut_nvs_at = cut_nvs_at  # counted over the whole run, not one boot
        self.nvs_writes = 0  # NVS writes of the boots so far (run/nvs_writes)
        self.echo = echo
        self.once = once
        self.boots = 0
        self._stop = False
        # The write end of the select loop's wake-up pipe while it runs; the lock
        # keeps stop() (another thread, a signal) from writing to it as it closes.
        # Reentrant: a signal handler runs stop() in the thread that may hold it.
        self._wake_w: int | None = None
        self._wake_lock = threading.RLock()
        self._child: subprocess.Popen | None = None
        self._raw_repl = False  # is the board in the raw REPL (as mpremote uses it)?
        self._tail = b""  # the last bytes the board printed in this boot
        # The UART's receive FIFO while the REPL is not reading yet (see _from_user):
        # None when bytes go straight through, else the bytes held and until when.
        self._held: bytearray | None = None
        self._hold_until = 0.0

    def log(self, message: str) -> None:
        # Once where the user looks: in the echoed console (stdout) when there is
        # one, else on stderr; always in the console log.
        line = f"[vboard] {message}\n".encode()
        self._console(line)
        if not self.echo:
            who = f" {self.prefix}:" if self.prefix else ""
            sys.stderr.write(f"[vboard]{who} {message}\n")
            sys.stderr.flush()

    def _console(self, data: bytes) -> None:
        self._log_file.write(data)
        self._log_file.flush()
        if self.echo:
            try:
                self.echo.write(data)
                self.echo.flush()
            except (BrokenPipeError, OSError):
                self.echo = None

    def run(self) -> int:
        """Run until signalled (or the first stop with `once`); return an exit status."""
        with signals_stop([self]), self.board.lock():
            return self.serve()

    def serve(self) -> int:
        """Run until `stop()` (or the first stop with `once`); return an exit status.

        The caller holds `board.lock()`. Installs no signal handler, so one process
        can serve many boards, one thread each (vboard/fleet.py)."""
        return self._run_locked()

    def stop(self) -> None:
        """Switch the board off: safe from a signal handler or another thread."""
        self._stop = True
        with self._wake_lock:
            if self._wake_w is None:
                return  # not running: it will not start, or it is stopping already
            try:
                os.write(self._wake_w, b"\0")  # wakes the select loop at once
            except BlockingIOError:
                pass  # woken already

    def _run_locked(self) -> int:
        run = self.board.run_dir
        if not (run / "net").exists():
            self.board.set_network(True)
        self._log_file = open(self.board.console_log, "ab")
        board_master, board_slave = os.openpty()
        user_master, user_slave = os.openpty()
        tty.setraw(user_slave)  # no echo or line editing between the user and the board
        for fd in (board_master, user_master):
            os.set_blocking(fd, False)
        port = os.ttyname(user_slave)
        (run / "serial").write_text(port + "\n")
        (run / "supervisor.pid").write_text(f"{os.getpid()}\n")
        wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.log(f"board {self.board.device_id} serial port: {port}")
        if not self.echo:  # --quiet: scripts still read the port from stdout
            where = f" {self.board.dir}" if self.prefix else ""  # a fleet: which board's
            print(f"serial port: {port}{where}", flush=True)
        status, reason = 0, ""
        cause = PWRON_RESET
        recent: deque[float] = deque(maxlen=FAST_REBOOTS)  # when the last boots started
        try:
            while not self._stop:
                started = time.monotonic()
                recent.append(started)
                status, reason = self._boot(cause, board_master, board_slave, user_master, wake_r)
                if self._stop:
                    break
                cause, message = _classify(reason, status)
                self.log(f"board stopped: {message}")
                if self.once:
                    break
                if cause == SOFT_RESET:
                    # As the ESP32 says it; mpremote waits for this line.
                    self._console(SOFT_REBOOT)
                    _write_all(user_master, SOFT_REBOOT)
                if reason.startswith("power-cut"):
                    self.cut_at = self.cut_nvs_at = 0  # the power comes back for good
                if len(recent) == FAST_REBOOTS and time.monotonic() - recent[0] < FAST_WINDOW_S:
                    _wait_readable(wake_r, 1)  # a boot loop: keep it from eating a core
        finally:
            self._power_off()
            with self._wake_lock:
                wake_w, self._wake_w = self._wake_w, None
            for fd in (board_master, board_slave, user_master, user_slave, wake_r, wake_w):
                os.close(fd)
            for name in ("serial", "supervisor.pid"):
                (run / name).unlink(missing_ok=True)
            self.log("board switched off")
            self._log_file.close()
        if self.bricked:
            return 1
        # With --once: 0 when the board stopped the way a board does (reset, power
        # cut, REPL exit), else MicroPython's own status (a crash of the port).
        if self.once and not (reason or status == 0):
            return status if status > 0 else 128 - status
        return 0

    def _boot(
        self, cause: int, board_master: int, board_slave: int, user_master: int, wake_r: int
    ) -> tuple[int, str]:
        run = self.board.run_dir
        (run / "reason").write_bytes(b"")
        (run / "wdt").write_bytes(b"")  # a reset disarms the watchdog, as on the ESP32
        watchdog = Watchdog(run / "wdt")
        termios.tcflush(board_slave, termios.TCIFLUSH)  # a UART's FIFO is empty after reset
        # Every boot: a board killed in the REPL leaves the tty in its raw mode.
        _set_board_tty(board_slave)
        self.boots += 1
        executable = self._firmware(cause)
        if executable is None:
            self._stop = self.bricked = True  # nothing to boot again
            return 1, "no bootable app partition"
        bits = micropython.word_bits(executable)
        extra = EMULATION_HEAP[bits] + (OTA_HEAP[bits] if self.ota else 0)
        self.log(
            f"boot {self.boots} (reset cause {cause}, heap {self.heap}"
            + (f", power cut at block write {self.cut_at}" if self.cut_at else "")
            + (f", power cut at NVS write {self.cut_nvs_at}" if self.cut_nvs_at else "")
            + ")"
        )
        # A soft reset from the raw REPL comes back to the raw REPL without
        # running main.py, as on the ESP32: that is how mpremote gets a clean board.
        raw = cause == SOFT_RESET and self._raw_repl
        env = {
            **os.environ,
            "VBOARD_DIR": str(self.board.dir),
            "VBOARD_RESET_CAUSE": str(cause),
            "VBOARD_CUT_AT": str(self.cut_at),
            "VBOARD_NVS_BASE": str(self.nvs_writes),
            "VBOARD_CUT_NVS_AT": str(self.cut_nvs_at),
            "VBOARD_RAW_REPL": "1" if raw else "",
            "VBOARD_RUNNING": self.firmware.label if self.ota else "",
        }
        self._child = subprocess.Popen(
            [
                executable,
                "-X",
                f"heapsize={self.heap + extra}",
                "-i",
                str(FIRMWARE / "_vb_rom.py"),
            ],
            stdin=board_slave,
            stdout=board_slave,
            stderr=board_slave,
            cwd=FIRMWARE,
            env=env,
            preexec_fn=_take_terminal,
            close_fds=True,
        )
        self._raw_repl = False
        self._tail = b""
        self._held = None  # a UART's FIFO is empty after reset
        if raw:
            self._hold(b"\x01")  # Ctrl-A, passed on when the REPL shows its prompt
        sel = selectors.DefaultSelector()
        sel.register(board_master, selectors.EVENT_READ, "board")
        sel.register(user_master, selectors.EVENT_READ, "user")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        exited = _exit_fd(self._child.pid)  # readable when the board's process ends
        if exited is not None:
            sel.register(exited, selectors.EVENT_READ, "exited")
        try:
            while self._child.poll() is None and not self._stop:
                for key, _ in sel.select(timeout=self._tick_s(watchdog, exited)):
                    if key.data == "board":
                        self._from_board(board_master, user_master)
                    elif key.data == "user":
                        self._from_user(user_master, board_master)
                    elif key.data == "wake":
                        os.read(wake_r, 512)
                if self._held is not None and time.monotonic() > self._hold_until:
                    self._release(board_master)  # no prompt came: main.py reads them
                if watchdog.expired():
                    self._power_off()
                    (run / "reason").write_text(WATCHDOG_REASON)
                    break
            if self._stop:
                self._power_off()
            self._from_board(board_master, user_master)  # what it said last
        finally:
            sel.close()
            if exited is not None:
                os.close(exited)
        status = self._child.wait()
        self._child = None
        try:  # the next boot counts on from here (the board mirrors its count at once)
            self.nvs_writes = int((run / "nvs_writes").read_text() or self.nvs_writes)
        except (FileNotFoundError, ValueError):
            pass  # the board died before its NVS started: nothing written
        return status, (run / "reason").read_text(errors="replace").strip()

    def _tick_s(self, watchdog: Watchdog, exited: int | None) -> float:
        # How long the select loop may sleep when nothing arrives. Output, input, a
        # stop() and (with a pidfd) the board's exit wake it at once; what it polls is
        # the held input's deadline and the watchdog, whose tick follows its timeout,
        # so a fleet of idle boards does not wake 20 times a second each.
        if self._held is not None or exited is None:
            return TICK_S
        return watchdog.tick_s()

    def _firmware(self, cause: int) -> str | None:
        """The executable this boot runs: the board's firmware if it has OTA
        partitions (None if none boots), else the one the supervisor was given."""
        if not self.ota:
            return self.executable
        # A soft reset restarts the interpreter, not the chip: no bootloader.
        if cause != SOFT_RESET or self.firmware is None:
            try:
                self.firmware = bootloader.select_boot(self.board.dir, self.board.config)
            except MpyBloxError as e:
                self.log(f"bootloader: {e}")
                return None
            fw = self.firmware
            for note in fw.notes:
                self.log(f"bootloader: {note}")
            self.log(f"bootloader: booting {fw.label} ({fw.version}, {fw.state})")
            if self.named and fw.executable.read_bytes() != Path(self.executable).read_bytes():
                self.log(f"this board runs the firmware in {fw.label}, not {self.executable}")
        return str(self.firmware.executable)

    def _from_board(self, board_master: int, user_master: int) -> None:
        while True:
            try:
                data = os.read(board_master, 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._console(data)
            seen = self._tail + data
            raw_at, friendly_at = seen.rfind(RAW_REPL_BANNER), seen.rfind(FRIENDLY_REPL_BANNER)
            if raw_at != friendly_at:  # both -1: no news
                self._raw_repl = raw_at > friendly_at
            self._tail = seen[-64:]
            if self._held is not None and self._tail.endswith(PROMPTS):
                self._release(board_master)
            try:
                os.write(user_master, data)
            except BlockingIOError:
                pass  # nobody reads the port: output is lost, as on a UART with no cable

    # The unix port's REPL of MicroPython 1.28 (the 32-bit lane's build) discards
    # what arrived on its terminal before it starts reading (1.29 keeps it), where
    # an ESP32's UART keeps it in its FIFO. mpremote sends Ctrl-C then at once
    # Ctrl-A: the Ctrl-C interrupts main.py on arrival (a SIGINT, as the
    # ESP32's UART interrupt does), and what follows it is held here until the
    # REPL prints its prompt; the Ctrl-A of a soft reset into the raw REPL too.
    # So the hand-over does not depend on when the REPL starts reading.

    def _from_user(self, user_master: int, board_master: int) -> None:
        try:
            data = os.read(user_master, 65536)
        except (BlockingIOError, OSError):
            return
        if self._held is not None:
            self._held += data
            return
        cut = data.find(b"\x03") + 1
        child = self._child
        at_prompt = self._tail.endswith(PROMPTS)  # the REPL reads a Ctrl-C as a key
        if cut and child is not None and not at_prompt and _interrupt_enabled(child.pid):
            # Interrupts the running program; the Ctrl-C itself is consumed, as an
            # ESP32's UART interrupt consumes it.
            _write_all(board_master, data[: cut - 1])
            try:
                os.kill(child.pid, signal.SIGINT)
            except ProcessLookupError:
                pass  # it just ended: the next boot reads what is held
            self._hold(data[cut:])
        else:
            _write_all(board_master, data)

    def _hold(self, data: bytes) -> None:
        self._held = bytearray(data)
        self._hold_until = time.monotonic() + HOLD_S

    def _release(self, board_master: int) -> None:
        held, self._held = self._held, None
        if held:
            _write_all(board_master, bytes(held))

    def _power_off(self) -> None:
        child = self._child
        if child and child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # the board and anything it spawned
            except ProcessLookupError:
                pass
            child.wait()


@contextmanager
def signals_stop(supervisors: list[Supervisor]) -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP stop `supervisors` while in the block (main thread)."""

    def on_signal(signum, frame) -> None:
        for s in supervisors:
            s.stop()

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _exit_fd(pid: int) -> int | None:
    # A pidfd (Linux 5.3 and later) turns readable when the process ends, so the
    # select loop need not poll for it; elsewhere None, and the loop ticks at TICK_S.
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _wait_readable(fd: int, timeout_s: float) -> None:
    # A sleep that stop() cuts short (it writes to the wake-up pipe).
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        sel.select(timeout_s)


def _set_board_tty(fd: int) -> None:
    # The board's side of the serial line is a UART: every byte is data. Raw, so no
    # echo or line editing, no CR-to-LF (ICRNL), no XON/XOFF (IXON: a 0x13 in
    # mpremote mount's data stopped the board's output for good) and no signal
    # characters (ISIG: a 0x03 killed the board while mount had the interrupt off).
    # The supervisor itself turns a Ctrl-C into SIGINT, only while the board takes it
    # as an interrupt (_interrupt_enabled). No output processing: the unix port's
    # REPL writes CR LF itself, and mpremote matches its "raw REPL; CTRL-B to
    # exit\r\n" byte for byte.
    tty.setraw(fd, termios.TCSANOW)


_SIGINT_BIT = 1 << (signal.SIGINT - 1)


def _interrupt_enabled(pid: int) -> bool:
    """Does the board take a Ctrl-C as an interrupt now? The unix port catches SIGINT
    while code runs with the interrupt character on (`micropython.kbd_intr(3)`, the
    default) and resets it otherwise: at the REPL's prompt, which reads the Ctrl-C as
    a key, and under `kbd_intr(-1)`, which mpremote's `mount` sets while it moves
    binary data (an ESP32 then takes 0x03 as data; a tty's ISIG would have sent a
    SIGINT with the default action and killed the board). Linux says it in
    /proc/PID/status (SigCgt); elsewhere a Ctrl-C always interrupts."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & _SIGINT_BIT)
    except OSError:
        pass
    return True


def _take_terminal() -> None:
    # In the child: a session of its own with the board tty as controlling terminal.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _write_all(dst: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(dst, data)
        except BlockingIOError:
            time.sleep(0.001)  # the board reads slowly: keep the bytes, as flow control would
            continue
        data = data[n:]


def _classify(reason: str, status: int) -> tuple[int, str]:
    if reason:
        word = reason.split()[0]
        return CAUSES.get(word, PWRON_RESET), reason
    if status == 0:
        return SOFT_RESET, "REPL exited (soft reset)"
    return HARD_RESET, f"crashed with status {status}"


def run_board(
    directory: str | Path,
    *,
    heap: str = micropython.DEFAULT_HEAP,
    cut_at: int = 0,
    cut_nvs_at: int = 0,
    once: bool = False,
    quiet: bool = False,
    executable: str | None = None,
) -> int:
    """`mpy-blox vboard run`: boot the board in `directory` until signalled."""
    board = Board(directory)
    if cut_at < 0:
        raise MpyBloxError("--cut-at: a block write number, 1 or more")
    if cut_nvs_at < 0:
        raise MpyBloxError("--cut-nvs-at: an NVS write number, 1 or more")
    echo = None if quiet else sys.stdout.buffer
    return Supervisor(
        board,
        heap=heap,
        cut_at=cut_at,
        cut_nvs_at=cut_nvs_at,
        echo=echo,
        once=once,
        executable=executable,
    ).run()
