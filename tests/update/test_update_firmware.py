"""Firmware over the air (issue 11): a firmware image through the same signed lists,
into the next OTA partition, booted on trial, confirmed or rolled back.

Virtual boards with `--flash 4M` (two OTA app partitions, the emulated bootloader),
the compiled framework and a real Mosquitto (docs/protocol.md, "Firmware").
"""

# ruff: noqa: F811  (pytest injects the fixtures imported from test_update_installboot)
from __future__ import annotations

import hashlib
import io
import re
import time
from pathlib import Path

import pytest
from test_update_agent import Watcher
from test_update_installboot import (  # noqa: F401
    HEAP,
    USER_V1,
    app_board,
    channel,
    publish_update,
    wait_info,
)
from test_update_trial import settings, wait_last
from test_vboard_firmware import esp_app
from update_kit import Pkg, clone_board, make_src, make_wheel

from mpy_blox.update import manifest
from mpy_blox_tools import micropython, publish
from mpy_blox_tools.vboard.image import make_image

KEY = "fedcba9876543210" * 4  # test_update_installboot's update.key
SLOT = 1572864  # ota_1 of a 4M board (docs/vboard.md)
USER_V2 = (
    b"import asyncio\nasync def user_main():\n    print('USER v2')\n    await asyncio.sleep(60)\n"
)


def variant(tag: str, size: int = 0) -> bytes:
    """The default executable with a comment appended: another image that runs."""
    data = Path(micropython.executable()).read_bytes() + f"\n# {tag}\n".encode()
    return data + b"#" * max(0, size - len(data))


def firmware(data: bytes, version: str, chip: str = "esp32") -> Pkg:
    entry = manifest.firmware_entry(chip, version, hashlib.sha256(data).hexdigest(), len(data))
    return Pkg(data, entry)


def on_v1(app_board, boards, mqtt_client, broker, channel):
    """A 4M board (ota_0 runs the default executable) running USER v1, watched."""
    board = app_board(settings(broker, channel), flash_size="4M")
    watch = Watcher(mqtt_client(broker), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    return board, watch, rb


def untouched(board) -> bool:
    """ota_1 as created (erased) and otadata naming ota_0 alone."""
    erased = board.read_partition("ota_1")[:8192] == b"\xff" * 8192
    return erased and not board.otadata()[1]["written"]


def refused(board, watch, rb, seq, error):
    """Failed with `error` before or during the download; the old firmware runs on."""
    st = watch.wait_status(state="failed", timeout=60)
    assert st["error"] == error, st
    last = wait_last(watch, "failed")
    assert last["at"] == seq
    rb.wait_for("USER v1", count=2, timeout=30)
    wait_info(watch, firmware={"partition": "ota_0", "version": "factory 64-bit"})


def test_a_firmware_update_boots_the_new_image_on_trial_and_confirms_it(
    app_board, boards, mqtt_client, broker, channel, lane32, tmp_path, monkeypatch
):
    # The 32-bit build's image (518 KB, an ELF) through the real publisher, chunked
    # in 64 KiB: the board leaves the 64-bit build for it and confirms it.
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    wait_info(watch, firmware={"partition": "ota_0", "version": "factory 64-bit"})
    image = tmp_path / "fw32.img"
    image.write_bytes(make_image(Path(lane32.executable).read_bytes(), "1.28-32bit"))
    key = tmp_path / "update.key"
    key.write_text(KEY)
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    out = io.StringIO()
    done = publish.release(
        broker=f"mqtt://{broker.host}:{broker.port}",
        channel=channel,
        firmware=image,
        key_file=key,
        chunk_size="64K",
        wait=120,
        out=out,
    )
    assert done.ok, out.getvalue()
    entry = done.published.entries[0]
    assert entry["type"] == "firmware" and entry["chunks"] == 8, entry
    assert (entry["chip"], entry["version"]) == ("esp32", "1.28-32bit")
    assert watch.wait_status(state="ok", timeout=30)["seq"] == done.published.seq
    out = rb.console()
    assert "bootloader: booting ota_1 (1.28-32bit, pending-verify)" in out
    wait_info(watch, firmware={"partition": "ota_1", "version": "1.28-32bit"})
    assert wait_last(watch, "ok")["at"] == done.published.seq
    rb.stop()
    assert [e["state"] for e in board.otadata()] == ["valid", "valid"]
    assert board.read_partition("ota_1")[: image.stat().st_size] == image.read_bytes()
    assert not [p for p in board.ls(".mpypi") if "/dl/" in p]  # the hash list went


def test_an_image_for_another_chip_is_refused_before_the_download(
    app_board, boards, mqtt_client, broker, channel
):
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    s3 = firmware(make_image(variant("s3"), "s3", chip_id=9), "s3", chip="esp32s3")
    publish_update(mqtt_client(), channel, [s3], seq=3)
    refused_before(watch, "firmware for esp32s3: this device is an esp32")
    refused(board, watch, rb, 3, "firmware for esp32s3: this device is an esp32")
    rb.stop()
    assert untouched(board)


def test_an_image_larger_than_the_partition_is_refused_before_the_download(
    app_board, boards, mqtt_client, broker, channel
):
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    big = firmware(make_image(variant("big", SLOT), "big"), "big")
    publish_update(mqtt_client(), channel, [big], seq=3)
    error = f"firmware of {SLOT + 76} bytes: partition ota_1 holds {SLOT}"
    refused_before(watch, error)
    refused(board, watch, rb, 3, error)
    rb.stop()
    assert untouched(board)


@pytest.mark.parametrize(
    "damage, error",
    [
        ("flip", "SHA256 mismatch"),
        ("truncate", "size mismatch: {short} bytes published, {size} listed"),
    ],
)
def test_a_damaged_image_is_refused_and_the_old_firmware_boots(
    damage, error, app_board, boards, mqtt_client, broker, channel
):
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    good = firmware(make_image(variant("v2", 20000), "v2"), "v2")
    bad = bytearray(good.data)
    if damage == "flip":
        bad[10000] ^= 1
    else:
        bad = bad[:-100]
    publish_update(mqtt_client(), channel, [good], seq=3, packages={good.sha: bytes(bad)})
    size = len(good.data)
    refused(board, watch, rb, 3, error.format(short=size - 100, size=size))
    rb.stop()
    assert not board.otadata()[1]["written"]  # set_boot never ran
    assert "booting ota_1" not in rb.console()


def test_an_image_that_crashes_at_boot_is_rolled_back_and_reported(
    app_board, boards, mqtt_client, broker, channel
):
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    crash = firmware(make_image(b"#!/bin/sh\necho CRASHING\nexit 3\n", "crash"), "crash")
    publish_update(mqtt_client(), channel, [crash], seq=3)
    error = "firmware in ota_1 did not confirm: the bootloader booted ota_0 again"
    st = watch.wait_status(state="rolled_back", timeout=60)
    assert st == {"state": "rolled_back", "seq": 3, "error": error}, st
    out = rb.console()
    assert "CRASHING" in out and "ota_1 booted on trial without confirming: aborted" in out
    last = wait_last(watch, "rolled_back")
    assert (last["at"], last["error"]) == (3, error)
    # The rolled-back list is still retained: never tried again.
    rb.wait_for("list seq 3 seen again: already done", timeout=30)
    assert rb.console().count("CRASHING") == 1
    wait_info(watch, firmware={"partition": "ota_0", "version": "factory 64-bit"})
    rb.stop()
    assert [e["state"] for e in board.otadata()] == ["valid", "aborted"]


def test_a_device_without_ota_partitions_refuses_firmware_and_the_packages_beside_it(
    app_board, boards, mqtt_client, broker, channel
):
    # A 2M board: a factory app alone, as a 2 MB ESP32's MicroPython build has. The
    # list's user_main is not installed either: the list is refused whole.
    board = app_board(settings(broker, channel))
    watch = Watcher(mqtt_client(broker), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    assert "firmware" not in watch.info  # no app partition to read a version from
    fw = firmware(make_image(variant("v2"), "v2"), "v2")
    user = make_src("user_main.py", USER_V2)
    publish_update(mqtt_client(), channel, [fw, user], seq=3)
    refused_before(watch, "no OTA partitions: this device cannot take a firmware update")
    rb.wait_for("USER v1", count=2, timeout=30)
    rb.stop()
    assert "firmware" not in wait_last(watch, "failed")
    assert board.cat("user_main.py") == USER_V1


def refused_before(watch, error):
    st = watch.wait_status(state="failed", timeout=60)
    assert st["error"] == error, st
    assert "downloading" not in [s.get("state") for s in watch.statuses]


def test_a_firmware_whose_trial_fails_is_rolled_back_with_the_trial_s_reason(
    app_board, boards, mqtt_client, broker, channel
):
    # The trial's verdict (health() says no): the reset without a confirm is the
    # rollback, and the old image's agent reports the trial's reason.
    sick = USER_V1 + b"async def health():\n    return False\n"
    board = app_board(settings(broker, channel), files={"user_main.py": sick}, flash_size="4M")
    watch = Watcher(mqtt_client(broker), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    fw = firmware(make_image(variant("v2"), "v2"), "v2")
    publish_update(mqtt_client(), channel, [fw], seq=5)
    assert watch.wait_status(state="trial", timeout=60)["seq"] == 5
    st = watch.wait_status(state="rolled_back", timeout=60)
    assert st == {"state": "rolled_back", "seq": 5, "error": "health() returned False"}, st
    assert "bootloader: ota_1 booted on trial without confirming: aborted" in rb.console()
    rb.wait_for("list seq 5 seen again: already done", timeout=30)
    wait_info(watch, firmware={"partition": "ota_0", "version": "factory 64-bit"})
    rb.stop()
    assert [e["state"] for e in board.otadata()] == ["valid", "aborted"]


@pytest.mark.parametrize("with_src", [False, True], ids=["alone", "with-user-main"])
def test_a_chunked_firmware_installs_at_the_32bit_board_heap(
    with_src,
    app_board,
    boards,
    mqtt_client,
    broker,
    channel,
    lane32,
    heap_report,
    tmp_path,
    monkeypatch,
):
    # An ESP32's heap (100K on the 32-bit lane): the install boot streams a 518 KB
    # image in 64 KiB chunks without the install core, and the new image confirms
    # (with a user_main.py of the same list: its journal applied on the new image).
    board = app_board(settings(broker, channel), flash_size="4M", lane=lane32)
    watch = Watcher(mqtt_client(broker), board.device_id)
    rb = boards.start(board, heap=lane32.board_heap, lane=lane32)
    rb.wait_for("USER v1", timeout=30)
    image = tmp_path / "v2.img"
    image.write_bytes(make_image(Path(lane32.executable).read_bytes() + b"\n# v2\n", "32-v2"))
    packages = [publish.firmware_package(image)]
    if with_src:
        (tmp_path / "user_main.py").write_bytes(USER_V2)
        packages.append(publish.src_package(tmp_path / "user_main.py"))
    done = publish_chunked(broker, channel, packages, tmp_path, monkeypatch)
    assert watch.wait_status(state="ok", timeout=60)["seq"] == done.seq
    free = int(rb.wait_for(r"firmware 32-v2 into ota_1; free heap (\d+) bytes").group(1))
    what = "firmware and user_main.py" if with_src else "firmware"
    heap_report(f"32-bit lane, 100K board: {what} install boot free heap {free} bytes")
    wait_info(watch, firmware={"partition": "ota_1", "version": "32-v2"})
    if with_src:
        on_the_last_boot(rb, "USER v2")
    rb.stop()
    assert [e["state"] for e in board.otadata()] == ["valid", "valid"]


def publish_chunked(broker, channel, packages, tmp_path, monkeypatch, chunk_size=65536):
    """Publish `packages` signed on `channel`, in chunks, the publisher's state in tmp_path."""
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    return publish.publish_update(
        publish.mqtt.BrokerURL(broker.host, broker.port),
        packages,
        channel=channel,
        key=KEY.encode(),
        chunk_size=chunk_size,
        log=lambda line: None,
    )


def on_the_last_boot(rb, text: str, timeout: float = 30) -> None:
    """Wait until `text` is on the console since the board's last boot."""
    deadline = time.monotonic() + timeout
    while text not in rb.console().rsplit("[vboard] boot ", 1)[-1]:
        assert time.monotonic() < deadline, f"no {text!r} on the last boot:\n{rb.console()}"
        time.sleep(0.1)


def test_a_power_cut_at_every_block_write_of_the_install_boot_boots_the_old_or_the_new_image(
    app_board, boards, mqtt_client, broker, channel, tmp_path
):
    # The install boot's block writes: each sector of ota_1 erased and programmed,
    # last_update, set_boot's otadata sector (erase, program). A cut before
    # set_boot's last write boots the old image (the install boot again, or the
    # app, which reports the rollback); after it, the new one on trial. Never
    # neither, and the board ends confirmed or rolled back, running its user_main.
    board = app_board(settings(broker, channel), flash_size="4M")
    fw = firmware(make_image(variant("v2", 4096), "v2"), "v2")  # two sectors
    publish_update(mqtt_client(), channel, [fw], seq=3)
    rb = boards.start(board, heap=HEAP, once=True)  # the app takes the list, resets
    assert rb.wait(timeout=60) == 0 and "resetting into the install boot" in rb.console()
    whole = clone_board(board, tmp_path / "whole")
    rb = boards.start(whole, heap=HEAP, once=True)  # the install boot, to its reset
    assert rb.wait(timeout=60) == 0 and "update installed: resetting" in rb.console()
    writes = whole.block_writes()
    assert writes >= 6, rb.console()  # 2 sectors (erase, program), set_boot's 2, ...
    outcomes = set()
    for n in range(1, writes + 1):  # every one of them
        b = clone_board(board, tmp_path / f"cut{n}")
        rb = boards.start(b, heap=HEAP, cut_at=n)
        done = rb.wait_for(r"update confirmed|the update was rolled back", timeout=60)
        on_the_last_boot(rb, "USER v1")
        out = rb.console()
        rb.stop()
        assert f"power-cut at block write {n}" in out and "no bootable" not in out, out
        boots = re.findall(r"bootloader: booting (ota_\d)", out)
        if done.group(0) == "update confirmed":
            assert boots[-1] == "ota_1" and b.otadata()[1]["state"] == "valid", (n, out)
        else:
            assert boots[-1] == "ota_0", (n, out)
        outcomes.add(done.group(0))
    assert outcomes == {"update confirmed", "the update was rolled back"}, writes


@pytest.mark.parametrize("chunk_size", [4096, 5000])
def test_a_chunked_firmware_cut_mid_download_resumes_from_the_partition(
    chunk_size, app_board, boards, mqtt_client, broker, channel, tmp_path, monkeypatch
):
    # About 10 chunks: a power cut half-way through the install boot's writes; the
    # next install boot hashes the chunks already in ota_1 and goes on from there.
    # Chunks that do not start on a 4 KiB sector cannot resume without erasing the
    # bytes before them in it: the download starts over, and still installs.
    board = app_board(settings(broker, channel), flash_size="4M")
    image = tmp_path / "v2.img"
    image.write_bytes(make_image(variant("v2", 10 * 4096 - 100), "v2"))
    publish_chunked(
        broker, channel, [publish.firmware_package(image)], tmp_path, monkeypatch, chunk_size
    )
    rb = boards.start(board, heap=HEAP, once=True)  # the app takes the list, resets
    assert rb.wait(timeout=60) == 0 and "resetting into the install boot" in rb.console()
    whole = clone_board(board, tmp_path / "whole")
    rb = boards.start(whole, heap=HEAP, once=True)
    assert rb.wait(timeout=60) == 0 and "update installed: resetting" in rb.console()
    n = whole.block_writes() // 2
    rb = boards.start(board, heap=HEAP, cut_at=n)
    rb.wait_for("update confirmed", timeout=60)
    out = rb.console()
    rb.stop()
    assert f"power-cut at block write {n}" in out
    resumed = re.search(r"firmware v2: resuming at chunk (\d+), byte", out)
    if chunk_size == 4096:
        assert resumed and 1 <= int(resumed.group(1)) < 10, out
    else:
        assert resumed is None and out.count("firmware v2 into ota_1") == 2, out
    assert board.read_partition("ota_1")[: image.stat().st_size] == image.read_bytes()
    assert [e["state"] for e in board.otadata()] == ["valid", "valid"]


def test_firmware_a_wheel_and_a_user_main_install_together_and_confirm_together(
    app_board, boards, mqtt_client, broker, channel
):
    # The packages' journal is bound to the new image's partition: boot recovery
    # applies it on the new firmware's first boot, and the trial confirms them all.
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    fw = firmware(make_image(variant("v2"), "v2"), "v2")
    lib = make_wheel("demo-pkg", "2.0", {"demo_pkg/__init__.py": b"VERSION = '2.0'\n"})
    user = make_src("user_main.py", USER_V2)
    publish_update(mqtt_client(), channel, [fw, lib, user], seq=3)
    assert watch.wait_status(state="ok", timeout=60)["seq"] == 3
    out = rb.console()
    assert "file operations, applied once ota_1 boots" in out, out
    after = out.split("bootloader: booting ota_1 (v2, pending-verify)")[1]
    assert "finishing an interrupted update" in after and "USER v2" in after
    wait_info(
        watch,
        firmware={"partition": "ota_1", "version": "v2"},
        src={"user_main.py": user.sha},
        packages={"demo_pkg": "2.0"},
    )
    rb.stop()
    assert board.cat("user_main.py") == USER_V2
    assert board.cat("lib/demo_pkg/__init__.py") == b"VERSION = '2.0'\n"
    assert [e["state"] for e in board.otadata()] == ["valid", "valid"]
    assert not [p for p in board.ls(".mpypi") if p.endswith(("journal", "firmware", "applied"))]


def test_an_image_that_crashes_takes_the_user_main_of_its_list_back_with_it(
    app_board, boards, mqtt_client, broker, channel
):
    # Rolled back by the bootloader before its journal was applied: boot recovery on
    # the old image undoes the journal, and the old user_main runs on the old firmware.
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    crash = firmware(make_image(b"#!/bin/sh\necho CRASHING\nexit 3\n", "crash"), "crash")
    user = make_src("user_main.py", USER_V2)
    publish_update(mqtt_client(), channel, [crash, user], seq=3)
    error = "firmware in ota_1 did not confirm: the bootloader booted ota_0 again"
    st = watch.wait_status(state="rolled_back", timeout=60)
    assert st == {"state": "rolled_back", "seq": 3, "error": error}, st
    rb.wait_for("list seq 3 seen again: already done", timeout=30)
    out = rb.console()
    assert "undoing an update whose firmware does not run" in out
    assert "USER v2" not in out
    rb.stop()
    assert board.cat("user_main.py") == USER_V1
    assert not [p for p in board.ls(".mpypi") if p.endswith(("journal", "firmware", "rollback"))]


def test_a_power_cut_while_the_new_image_applies_the_journal_takes_both_back(
    app_board, boards, mqtt_client, broker, channel, tmp_path
):
    # The new image's first boot applies the bound journal; a cut in it is a reset
    # before the confirm: the bootloader boots the old image, whose boot recovery runs
    # the journal (applied in part) backwards. The old user_main runs on the old image.
    board = app_board(settings(broker, channel), flash_size="4M")
    fw = firmware(make_image(variant("v2"), "v2"), "v2")
    publish_update(mqtt_client(), channel, [fw, make_src("user_main.py", USER_V2)], seq=3)
    rb = boards.start(board, heap=HEAP, once=True)  # the app takes the list, resets
    assert rb.wait(timeout=60) == 0 and "resetting into the install boot" in rb.console()
    rb = boards.start(board, heap=HEAP, once=True)  # the install boot, to its reset
    assert rb.wait(timeout=60) == 0 and "applied once ota_1 boots" in rb.console()
    for n in (1, 2, 4):
        b = clone_board(board, tmp_path / f"cut{n}")
        rb = boards.start(b, heap=HEAP, cut_at=n)
        rb.wait_for("the update was rolled back", timeout=60)
        on_the_last_boot(rb, "USER v1")
        out = rb.console()
        rb.stop()
        assert f"power-cut at block write {n}" in out and "USER v2" not in out, (n, out)
        first = out.split("[vboard] board stopped", 1)[0]  # the new image's first boot
        assert "bootloader: booting ota_1 (v2, pending-verify)" in first, out
        assert "finishing an interrupted update" in first, out  # the cut fell in it
        assert "undoing an update whose firmware does not run" in out, (n, out)
        assert b.cat("user_main.py") == USER_V1
        assert [e["state"] for e in b.otadata()] == ["valid", "aborted"]


def test_an_image_the_bootloader_refuses_fails_and_its_journal_is_discarded(
    app_board, boards, mqtt_client, broker, channel
):
    # An ESP32 app image passes the pre-flight (chip esp32, its size) and its hashes,
    # but this board's set_boot validates it as a bootloader would and refuses it:
    # the journal written for the list goes, nothing of it applied, and nothing boots.
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    app = esp_app()
    fw = firmware(app, "v1.22.2")
    publish_update(mqtt_client(), channel, [fw, make_src("user_main.py", USER_V2)], seq=3)
    error = "firmware image refused by the bootloader: ESP_ERR_OTA_VALIDATE_FAILED"
    refused(board, watch, rb, 3, error)
    rb.wait_for("list seq 3 seen again: already done", timeout=30)
    rb.stop()
    assert board.cat("user_main.py") == USER_V1 and "USER v2" not in rb.console()
    assert not board.otadata()[1]["written"]
    assert not [p for p in board.ls(".mpypi") if p.endswith(("journal", "firmware", "rollback"))]


def test_an_install_boot_out_of_heap_tries_a_fresh_heap_then_reports_it(
    app_board, boards, mqtt_client, broker, channel, lane32, tmp_path, monkeypatch
):
    # A heap too small for the install boot's downloads, always: the MemoryError
    # is tried again from a fresh heap (the attempts are counted, the image's
    # chunks resume), and the last attempt reports it; the old image runs on.
    board = app_board(settings(broker, channel), flash_size="4M", lane=lane32)
    watch = Watcher(mqtt_client(broker), board.device_id)
    # 88K: the app boots (21 KB free) and accepts; the install boot has 5 KB.
    rb = boards.start(board, heap="88K", lane=lane32)
    rb.wait_for("USER v1", timeout=30)
    image = tmp_path / "v2.img"
    image.write_bytes(make_image(Path(lane32.executable).read_bytes() + b"\n# v2\n", "32-v2"))
    (tmp_path / "user_main.py").write_bytes(USER_V2)
    packages = [publish.firmware_package(image), publish.src_package(tmp_path / "user_main.py")]
    publish_chunked(broker, channel, packages, tmp_path, monkeypatch)
    failed = watch.wait_status(state="failed", timeout=90)
    assert "MemoryError" in failed["error"], failed  # not "no longer on the broker"
    out = rb.console()
    assert out.count("out of heap: retrying after a reset") == 2, out
    assert "(attempt 3)" in out and "(attempt 4)" not in out, out
    on_the_last_boot(rb, "USER v1")
    rb.stop()
    assert board.otadata()[0]["state"] == "valid"
