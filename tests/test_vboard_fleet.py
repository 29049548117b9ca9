"""`mpy-blox vboard fleet`: many boards under one supervisor process, each as `vboard run`
gives it (its own MicroPython process, serial port, reboots and run/ files)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from mpy_blox_tools.cli import main as cli
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import PACKAGE_ROOT, RunningFleet

MPREMOTE = [sys.executable, "-m", "mpremote"]

# Resets itself once when its flash holds /reset_me; then prints its cause and stays.
# (Its line starts `cause`: the supervisor's boot line says `reset cause 1` first.)
MAIN = """
import machine, os, time
print("cause", machine.reset_cause())
if "reset_me" in os.listdir("/"):
    os.remove("/reset_me")
    machine.reset()
while True:
    time.sleep(0.05)
"""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_fleet_runs_each_board_in_its_own_process_and_a_reset_reboots_only_that_board(
    boards, tmp_path, board_lane
):
    made = [boards.create(files={"main.py": MAIN}) for _ in range(3)]
    made[0].write("reset_me", b"")
    with RunningFleet(made, heap=board_lane.heap, executable=board_lane.executable) as fleet:
        first, *others = fleet.boards
        first.wait_for(r"(?m)^cause 2")  # machine.reset(): HARD_RESET, a new process
        for fb in others:
            fb.wait_for(r"(?m)^cause 1")
        # One supervisor, one MicroPython process per board, one serial port each.
        assert len(_children(fleet.process.pid)) == 3
        ports = [fb.serial_port for fb in fleet.boards]
        assert all(ports) and len(set(ports)) == 3
        assert [fb.boots() for fb in fleet.boards] == [2, 1, 1]
        # Each board's port is its own: mpremote on one leaves the others running.
        proc = subprocess.run(
            [*MPREMOTE, "connect", ports[1], "exec", "import os; print(os.uname().sysname)"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0 and "esp32" in proc.stdout, proc.stdout + proc.stderr
        assert others[1].boots() == 1 and first.boots() == 2
        with pytest.raises(MpyBloxError, match="stops with its fleet"):
            first.stop()


def test_sigterm_switches_every_board_of_a_fleet_off_and_leaves_no_process(boards, board_lane):
    made = [boards.create(files={"main.py": MAIN}) for _ in range(3)]
    fleet = RunningFleet(made, heap=board_lane.heap, executable=board_lane.executable).start()
    try:
        for fb in fleet.boards:
            fb.wait_for(r"(?m)^cause 1")
        children = _children(fleet.process.pid)
        assert len(children) == 3
        fleet.process.send_signal(signal.SIGTERM)
        assert fleet.process.wait(timeout=20) == 0
    finally:
        fleet.stop()
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for board in made:
        assert board.serial_port() is None
        assert not (board.run_dir / "supervisor.pid").exists()
        assert board.console_log.read_text().rstrip().endswith("[vboard] board switched off")


@pytest.mark.parametrize(
    "dirs, message",
    [
        (["b0", "file.py"], "file.py: not a virtual board (no board.json)"),
        (["b0", "b1", "b0"], "b0: given twice (esp32-"),
        (["b0", "copy"], "copy: the same device as "),
        (["b0", "b1", "--heap", "10"], "--heap 10: a board needs at least"),
        (["b0", "running"], "running: the board is running; stop it first"),
    ],
)
def test_a_bad_fleet_is_one_clear_line_and_boots_nothing(
    dirs, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.py").write_text("print('hello')\n")
    for name in ("b0", "b1", "running"):
        Board.create(tmp_path / name).write("main.py", b"print('on')\n")
    shutil.copytree(tmp_path / "b0", tmp_path / "copy")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "run" not in p.parts)
    with Board(tmp_path / "running").lock():  # as a `vboard run` elsewhere holds it
        assert cli(["vboard", "fleet", *dirs]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mpy-blox: ") and message in err and err.count("\n") == 1, err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "run" not in p.parts)
    assert after == before  # no board booted: no console.log anywhere
    assert not any((tmp_path / n / "run" / "serial").exists() for n in ("b0", "b1"))


def test_a_fleet_needs_a_board(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["vboard", "fleet"])
    assert exit_.value.code == 2
    assert "the following arguments are required: DIR" in capsys.readouterr().err


def test_a_clone_is_the_same_board_under_another_id_and_refuses_a_used_folder(boards, tmp_path):
    board = boards.create(files={"main.py": "print('on')\n"})
    copy = board.clone(tmp_path / "copy", device_id="esp32-00000000c10e")
    assert copy.device_id == "esp32-00000000c10e" != board.device_id
    assert not copy.run_dir.exists() and not copy.console_log.exists()
    assert copy.cat("main.py") == b"print('on')\n"
    assert board.clone(tmp_path / "other").device_id not in (board.device_id, copy.device_id)
    with pytest.raises(MpyBloxError, match="not an empty folder"):
        board.clone(tmp_path / "copy")
    with pytest.raises(MpyBloxError, match="esp32-xyz"):
        board.clone(tmp_path / "bad", device_id="esp32-xyz")
    assert not (tmp_path / "bad").exists()
    rb = boards.start(board)
    rb.wait_for("on")
    with pytest.raises(MpyBloxError, match="the board is running; stop it first"):
        board.clone(tmp_path / "live")


def test_a_bricked_board_stops_alone_and_the_fleet_exits_1(boards, board_lane):
    good = boards.create(files={"main.py": MAIN})
    bricked = boards.create(flash_size="4M", lane=board_lane)
    with open(bricked.dir / "ota_0.img", "r+b") as f:
        f.write(b"\xff" * 4096)  # erased: nothing for the bootloader to boot
    fleet = RunningFleet([good, bricked], heap=board_lane.heap, executable=board_lane.executable)
    fleet.start()
    try:
        fleet.boards[1].wait_for("bootloader: no bootable app partition")
        fleet.boards[1].wait_for(r"\[vboard\] board switched off")
        fleet.boards[0].wait_for(r"(?m)^cause 1")
        assert fleet.process.poll() is None and len(_children(fleet.process.pid)) == 1
        fleet.process.send_signal(signal.SIGTERM)
        assert fleet.process.wait(timeout=20) == 1
    finally:
        fleet.stop()


def test_a_fleet_past_the_open_file_limit_says_so_and_boots_nothing(tmp_path):
    made = [Board.create(tmp_path / f"b{n}") for n in range(4)]  # about 112 files
    argv = ["vboard", "fleet", *(str(b.dir) for b in made)]
    proc = subprocess.run(
        [sys.executable, "-m", "mpy_blox_tools.cli", *argv],
        env={**os.environ, "PYTHONPATH": PACKAGE_ROOT},  # this checkout's tools
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)),
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        "mpy-blox: 4 boards need about 112 open files; this shell allows 100 (ulimit -Hn): "
        "run fewer boards per fleet\n"
    )
    assert not any(b.console_log.exists() or b.serial_port() for b in made)


# Writes a file of two blocks at each boot, then says so and stays.
WRITER = """
import time
with open("/data.bin", "wb") as f:
    f.write(b"x" * 8192)
print("written")
while True:
    time.sleep(0.05)
"""


def test_a_fleet_cuts_every_board_s_power_at_its_nth_write_and_once_ends_with_them(
    boards, board_lane
):
    # The building's power failing at once: every board cut at its 2nd block write of
    # the first boot, as `vboard run --cut-at 2` cuts one; --once: no reboot, and the
    # fleet ends when every board is off (0: each stopped as a board does).
    made = [boards.create(files={"main.py": WRITER}) for _ in range(2)]
    power = ("--cut-at", "2", "--once")
    fleet = RunningFleet(made, heap=board_lane.heap, executable=board_lane.executable, power=power)
    fleet.start()
    try:
        assert fleet.process.wait(timeout=60) == 0
    finally:
        fleet.stop()
    for fb, board in zip(fleet.boards, made):
        out = fb.console()
        assert "power-cut at block write 2" in out and "written" not in out, out
        assert out.count("[vboard] boot ") == 1, out  # --once: not booted again
        assert len(board.cat("data.bin")) < 8192  # the write never finished
