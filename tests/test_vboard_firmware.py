"""The virtual board's firmware: partitions, esp32.Partition's OTA API, the emulated
bootloader's rollback, and the firmware image formats (issue 11, the foundation)."""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
from pathlib import Path

import pytest

from mpy_blox_tools import micropython
from mpy_blox_tools.cli import main as cli
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.firmware import parse_image, read_image
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.image import make_image
from mpy_blox_tools.vboard.process import RunningBoard

# One main.py for every scenario: boot N does plan.txt's Nth action (the step is
# counted in NVS, which a power cut in the flash does not touch). Actions:
# flash:FILE (stream FILE into the next app partition, set_boot, reset), confirm,
# confirm-reset, reset (without confirming), soft (a soft reset), idle.
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
if action == "soft":
    machine.soft_reset()
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
    assert board.otadata()[0] == {"seq": 1, "state": "valid", "written": True}
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


def test_a_board_with_ota_partitions_leaves_its_code_the_same_heap(boards, lane):
    # The OTA half of the emulation is given on top of --heap (supervisor.OTA_HEAP):
    # the board's code finds what it finds on a board without it.
    main = "import gc\ngc.collect()\nprint('free', gc.mem_free())\n"
    free = {}
    for flash in ("2M", "4M"):
        board = boards.create(flash_size=flash, lane=lane, files={"main.py": main})
        rb = boards.start(board, heap="100K", lane=lane)
        free[flash] = int(rb.wait_for(r"free (\d+)").group(1))
        rb.stop()
    assert abs(free["4M"] - free["2M"]) < 512, free
    assert free["4M"] > 96_000, free  # about 97.5 KB at --heap 100K (docs/vboard.md)


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
    # A soft reset restarts the interpreter, not the chip: the trial goes on; the
    # hard reset after it, unconfirmed, rolls back.
    new = make_image(variant("v2"), "v2")
    board = plan_board(
        boards,
        ["flash:new.bin", "soft", "reset", "flash:new.bin", "confirm-reset", "idle"],
        {"new.bin": new},
    )
    rb = boards.start(board)
    rb.wait_for("IDLE", timeout=60)
    out = rb.console()
    labels = [label for label, _ in steps(rb)]
    assert labels == ["ota_0", "ota_1", "ota_1", "ota_0", "ota_1", "ota_1"], out
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


# -- firmware images ----------------------------------------------------------------


def esp_app(chip_id: int = 0, version: str = "v1.22.2", hash_appended: bool = True) -> bytes:
    """An ESP32 application image as ESP-IDF lays it out (esp_app_format.h): header,
    a DROM segment starting with esp_app_desc_t, a code segment, the checksum at the
    end of the padding to 16 bytes, then the SHA256 of it all."""
    desc = struct.pack("<IIII", 0xABCD5432, 0, 0, 0) + version.encode().ljust(32, b"\0")
    desc += b"micropython".ljust(32, b"\0") + bytes(256 - len(desc) - 32)
    segments = [(0x3F400020, desc), (0x40080000, bytes(range(256)) * 5 + b"code")]
    image = bytearray(
        struct.pack(
            "<BBBBIBBBBHBHH4sB",
            0xE9,
            len(segments),
            2,
            0x20,
            0x40081000,
            0xEE,
            0,
            0,
            0,
            chip_id,
            0,
            0,
            0xFFFF,
            bytes(4),
            1 if hash_appended else 0,
        )
    )
    checksum = 0xEF
    for addr, data in segments:
        image += struct.pack("<II", addr, len(data)) + data
        for b in data:
            checksum ^= b
    image += bytes(15 - len(image) % 16) + bytes([checksum])
    if hash_appended:
        image += hashlib.sha256(image).digest()
    return bytes(image)


def refusal(data: bytes) -> str:
    with pytest.raises(MpyBloxError) as e:
        parse_image(data)
    return str(e.value)


def test_an_esp32_app_image_gives_its_chip_version_size_and_sha256():
    data = esp_app()
    image = parse_image(data)
    assert image.format == "esp32-app" and image.chip == "esp32"
    assert image.version == "v1.22.2"
    assert image.size == len(data) and image.sha256 == hashlib.sha256(data).hexdigest()
    assert parse_image(esp_app(hash_appended=False)).version == "v1.22.2"


@pytest.mark.parametrize(
    "chip_id, chip", [(0, "esp32"), (2, "esp32s2"), (5, "esp32c3"), (9, "esp32s3")]
)
def test_the_chip_comes_from_the_extended_header(chip_id, chip):
    assert parse_image(esp_app(chip_id=chip_id)).chip == chip


def test_bad_images_are_refused_with_the_reason():
    good = esp_app()
    assert "first byte 0x7f" in refusal(b"\x7fELF" + good[4:])
    assert "unknown chip id 0x0003" in refusal(esp_app(chip_id=3))
    assert "truncated" in refusal(good[:-40])
    assert "truncated" in refusal(good[:20])
    corrupt = bytearray(good)
    corrupt[-1] ^= 1
    assert "appended SHA256 does not match" in refusal(bytes(corrupt))
    corrupt = bytearray(esp_app(hash_appended=False))
    corrupt[100] ^= 1
    assert "checksum" in refusal(bytes(corrupt))
    assert "bytes after the image's end" in refusal(good + b"extra")
    assert refusal(b"") == "empty file"


@pytest.mark.parametrize("at", [0x1000, 0x0])
def test_a_full_flash_image_is_named_as_the_mistake_it_is(at):
    # As `esptool write_flash` takes it: bootloader, partition table at flash 0x8000,
    # the app at 0x10000; a file written from 0x1000 (ESP32) or 0x0 (later chips).
    flash = bytearray(b"\xff" * (0x10000 - at)) + esp_app()
    flash[0:24] = esp_app()[:24]  # the bootloader is an image too
    flash[0x8000 - at : 0x8002 - at] = b"\xaa\x50"
    message = refusal(bytes(flash))
    assert "a full flash image" in message and "app-bin" in message, message


def test_a_virtual_board_image_parses_through_the_same_function(tmp_path):
    payload = b"#!/bin/sh\nexit 0\n"
    data = make_image(payload, "1.0-test")
    image = parse_image(data)
    assert (image.format, image.chip, image.version, image.size) == (
        "vboard",
        "esp32",
        "1.0-test",
        len(data),
    )
    assert "truncated" in refusal(data[:-1])
    corrupt = bytearray(data)
    corrupt[-2] ^= 1
    assert "SHA256 does not match" in refusal(bytes(corrupt))


def test_vboard_firmware_makes_an_image_from_an_executable(tmp_path, capsys):
    out = tmp_path / "fw.img"
    exe = micropython.executable()
    assert cli(["vboard", "firmware", exe, "--version", "9.9", "-o", str(out)]) == 0
    image = read_image(out)
    assert (image.format, image.chip, image.version) == ("vboard", "esp32", "9.9")
    assert image.sha256 in capsys.readouterr().out
    s3 = tmp_path / "s3.img"
    assert (
        cli(["vboard", "firmware", exe, "--version", "1", "--chip", "esp32s3", "-o", str(s3)]) == 0
    )
    assert read_image(s3).chip == "esp32s3"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert cli(["vboard", "firmware", str(text), "--version", "1", "-o", str(out)]) == 1
    assert "not an executable" in capsys.readouterr().err
    assert cli(["vboard", "firmware", exe, "--version", "x" * 32, "-o", str(out)]) == 1
    assert "1 to 31 bytes" in capsys.readouterr().err


def test_a_board_whose_image_is_for_another_chip_does_not_boot_it(boards):
    # The bootloader checks the chip: an esp32s3 image in ota_0 is passed over,
    # and with nothing else to boot the board stays off, saying why.
    board = boards.create(flash_size="4M")
    s3 = make_image(variant("s3"), "s3", chip_id=9)
    with open(board.dir / "ota_0.img", "r+b") as f:
        f.write(s3)
    assert cli(["vboard", "run", str(board.dir), "--quiet"]) == 1
    out = board.console_log.read_text()
    assert "ota_0: not bootable (an image for chip id 9, this board is an esp32)" in out, out
    assert "bootloader: no bootable app partition" in out
