"""`mpy-blox deploy provision` and `deploy app` put secrets into the secure store over
the serial REPL, so they never exist as a file on the device; `--seq-floor` raises the
device's update seq (the fleet's floor, so an old signed list cannot be replayed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpy_blox_tools import deploy as deploy_mod
from mpy_blox_tools import resources
from mpy_blox_tools.cli import main as cli

SECRETS = {"wlan.psk": 'psk "quoted" \\ Secret-1', "mqtt.password": "pw-Secret-2 ü"}


def deploy(action: str, device: str, *args: str) -> int:
    return cli(["deploy", action, "--device", device, *args])


def stored(port: str) -> dict:
    """The device's secure store, read with the framework's own code over the REPL."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(resources.framework_dir(), Path(tmp) / "mpy_blox")
        out = deploy_mod.mpremote(
            port,
            "mount",
            tmp,
            "exec",
            "import json\nfrom mpy_blox.secure import SecureStore\n"
            "print('STORE', json.dumps(SecureStore().load()))",
        )
    return json.loads(out.split("STORE ", 1)[1].splitlines()[0])


def no_secret_on_flash(board) -> bool:
    image = (board.dir / "flash.img").read_bytes()
    return not any(
        v.encode() in image or json.dumps(v)[1:-1].encode() in image for v in SECRETS.values()
    )


@pytest.fixture
def running(boards):
    b = boards.create()
    rb = boards.start(b)
    rb.wait_for(r"\[vboard\] boot 1")
    return b, rb


def test_deploy_provision_stores_secrets_and_seq_floor_over_the_repl_and_writes_no_file(
    running, tmp_path, capsys
):
    b, rb = running
    p = tmp_path / "provision.json"
    p.write_text(json.dumps(SECRETS))
    assert deploy("provision", rb.serial_port, "--provision", str(p), "--seq-floor", "42") == 0
    out = capsys.readouterr().out
    assert out == (
        f"provision: {p} and seq floor 42 -> device's secure store over the REPL (no file)\n"
    )
    assert stored(rb.serial_port) == SECRETS  # quotes, backslashes, non-ASCII: exact
    # A floor below the device's does not lower it; the store is merged, not replaced.
    assert deploy("provision", rb.serial_port, "--seq-floor", "7") == 0
    assert stored(rb.serial_port) == SECRETS
    rb.stop()
    assert b.ls() == {}  # nothing was ever written to the filesystem
    assert no_secret_on_flash(b)
    assert b.nvs()["mpypi"] == {"seq": ["i32", 42]}


@pytest.mark.parametrize(
    "args, error",
    [
        (("--seq-floor", "-1"), "--seq-floor -1: a seq from 0 to 2147483647"),
        (("--seq-floor", "2147483648"), "--seq-floor 2147483648: a seq from 0 to 2147483647"),
    ],
)
def test_a_bad_seq_floor_is_one_line_and_reaches_no_device(running, tmp_path, capsys, args, error):
    b, rb = running
    assert deploy("provision", rb.serial_port, *args) == 1
    captured = capsys.readouterr()
    assert captured.err == f"mpy-blox: {error}\n" and captured.out == ""
    rb.stop()
    assert "mpypi" not in b.nvs() and "mpy_blox" not in b.nvs()


def test_a_provision_json_the_device_refuses_is_one_line_and_changes_nothing(
    running, tmp_path, capsys
):
    b, rb = running
    p = tmp_path / "provision.json"
    p.write_text(json.dumps({"wlan.psk": "x", "update.seq": "seven"}))
    assert deploy("provision", rb.serial_port, "--provision", str(p)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "update.seq must be a whole number" in err, err
    rb.stop()
    assert b.nvs() == {}


def test_vboard_create_app_provisions_over_the_serial_port_with_a_seq_floor(
    tmp_path, broker, capsys
):
    from mpy_blox_tools.vboard.board import Board

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"mqtt": {"server": broker.host, "port": broker.port}}))
    p = tmp_path / "provision.json"
    p.write_text(json.dumps(SECRETS))
    d = tmp_path / "board"
    args = ["vboard", "create", str(d), "--app", "--settings", str(settings)]
    assert cli([*args, "--provision", str(p), "--seq-floor", "9"]) == 0
    out = capsys.readouterr().out
    assert "secure store over the REPL (no file)" in out
    b = Board(d)
    assert "provision.json" not in b.ls()
    assert no_secret_on_flash(b)
    assert b.nvs()["mpypi"] == {"seq": ["i32", 9]} and "secure" in b.nvs()["mpy_blox"]
    assert cli(["vboard", "create", str(tmp_path / "b2"), "--seq-floor", "9"]) == 1
    assert "--seq-floor goes with --app" in capsys.readouterr().err


def test_make_passes_seq_floor_to_provision_and_deploy_app():
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    for target in ("provision", "deploy-app"):
        out = subprocess.run(
            ["make", "-n", "--no-print-directory", target, "DEVICE=COM4", "SEQ_FLOOR=42"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "--device COM4" in out and "--seq-floor 42" in out, out
        without = subprocess.run(
            ["make", "-n", "--no-print-directory", target, "DEVICE=COM4"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "--seq-floor" not in without
