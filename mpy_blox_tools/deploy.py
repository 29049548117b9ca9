"""Installing Mpy-BLOX on a device over its serial port, with `mpremote`.

The Makefile targets (`make deploy-lib DEVICE=/dev/ttyUSB0`, ...) call this module:

    python -m mpy_blox_tools.deploy lib|app|user|provision|unprovision|purge-lib
        [--device PORT] [--settings F] [--provision F] [--user-main F] [--wheel W]

The framework wheel is installed by the device's own installer
(`mpy_blox.update.install`), run from the working tree mounted on the device
(`mpremote mount`), so a fresh device needs nothing beforehand and a serial
install is verified (SHA256, RECORD) and atomic exactly as an update over MQTT is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError

REPO = Path(__file__).resolve().parent.parent
RECOVERY = "mpypi_recover.py"  # at the flash root, outside /lib: see docs/protocol.md
RECOVERY_MPY = "mpypi_recover.mpy"  # shipped compiled: compiling it at boot costs heap
TIMEOUT = 300


def _port_args(port: str | None) -> list[str]:
    if not port:
        return []  # mpremote connects to the first device it finds
    if "/" in port and not os.path.exists(port):
        raise MpyBloxError(
            f"device {port} not found (is it plugged in? `mpremote devs` lists serial ports)"
        )
    return ["connect", port]


def mpremote(port: str | None, *args: str, timeout: float = TIMEOUT) -> str:
    """Run one mpremote command line against the device; its output, or a clear error."""
    cmd = [sys.executable, "-m", "mpremote", *_port_args(port), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MpyBloxError(
            f"device {port or '(auto)'} did not answer within {timeout:.0f}s"
        ) from None
    out = proc.stdout + proc.stderr
    if proc.returncode == 0 and "Traceback (most recent call last)" not in proc.stdout:
        return proc.stdout
    if "no device found" in out:
        raise MpyBloxError("no device found: plug one in or name it with DEVICE=<port>")
    if "failed to access" in out:
        raise MpyBloxError(f"device {port} is busy (another program, such as a REPL, has it open)")
    if "could not enter raw repl" in out:
        raise MpyBloxError(f"device {port} does not answer like a MicroPython REPL")
    lines = [line for line in out.strip().splitlines() if line.strip()]
    raise MpyBloxError(f"device {port or '(auto)'}: {lines[-1] if lines else 'mpremote failed'}")


# Where deploy-lib puts the installer and the wheel for the time of the install.
WORK = "/_deploy"

INSTALL = """
import gc, os, sys
try:
    os.remove("/mpypi_recover.py")  # an older deploy's source copy would shadow the .mpy
except OSError:
    pass
sys.path.insert(0, {work!r})
gc.collect()
from mpy_blox.update.install import install
entry = {entry!r}
try:
    done = install([entry], lambda e: open({work!r} + "/package.whl", "rb"))
finally:
    sys.path.pop(0)
    for m in [m for m in sys.modules if m.startswith("mpy_blox")]:
        del sys.modules[m]
print("mpy-blox-deploy:", "installed" if done else "unchanged", entry["name"], entry["version"])
"""


def deploy_lib(port: str | None, wheel_path: Path | None = None, platform: str = "esp32") -> str:
    """Build (or take) the framework wheel and install it into /lib; returns what happened."""
    from mpy_blox_tools import build, publish

    source = wheel_path or build.build(platform=platform)
    package = publish.wheel_package(Path(source))
    print(
        f"deploy-lib: installing {package.label} ({len(package.data)} bytes) on "
        f"{port or 'the first device'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="mpy-blox-deploy-") as tmp:
        # The device's own installer, compiled (compiling its source on the device
        # would take more heap than the install), goes to a work folder on the flash
        # with the wheel: `mpremote mount` would cost the install heap it needs.
        work = Path(tmp) / "work"
        for name, data in build.compile_tree(
            build.SOURCE, package.entry["version"], build.PLATFORMS[platform]
        ).items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)
        (work / "package.whl").write_bytes(package.data)
        recovery = Path(tmp) / RECOVERY_MPY
        build.compile_source(REPO / RECOVERY, RECOVERY, build.PLATFORMS[platform], recovery)
        try:
            out = mpremote(
                port,
                "fs",
                "cp",
                str(recovery),
                ":/" + RECOVERY_MPY,
                "+",
                "fs",
                "cp",
                "-r",
                str(work) + "/",
                ":" + WORK,
                "+",
                "exec",
                INSTALL.format(entry=package.entry, work=WORK),
            )
        finally:
            try:
                mpremote(port, "fs", "rm", "-r", ":" + WORK)
            except MpyBloxError:
                pass  # never copied, or the device is gone: nothing to clean
    result = next((line for line in out.splitlines() if line.startswith("mpy-blox-deploy:")), "")
    if not result:
        raise MpyBloxError(f"deploy-lib: the device did not confirm the install:\n{out.strip()}")
    print(result.removeprefix("mpy-blox-deploy: "), flush=True)
    return result.split()[1]


def deploy_app(
    port: str | None,
    settings: Path,
    provision: Path | None,
    user_main: Path | None = None,
    wheel_path: Path | None = None,
    reset: bool = True,
) -> None:
    """deploy-lib, then main.py, settings and provisioning; the device reboots into the app."""
    _check_json(settings)
    deploy_lib(port, wheel_path)
    print(f"deploy-app: main.py and {settings.name} -> device", flush=True)
    args = [
        "fs",
        "cp",
        str(REPO / "main.py"),
        ":/main.py",
        "+",
        "fs",
        "cp",
        str(settings),
        ":/settings.json",
    ]
    if user_main:
        args += ["+", "fs", "cp", str(user_main), ":/user_main.py"]
    if provision and provision.exists():
        _check_json(provision)
        args += ["+", "fs", "cp", str(provision), ":/provision.json"]
        print(f"deploy-app: {provision.name} -> device (ingested into NVS at boot, then deleted)")
    else:
        print("deploy-app: no provision file: the device keeps the secrets it has")
    if reset:
        args += ["+", "reset"]
    mpremote(port, *args)
    if reset:
        print("deploy-app: device reset into the app", flush=True)


def provision(port: str | None, path: Path) -> None:
    if not path.exists():
        raise MpyBloxError(
            f"no {path}: copy examples/provision.json to {path} and fill in your secrets"
        )
    _check_json(path)
    print(f"provision: {path} -> device (ingested into NVS at the next boot, then deleted)")
    mpremote(port, "fs", "cp", str(path), ":/provision.json")


def unprovision(port: str | None) -> None:
    print("unprovision: clearing the secure store in NVS")
    mpremote(
        port,
        "mount",
        str(REPO),
        "exec",
        "from mpy_blox.provision import unprovision\nunprovision()",
    )


PURGE = """
import os
def rm(p):
    for e in os.ilistdir(p):
        q = p + "/" + e[0]
        rm(q) if e[1] == 0x4000 else os.remove(q)
    os.rmdir(p)
try:
    rm("/lib")
except OSError:
    pass
os.mkdir("/lib")
print("mpy-blox-deploy: /lib is empty")
"""


def purge_lib(port: str | None) -> None:
    print("purge-lib: removing everything under /lib")
    mpremote(port, "exec", PURGE)


def deploy_user(port: str | None, path: Path) -> None:
    if not path.exists():
        raise MpyBloxError(f"no {path}: write your `async def user_main()` there first")
    print(f"deploy-user: {path} -> device :/user_main.py")
    mpremote(port, "fs", "cp", str(path), ":/user_main.py")


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        raise MpyBloxError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise MpyBloxError(f"{path}: not valid JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mpy_blox_tools.deploy",
        description="Install Mpy-BLOX on a device over serial.",
    )
    p.add_argument(
        "target", choices=("lib", "app", "user", "provision", "unprovision", "purge-lib")
    )
    p.add_argument(
        "--device",
        default=os.environ.get("DEVICE") or None,
        help="serial port (default: the first device mpremote finds)",
    )
    p.add_argument("--settings", default="settings.json")
    p.add_argument("--provision", default="provision.json")
    p.add_argument("--user-main", default="user_main.py")
    p.add_argument("--wheel", help="install this wheel instead of building the framework")
    args = p.parse_args(argv)
    port = args.device
    try:
        _port_args(port)  # a wrong port is reported before anything is built
        if args.target == "lib":
            deploy_lib(port, Path(args.wheel) if args.wheel else None)
        elif args.target == "app":
            user_main = Path(args.user_main)
            deploy_app(
                port,
                Path(args.settings),
                Path(args.provision),
                user_main if user_main.exists() else None,
                Path(args.wheel) if args.wheel else None,
            )
        elif args.target == "user":
            deploy_user(port, Path(args.user_main))
        elif args.target == "provision":
            provision(port, Path(args.provision))
        elif args.target == "unprovision":
            unprovision(port)
        else:
            purge_lib(port)
    except MpyBloxError as e:
        print(f"mpy-blox: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
