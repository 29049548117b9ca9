"""The Makefile's device targets over mpremote, against a running virtual board."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from mpy_blox_tools import build

REPO = Path(__file__).resolve().parents[2]


def make(target: str, device: str, **variables: str) -> subprocess.CompletedProcess:
    args = ["make", "--no-print-directory", target, f"DEVICE={device}"]
    args += [f"{k.upper()}={v}" for k, v in variables.items()]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture
def board(boards, lane):
    """A running board on each lane: the serial port works on either binary."""
    b = boards.create()
    rb = boards.start(b, lane=lane)
    rb.wait_for(r"\[vboard\] boot 1")
    return b, rb


def _lib_files(rb) -> dict[str, str]:
    out = subprocess.run(
        [
            ".venv/bin/mpremote",
            "connect",
            rb.serial_port,
            "exec",
            """
import os, hashlib, binascii
def walk(p):
    for e in os.ilistdir(p):
        q = p + "/" + e[0]
        if e[1] == 0x4000:
            walk(q)
        else:
            h = hashlib.sha256()
            with open(q, "rb") as f:
                h.update(f.read())
            print(q, binascii.hexlify(h.digest()).decode())
walk("/lib")
""",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return dict(line.split() for line in out.stdout.splitlines() if line.startswith("/lib"))


def _wheel(tmp_path: Path, version: str, extra_module: bool) -> Path:
    src = tmp_path / f"src-{version}" / "mpy_blox"
    src.parent.mkdir()
    import shutil

    shutil.copytree(REPO / "mpy_blox", src, ignore=shutil.ignore_patterns("__pycache__"))
    if extra_module:
        (src / "retired.py").write_text("GONE_IN_THE_NEXT_VERSION = True\n")
    return build.build(out_dir=tmp_path / f"dist-{version}", source_dir=src, version=version)


def test_deploy_lib_installs_then_changes_nothing_then_upgrades_removing_stale_files(
    board, tmp_path
):
    b, rb = board
    v1 = _wheel(tmp_path, "1.0.0", extra_module=True)
    v2 = _wheel(tmp_path, "2.0.0", extra_module=False)
    first = make("deploy-lib", rb.serial_port, wheel=str(v1))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installed mpy-blox 1.0.0" in first.stdout
    files1 = _lib_files(rb)
    assert "/lib/mpy_blox/retired.mpy" in files1
    assert "/lib/mpy_blox-1.0.0.dist-info/RECORD" in files1
    writes = b.block_writes()
    again = make("deploy-lib", rb.serial_port, wheel=str(v1))
    assert again.returncode == 0 and "unchanged mpy-blox 1.0.0" in again.stdout
    assert _lib_files(rb) == files1
    assert b.block_writes() == writes  # not one flash write for an unchanged library
    up = make("deploy-lib", rb.serial_port, wheel=str(v2))
    assert up.returncode == 0 and "installed mpy-blox 2.0.0" in up.stdout, up.stdout + up.stderr
    files2 = _lib_files(rb)
    assert "/lib/mpy_blox/retired.mpy" not in files2
    assert not any("1.0.0.dist-info" in f for f in files2)
    assert "/lib/mpy_blox-2.0.0.dist-info/METADATA" in files2


def test_each_target_prints_one_line_saying_what_it_does(board, tmp_path):
    b, rb = board
    user = tmp_path / "user_main.py"
    user.write_text("async def user_main():\n    print('mine')\n")
    out = make("deploy-user", rb.serial_port, user_main=str(user))
    assert out.returncode == 0 and out.stdout.startswith(f"deploy-user: {user} -> device")
    out = make("purge-lib", rb.serial_port)
    assert (
        out.returncode == 0 and out.stdout.strip() == "purge-lib: removing everything under /lib"
    )
    rb.stop()
    assert b.cat("user_main.py") == user.read_bytes()
    assert b.ls("lib") == {}


def test_purge_lib_empties_lib(board):
    _b, rb = board
    assert make("deploy-lib", rb.serial_port).returncode == 0
    assert _lib_files(rb)
    assert make("purge-lib", rb.serial_port).returncode == 0
    assert _lib_files(rb) == {}


def test_provision_refuses_without_a_file_and_copies_it_otherwise(board, tmp_path):
    b, rb = board
    missing = make("provision", rb.serial_port, provision=str(tmp_path / "nope.json"))
    assert missing.returncode != 0
    assert "no " in missing.stderr and "copy examples/provision.json" in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = make("provision", rb.serial_port, provision=str(bad))
    assert out.returncode != 0 and "not valid JSON" in out.stderr
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"wlan.psk": "secret"}))
    assert make("provision", rb.serial_port, provision=str(good)).returncode == 0
    rb.stop()
    assert json.loads(b.cat("provision.json")) == {"wlan.psk": "secret"}


def test_mounted_repl_imports_from_the_working_tree(board, tmp_path):
    _b, rb = board
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execvp(
            "make", ["make", "--no-print-directory", "mounted-repl", f"DEVICE={rb.serial_port}"]
        )
    seen = b""
    try:
        deadline = time.monotonic() + 60
        sent = False
        while time.monotonic() < deadline and b"tree-ok" not in seen:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
            if not sent and b">>>" in seen:
                os.write(fd, b"import mpy_blox.log, os; print('tree', os.getcwd(), 'ok')\r")
                sent = True
                seen = seen.replace(b">>>", b"")
        assert b"/remote" in seen and b"mounted at /remote" in seen
        assert b"tree-ok" in seen.replace(b"tree /remote ok", b"tree-ok"), seen.decode(
            errors="replace"
        )
    finally:
        os.write(fd, b"\x1d")  # Ctrl-] leaves mpremote's REPL
        time.sleep(0.3)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.parametrize(
    "target", ["deploy-lib", "deploy-app", "provision", "unprovision", "purge-lib", "deploy-user"]
)
def test_a_wrong_device_is_one_clear_error_line(target, tmp_path):
    out = make(
        target,
        "/dev/no-such-port",
        provision=str(REPO / "examples" / "provision.json"),
        user_main=str(REPO / "examples" / "user_main.py"),
    )
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("mpy-blox:")]
    assert errors == [
        "mpy-blox: device /dev/no-such-port not found (is it plugged in? "
        "`mpremote devs` lists serial ports)"
    ]


def test_deploy_app_reboots_a_fresh_board_into_the_app_reporting_its_version(
    boards, broker, tmp_path, lane
):
    from mpy_blox_tools import fleet, mqtt

    b = boards.create()
    rb = boards.start(b, lane=lane)
    rb.wait_for(r"\[vboard\] boot 1")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"mqtt": {"server": broker.host, "port": broker.port}}))
    provision = tmp_path / "provision.json"
    provision.write_text(json.dumps({"update.key": "k" * 32}))
    out = make(
        "deploy-app",
        rb.serial_port,
        settings=str(settings),
        provision=str(provision),
        user_main=str(tmp_path / "none.py"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("deploy-lib: installing mpy-blox")
    assert "deploy-app: device reset into the app" in lines
    rb.wait_for(r"app: booted", timeout=60)
    url = mqtt.BrokerURL(broker.host, broker.port)
    deadline = time.monotonic() + 30
    while True:
        devices = {d.device_id: d for d in fleet.fetch(url)}
        d = devices.get(b.device_id)
        if d and d.framework:
            break
        assert time.monotonic() < deadline, "no info from the board"
        time.sleep(0.2)
    assert d.framework == build.project_version() and d.state == "online"
    rb.stop()
    assert "provision.json" not in b.ls()
