"""The virtual board's firmware: partitions, esp32.Partition's OTA API, the emulated
bootloader's rollback, and the firmware image formats (issue 11, the foundation)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mpy_blox_tools import micropython
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.image import make_image
from mpy_blox_tools.vboard.process import RunningBoard

# One main.py for every scenario: boot N does plan.txt's Nth action (the step is
# counted in NVS, which a power cut in the flash does not touch). Actions:
# flash:FILE (stream FILE into the next app partition, set_boot, reset), confirm,
# confirm-reset, reset (without confirming), idle.
PLAN_MAIN = """
import esp32, machine, sys
P = esp32.Partition
nvs = esp32.NVS("plan")
try:
    step = nvs.get_i32("step")
except OSError:
    step = 0
nvs.set_i32("step", step + 1)
with open("plan.txt") as f:
    plan = f.read().split()
action = plan[step] if step < len(plan) else "idle"
run = P(P.RUNNING)
print("STEP", step, run.info()[4], 64 if sys.maxsize > 1 << 32 else 32, action)
if action.startswith("confirm"):
    P.mark_app_valid_cancel_rollback()
    print("confirmed", run.info()[4])
    action = action[8:]
if action.startswith("flash:"):
    nxt = run.get_next_update()
    buf = bytearray(4096)
    block = 0
    with open(action[6:], "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            for i in range(n, 4096):
                buf[i] = 0xFF
            nxt.writeblocks(block, buf)
            block += 1
    print("written", block, "blocks to", nxt.info()[4])
    nxt.set_boot()
    print("boot set to", nxt.info()[4])
    action = "reset"
if action == "reset":
    machine.reset()
print("IDLE")
"""

STEP = re.compile(r"STEP (\d+) (\w+) (\d+)")


def variant(tag: str, size: int = 0) -> bytes:
    """The default executable with a comment appended: another image that runs.
    (Bytes after an ELF's end or a script's last line change nothing.)"""
    data = Path(micropython.executable()).read_bytes() + f"\n# {tag}\n".encode()
    return data + b"#" * max(0, size - len(data))


def plan_board(boards, plan: list[str], files: dict[str, bytes], **kwargs) -> Board:
    board = boards.create(flash_size="4M", **kwargs)
    board.write("main.py", PLAN_MAIN.encode())
    board.write("plan.txt", " ".join(plan).encode())
    for path, data in files.items():
        board.write(path, data)
    return board


def steps(rb: RunningBoard) -> list[tuple[str, int]]:
    return [(m.group(2), int(m.group(3))) for m in STEP.finditer(rb.console())]


# -- the partition table and esp32.Partition --------------------------------------

PARTITION_API = """
import esp32
P = esp32.Partition
print("apps", [p.info() for p in P.find(P.TYPE_APP)])
print("data", [p.info()[4] for p in P.find(P.TYPE_DATA)])
def err(f):
    try:
        f()
        return "ok"
    except (OSError, ValueError) as e:
        return repr(e.args)
print("ota_1", [p.info()[4] for p in P.find(P.TYPE_APP, 0x11)], err(lambda: P("ota_1")))
run = P(P.RUNNING)
print("running", run.info()[4], "boot", P(P.BOOT).info()[4])
print("label", err(lambda: P("nope")), err(lambda: P(7)))
if not P.find(P.TYPE_DATA, label="otadata"):
    print("next", err(run.get_next_update))
    print("mark", err(P.mark_app_valid_cancel_rollback))
    print("read", err(lambda: run.readblocks(0, bytearray(16))))
else:
    nxt = run.get_next_update()
    print("next", nxt.info()[4], nxt.get_next_update().info()[4], nxt.ioctl(4, 0), nxt.ioctl(5, 0))
    b = bytearray(b"ab" * 2048)
    nxt.writeblocks(3, b)
    nxt.writeblocks(4, b"xyz", 10)
    r = bytearray(6)
    nxt.readblocks(3, r, 4094)
    print("read", bytes(r), end=" ")
    nxt.readblocks(4, r, 8)
    print(bytes(r))
    print("erase", nxt.ioctl(6, 3), end=" ")
    nxt.readblocks(3, r)
    print(bytes(r))
    print("short", err(lambda: nxt.writeblocks(5, b"abc")))
    print("beyond", err(lambda: nxt.writeblocks(nxt.ioctl(4, 0), bytearray(4096))))
    print("set_boot garbage", err(nxt.set_boot), "vfs", err(P("vfs").set_boot))
    print("mark", err(P.mark_app_valid_cancel_rollback))
print("END")
"""


def test_a_4m_board_has_otadata_and_two_app_slots_with_the_esp32_partition_api(boards):
    board = boards.create(flash_size="4M", files={"main.py": PARTITION_API})
    assert board.has_ota
    rb = boards.start(board)
    rb.wait_for("END")
    out = rb.console()
    assert (
        "apps [(0, 16, 65536, 1572864, 'ota_0', False), (0, 17, 1638400, 1572864, 'ota_1', False)]"
        in out
    ), out
    assert "data ['otadata', 'vfs']" in out
    assert "ota_1 ['ota_1'] ok" in out
    assert "running ota_0 boot ota_0" in out
    assert "label (2,) ()" in out  # ENOENT for an unknown label, ValueError for an id
    assert "next ota_1 ota_0 384 4096" in out
    assert "read b'ab\\xff\\xff\\xff\\xff' b'\\xff\\xffxyz\\xff'" in out  # erased, then programmed
    assert "erase 0 b'\\xff\\xff\\xff\\xff\\xff\\xff'" in out
    assert "short (-260, 'ESP_ERR_INVALID_SIZE')" in out  # the simple form erases whole sectors
    assert "beyond (-260, 'ESP_ERR_INVALID_SIZE')" in out
    assert "set_boot garbage (-5379, 'ESP_ERR_OTA_VALIDATE_FAILED')" in out
    assert "vfs (-5379, 'ESP_ERR_OTA_VALIDATE_FAILED')" in out
    # The first boot recorded ota_0 as valid (the bootloader's set_actual_ota_seq).
    assert "mark ok" in out
    rb.stop()
    assert board.otadata()[0] == {"seq": 1, "state": "valid", "valid": True}
    assert board.read_partition("ota_1")[3 * 4096 : 3 * 4096 + 2] == b"\xff\xff"  # erased


def test_a_2m_board_has_a_factory_app_and_no_ota_slot(boards):
    board = boards.create(flash_size="2M", files={"main.py": PARTITION_API})
    assert not board.has_ota
    rb = boards.start(board)
    rb.wait_for("END")
    out = rb.console()
    assert "apps [(0, 0, 65536, 1441792, 'factory', False)]" in out, out
    assert "data ['vfs']" in out
    assert "ota_1 [] (2,)" in out
    assert "running factory boot factory" in out
    assert "next (2,)" in out  # no OTA partition to update
    assert "mark (-261, 'ESP_ERR_NOT_FOUND')" in out  # as MicroPython's docs say
    assert "read (5,)" in out
    assert not (board.dir / "ota_0.img").exists()


# -- booting other firmware, rollback, confirm --------------------------------------


def test_a_board_switches_to_the_32bit_micropython_and_back_over_its_slots(
    boards, lane32, lane64, tmp_path
):
    fw32 = make_image(Path(lane32.executable).read_bytes(), "1.28 32-bit")
    fw64 = make_image(Path(lane64.executable).read_bytes(), "1.29 64-bit")
    board = plan_board(
        boards,
        ["flash:fw32.bin", "confirm-flash:fw64.bin", "confirm-reset", "idle"],
        {"fw32.bin": fw32, "fw64.bin": fw64},
        executable=lane64.executable,
    )
    rb = boards.start(board, heap=lane64.heap)
    rb.wait_for("IDLE", timeout=60)
    assert steps(rb) == [("ota_0", 64), ("ota_1", 32), ("ota_0", 64), ("ota_0", 64)], rb.console()
    assert "bootloader: booting ota_1 (1.28 32-bit, pending-verify)" in rb.console()
    rb.stop()
    assert [e["state"] for e in board.otadata()] == ["valid", "valid"]


def test_an_unconfirmed_image_is_rolled_back_and_a_confirmed_one_sticks(boards):
    new = make_image(variant("v2"), "v2")
    board = plan_board(
        boards,
        ["flash:new.bin", "reset", "flash:new.bin", "confirm-reset", "idle"],
        {"new.bin": new},
    )
    rb = boards.start(board)
    rb.wait_for("IDLE", timeout=60)
    out = rb.console()
    assert [label for label, _ in steps(rb)] == ["ota_0", "ota_1", "ota_0", "ota_1", "ota_1"], out
    assert "ota_1 booted on trial without confirming: aborted (rolled back)" in out
    assert out.count("booting ota_1 (v2, pending-verify)") == 2
    assert "booting ota_1 (v2, valid)" in out  # after the confirm, for good
    rb.stop()
    assert board.otadata()[1]["state"] == "valid"


def test_an_image_that_crashes_at_boot_is_rolled_back_by_the_bootloader(boards):
    crash = make_image(b"#!/bin/sh\necho CRASHING\nexit 3\n", "crash")
    board = plan_board(boards, ["flash:crash.bin", "idle"], {"crash.bin": crash})
    rb = boards.start(board)
    rb.wait_for("IDLE", timeout=60)
    out = rb.console()
    assert "CRASHING" in out and "crashed with status 3" in out, out
    assert "ota_1 booted on trial without confirming: aborted (rolled back)" in out
    assert [label for label, _ in steps(rb)] == ["ota_0", "ota_0"]
    rb.stop()
    assert [e["state"] for e in board.otadata()] == ["valid", "aborted"]


# -- power cuts -------------------------------------------------------------------


def copy_board(board: Board, to: Path) -> Board:
    shutil.copytree(board.dir, to, ignore=shutil.ignore_patterns("run"))
    return Board(to)


def test_a_power_cut_at_any_block_write_of_an_update_leaves_a_bootable_board(boards, tmp_path):
    # Four blocks of image, each erased then programmed, then set_boot's erase and
    # program of an otadata sector: ten block writes, a cut before each of them.
    new = make_image(variant("v2", 3 * 4096), "v2")
    pristine = plan_board(boards, ["flash:new.bin", "idle"], {"new.bin": new})
    whole = copy_board(pristine, tmp_path / "whole")
    rb = RunningBoard(whole, once=True).start()
    assert rb.wait() == 0
    writes = whole.block_writes()
    assert writes == 10, rb.console()
    rb = RunningBoard(whole).start()
    rb.wait_for("IDLE")
    assert steps(rb)[-1][0] == "ota_1"  # uncut, the update boots
    rb.stop()
    for n in range(1, writes + 1):
        board = copy_board(pristine, tmp_path / f"cut{n}")
        cut = RunningBoard(board, cut_at=n, once=True).start()
        assert cut.wait() == 0
        assert f"power-cut at block write {n}" in cut.console()
        rb = RunningBoard(board).start()
        try:
            rb.wait_for("IDLE")
        finally:
            rb.stop()
        # Every cut comes before set_boot's last write: the old firmware boots.
        assert steps(rb) == [("ota_0", steps(rb)[0][1])], (n, rb.console())
        assert "no bootable" not in rb.console()


def test_a_power_cut_while_confirming_boots_the_old_or_the_new_firmware(boards, tmp_path):
    # mark_app_valid_cancel_rollback rewrites the active otadata entry: its sector
    # is erased (write 1), then programmed (write 2). Cut before the erase, the
    # trial was never confirmed: rolled back. Cut between them, the entry is lost,
    # as on the chip: the bootloader boots the other entry's slot, the old one.
    new = make_image(variant("v2"), "v2")
    base = plan_board(boards, ["flash:new.bin", "confirm-reset", "idle"], {"new.bin": new})
    rb = RunningBoard(base, once=True).start()  # boot 0: the update, up to its reset
    assert rb.wait() == 0 and "boot set to ota_1" in rb.console()
    for n, expect in ((1, "ota_0"), (2, "ota_0"), (0, "ota_1")):
        board = copy_board(base, tmp_path / f"confirm{n}")
        trial = RunningBoard(board, cut_at=n, once=True).start()  # boot 1: confirm, reset
        assert trial.wait() == 0
        assert "booting ota_1 (v2, pending-verify)" in trial.console()
        rb = RunningBoard(board).start()  # boot 2: idle
        try:
            rb.wait_for("IDLE")
        finally:
            rb.stop()
        assert steps(rb) == [(expect, steps(rb)[0][1])], (n, rb.console())
