# The virtual board's boot ROM: brings the board up as the ESP32 firmware does,
# then runs boot.py and main.py from its flash. The supervisor starts it with
# `micropython -i`, so the REPL follows once main.py returns or is interrupted.
#
# Environment from the supervisor: VBOARD_DIR (the board folder),
# VBOARD_RESET_CAUSE (machine.*_RESET), VBOARD_CUT_AT (power cut at that block
# write; 0 for none), VBOARD_NVS_BASE (NVS writes of the run's earlier boots),
# VBOARD_CUT_NVS_AT (power cut at that NVS write of the run), VBOARD_RAW_REPL
# (set: skip main.py, as after a soft reset from the raw REPL), VBOARD_RUNNING
# (the app partition the bootloader booted, on a board with OTA partitions).
import esp32  # imported now: the host path is gone later
import json
import machine
import network

# This folder is sys.path[0]: these imports load the emulations, which stay in
# sys.modules once the host filesystem is gone.
import os
import sys
import time
import vfs

import _vb_flash
import _vb_host


def _start_board():
    board_dir = os.getenv("VBOARD_DIR")
    with open(board_dir + "/board.json") as f:
        board = json.load(f)
    board["dir"] = board_dir
    run = board_dir + "/run/"
    _vb_host.start(board, open(run + "reason", "wb"))
    cause = int(os.getenv("VBOARD_RESET_CAUSE") or machine.PWRON_RESET)
    machine._start(cause, open(run + "wdt", "wb"))
    # The RTC runs on over a reset, not over a power-on (firmware/time.py).
    keep = cause != machine.PWRON_RESET
    try:
        f = open(run + "clock", "r+b" if keep else "w+b")
    except OSError:  # no clock kept yet
        f, keep = open(run + "clock", "w+b"), False
    time._start(f, keep, board.get("clock") == "host")
    network._start(open(run + "net", "rb"))
    _vb_flash.start(
        open(run + "writes", "wb"),
        int(os.getenv("VBOARD_CUT_AT") or 0),
        lambda n: _vb_host.power_off("power-cut at block write %d" % n),
    )
    esp32._start(
        open(run + "nvs_writes", "wb"),
        int(os.getenv("VBOARD_NVS_BASE") or 0),
        int(os.getenv("VBOARD_CUT_NVS_AT") or 0),
        lambda n: _vb_host.power_off("power-cut at NVS write %d" % n),
    )
    image = _vb_flash.open_image(board)
    # The partition table (bootloader.partition_table); a board made before it
    # had one has its filesystem only.
    table = board.get("partitions") or [["vfs", 1, 0x81, 0x200000, board["flash_size"]]]
    devices = {}
    ota = None
    for label, _, _, _, size in table:
        if label == "otadata" or label.startswith("ota_"):
            f = open(board_dir + "/" + label + ".img", "r+b")
            devices[label] = _vb_flash.Flash(f, board["block_size"], size // board["block_size"])
    if devices:
        import _vb_ota as ota
    vfs.umount("/")  # from here on, only files opened above reach the host
    devices["vfs"] = _vb_flash.mount(board, image, "/")
    esp32._start_partitions(table, devices, os.getenv("VBOARD_RUNNING"), ota)
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]


def _run_file(path):
    # As pyexec_file_if_exists on the ESP32: errors are printed, then the REPL.
    try:
        os.stat(path)
    except OSError:
        return
    try:
        with open(path) as f:
            source = f.read()
        exec(source, globals())
    except SystemExit:
        machine.soft_reset()  # sys.exit() in boot.py/main.py soft-resets the ESP32
    except BaseException as e:
        sys.print_exception(e)


_start_board()
del _start_board
import gc  # noqa: E402

gc.collect()
_run_file("boot.py")
if not os.getenv("VBOARD_RAW_REPL"):  # a soft reset from the raw REPL skips main.py
    _run_file("main.py")
