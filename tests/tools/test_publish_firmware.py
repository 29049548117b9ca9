"""`mpy-blox publish --firmware FILE` (issue 11): an image checked before anything is
published, its chip, version, size and SHA256 in a list of its own, chunked when large."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from test_publish_chunks import (  # noqa: F401
    KEY,
    _list,
    _publish,
    _reassembled,
    _retained,
    state_dir,
)
from test_vboard_firmware import esp_app

from mpy_blox import topics
from mpy_blox_tools.vboard.image import make_image


def test_an_esp32_app_image_goes_out_alone_with_its_chip_version_and_size(broker, tmp_path):
    data = esp_app(chip_id=9, version="v1.22.2")
    (tmp_path / "fw.app-bin").write_bytes(data)
    assert _publish(broker, "fw1", "--firmware", "fw.app-bin") == 0
    (entry,) = _list(broker, "fw1")
    assert entry == {
        "type": "firmware",
        "chip": "esp32s3",
        "version": "v1.22.2",
        "pkg_sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    assert topics.package_topic(entry) == f"mpypi/packages/firmware/{entry['pkg_sha256']}"
    assert _retained(broker, topics.package_topic(entry))[topics.package_topic(entry)] == data


def test_a_large_image_goes_out_in_chunks(broker, tmp_path, capsys):
    data = make_image(bytes(range(256)) * 1200, "v2")  # 300 KB
    (tmp_path / "fw.img").write_bytes(data)
    assert _publish(broker, "fw2", "--firmware", "fw.img", "--chunk-size", "64K") == 0
    (entry,) = _list(broker, "fw2")
    assert (entry["type"], entry["chip"], entry["version"], entry["chunks"]) == (
        "firmware",
        "esp32",
        "v2",
        5,
    )
    assert _reassembled(_retained(broker, "mpypi/packages/firmware/#"), entry) == data
    assert "package firmware v2: 307276 bytes in 5 chunks" in capsys.readouterr().out


def _refused(broker, capsys, *args: str) -> str:
    """Exit 1, and neither a list nor the image on the broker (the session's broker
    holds other tests' packages: only this image's topic is looked for)."""
    assert _publish(broker, "fw3", *args) == 1
    image = Path(args[args.index("--firmware") + 1])
    topic = "mpypi/channels/fw3"
    if image.exists():
        topic += " mpypi/packages/firmware/" + hashlib.sha256(image.read_bytes()).hexdigest()
    assert _retained(broker, *topic.split()) == {}
    return capsys.readouterr().err


@pytest.mark.parametrize("at", [0x1000, 0x0])
def test_a_full_flash_image_is_refused_as_the_common_mistake(broker, tmp_path, capsys, at):
    flash = bytearray(b"\xff" * (0x10000 - at)) + esp_app()
    flash[0:24] = esp_app()[:24]
    flash[0x8000 - at : 0x8002 - at] = b"\xaa\x50"
    (tmp_path / "flash.bin").write_bytes(flash)
    err = _refused(broker, capsys, "--firmware", "flash.bin")
    assert "flash.bin: a full flash image (bootloader, partition table" in err, err
    assert "app-bin" in err


def test_bad_images_are_refused_before_anything_is_published(broker, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert "notes.txt: not a firmware image: first byte 0x68" in _refused(
        broker, capsys, "--firmware", "notes.txt"
    )
    corrupt = bytearray(esp_app())
    corrupt[-1] ^= 1
    (tmp_path / "corrupt.bin").write_bytes(corrupt)
    assert "appended SHA256 does not match" in _refused(
        broker, capsys, "--firmware", "corrupt.bin"
    )
    # No version a device could report it by.
    (tmp_path / "noversion.bin").write_bytes(esp_app(version=""))
    assert "noversion.bin: the image names no version" in _refused(
        broker, capsys, "--firmware", "noversion.bin"
    )
    (tmp_path / "fw.img").write_bytes(make_image(b"#!/bin/sh\n", "v1 beta"))
    assert "fw.img: bad version: v1 beta" in _refused(broker, capsys, "--firmware", "fw.img")
    assert "missing.bin: no such file" in _refused(broker, capsys, "--firmware", "missing.bin")


def test_an_image_and_src_files_go_out_in_one_list_without_a_framework_build(broker, tmp_path):
    (tmp_path / "fw.img").write_bytes(make_image(b"#!/bin/sh\n", "v1"))
    (tmp_path / "user_main.py").write_text("x = 1\n")
    assert (
        _publish(broker, "fw4", "--firmware", "fw.img", "--extra-src-files", "user_main.py") == 0
    )
    assert [e["type"] for e in _list(broker, "fw4")] == ["firmware", "src"]


def test_a_rollout_of_a_firmware_image_rolls_out_the_image(tmp_path, monkeypatch):
    # `rollout start` takes publish's release flags: --firmware is the image (and
    # the src files beside it), not a framework build (it used to build one).
    from mpy_blox_tools import rollout_cli
    from mpy_blox_tools.cli import main as cli

    image = tmp_path / "fw.img"
    image.write_bytes(make_image(b"#!/bin/sh\n", "v9"))
    (tmp_path / "user_main.py").write_bytes(b"async def user_main():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    started = {}
    monkeypatch.setattr(
        rollout_cli, "start", lambda broker, packages, **kw: started.update(packages=packages) or 0
    )
    argv = ["rollout", "start", "--channel", "fw", "--stages", "1,100%", "--firmware", "fw.img"]
    assert cli([*argv, "--extra-src-files", "user_main.py"]) == 0
    firmware, user = (p.entry for p in started["packages"])
    assert (firmware["type"], firmware["version"]) == ("firmware", "v9")
    assert (user["type"], user["path"]) == ("src", "user_main.py")
