"""Installing Mpy-BLOX on a device over its serial port, with `mpremote`.

The Makefile targets (`make deploy-lib DEVICE=/dev/ttyUSB0`, ...) run `mpy-blox deploy
lib|app|user|provision|unprovision|purge-lib`, which calls these functions.

The framework wheel is installed by the device's own installer
(`mpy_blox.update.install`), sent compiled to a work folder on the flash with the
wheel, so a fresh device needs nothing beforehand and a serial install is verified
(SHA256, RECORD) and atomic exactly as an update over MQTT is.

`mpremote` is the one installed with the tools, or the command named by
$MPY_BLOX_MPREMOTE: under WSL2, which has no serial ports, the Windows `mpremote.exe`
with `--device COM4`. A Windows executable gets the workstation's files by their
Windows paths (`wslpath -w`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mpy_blox_tools import resources
from mpy_blox_tools.errors import MpyBloxError

MPREMOTE_ENV = "MPY_BLOX_MPREMOTE"
RECOVERY = resources.RECOVERY  # at the flash root, outside /lib: see docs/protocol.md
RECOVERY_MPY = "mpypi_recover.mpy"  # shipped compiled: compiling it at boot costs heap
TIMEOUT = 300


def check_port(port: str | None) -> list[str]:
    """mpremote's `connect PORT` arguments; a path that does not exist is an error."""
    if not port:
        return []  # mpremote connects to the first device it finds
    if "/" in port and not os.path.exists(port):
        raise MpyBloxError(
            f"device {port} not found (is it plugged in? `mpremote devs` lists serial ports)"
        )
    return ["connect", port]


def mpremote_command() -> list[str]:
    """$MPY_BLOX_MPREMOTE (a path or a name on PATH), else the tools' own mpremote."""
    named = os.environ.get(MPREMOTE_ENV, "").strip()
    if not named:
        return [sys.executable, "-m", "mpremote"]
    found = shutil.which(named)
    if not found:
        raise MpyBloxError(f"{MPREMOTE_ENV}={named}: no such program")
    return [found]


def local_path(path: str | Path, folder: bool = False) -> str:
    """A workstation path as the mpremote that runs sees it: a Windows program
    (WSL2's `mpremote.exe`) gets the Windows path of a WSL2 file. `folder` ends it
    with a separator (`fs cp -r FOLDER/ :DEST` copies what is inside)."""
    command = mpremote_command()
    if not command[0].lower().endswith(".exe"):
        return str(path) + ("/" if folder else "")
    try:
        proc = subprocess.run(
            ["wslpath", "-w", str(Path(path).resolve())],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise MpyBloxError(f"{path}: no Windows path for {command[0]} (wslpath: {e})") from None
    return proc.stdout.strip() + ("\\" if folder else "")


def mpremote(port: str | None, *args: str, timeout: float = TIMEOUT) -> str:
    """Run one mpremote command line against the device; its output, or a clear error."""
    cmd = [*mpremote_command(), *check_port(port), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MpyBloxError(
            f"device {port or '(auto)'} did not answer within {timeout:.0f}s"
        ) from None
    except OSError as e:
        raise MpyBloxError(f"cannot run {cmd[0]}: {e.strerror}") from None
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
    if done:
        # Over USB, by the owner: not on trial (docs/protocol.md, "The trial").
        # A trial would roll a first deploy back to no framework at all.
        import mpypi_recover

        mpypi_recover.confirm()
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
        build.compile_source(
            resources.recovery_py(), RECOVERY, build.PLATFORMS[platform], recovery
        )
        try:
            out = mpremote(
                port,
                "fs",
                "cp",
                local_path(recovery),
                ":/" + RECOVERY_MPY,
                "+",
                "fs",
                "cp",
                "-r",
                local_path(work, folder=True),
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
    seq_floor: int | None = None,
) -> None:
    """deploy-lib, then main.py, settings and provisioning; the device reboots into the app."""
    _check_json(settings)
    given = provision if provision and provision.exists() else None
    values = provision_values(given, seq_floor) if given or seq_floor is not None else None
    deploy_lib(port, wheel_path)
    print(f"deploy-app: main.py and {settings.name} -> device", flush=True)
    args = [
        "fs",
        "cp",
        local_path(resources.main_py()),
        ":/main.py",
        "+",
        "fs",
        "cp",
        local_path(settings),
        ":/settings.json",
    ]
    if user_main:
        args += ["+", "fs", "cp", local_path(user_main), ":/user_main.py"]
    mpremote(port, *args)
    if values is not None:
        print("deploy-app: " + _provision_line(given, seq_floor), flush=True)
        provision_device(port, values)
    else:
        print("deploy-app: no provision file: the device keeps the secrets it has")
    if reset:
        mpremote(port, "reset")
        print("deploy-app: device reset into the app", flush=True)


SEQ_KEY = "update.seq"  # mpy_blox.provision.SEQ: the seq floor, raised into NVS
SEQ_MAX = 0x7FFFFFFF  # an NVS i32
PROVISION = """
from mpy_blox.provision import provision_text
print("mpy-blox-deploy:", provision_text({text!r}))
"""


def provision_values(path: Path | None, seq_floor: int | None = None) -> dict:
    """The provision dict for a device: `path`'s JSON object, with `seq_floor` as its
    "update.seq" (it wins over the file's). Refused before anything reaches a device."""
    values: dict = {}
    if path is not None and (path.exists() or seq_floor is None):
        if not path.exists():
            raise MpyBloxError(
                f"no {path}: copy examples/provision.json to {path} and fill in your secrets"
            )
        _check_json(path)
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise MpyBloxError(f"{path}: not a JSON object")
    if seq_floor is not None:
        if not 0 <= seq_floor <= SEQ_MAX:
            raise MpyBloxError(f"--seq-floor {seq_floor}: a seq from 0 to {SEQ_MAX}")
        values[SEQ_KEY] = seq_floor
    return values


def provision_device(port: str | None, values: dict) -> str:
    """Merge `values` into the device's secure store (and seq floor) over the REPL,
    with the framework's own code (mpy_blox.provision.apply, as for a provision.json
    file): the secrets travel as an escaped literal and never become a file on it."""
    text = json.dumps(values)  # ASCII: every other character escaped
    with tempfile.TemporaryDirectory(prefix="mpy-blox-deploy-") as tmp:
        shutil.copytree(
            resources.framework_dir(),
            Path(tmp) / "mpy_blox",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        out = mpremote(port, "mount", local_path(tmp), "exec", PROVISION.format(text=text))
    results = [line for line in out.splitlines() if line.startswith("mpy-blox-deploy: ")]
    result = results[-1].removeprefix("mpy-blox-deploy: ") if results else "no answer"
    if not result.startswith("provisioned"):
        raise MpyBloxError(f"device {port or '(auto)'}: provisioning {result}")
    return result


def provision(port: str | None, path: Path, seq_floor: int | None = None) -> None:
    """Put a provision.json's values (and a seq floor) into the device's secure store."""
    values = provision_values(path, seq_floor)
    print("provision: " + _provision_line(path if path.exists() else None, seq_floor))
    provision_device(port, values)


def _provision_line(path: Path | None, seq_floor: int | None) -> str:
    what = [f"{path}" if path else "", f"seq floor {seq_floor}" if seq_floor is not None else ""]
    return " and ".join(w for w in what if w) + " -> device's secure store over the REPL (no file)"


def unprovision(port: str | None) -> None:
    """Clear the device's secure store (NVS), with the framework's own code."""
    print("unprovision: clearing the secure store in NVS")
    # The framework's own code, from the workstation mounted on the device: only a
    # copy of `mpy_blox/`, not the folder it is installed in (site-packages).
    with tempfile.TemporaryDirectory(prefix="mpy-blox-deploy-") as tmp:
        shutil.copytree(
            resources.framework_dir(),
            Path(tmp) / "mpy_blox",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        mpremote(
            port,
            "mount",
            local_path(tmp),
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
    """Remove everything under /lib."""
    print("purge-lib: removing everything under /lib")
    mpremote(port, "exec", PURGE)


def deploy_user(port: str | None, path: Path) -> None:
    """Copy a user_main.py to the device's root."""
    if not path.exists():
        raise MpyBloxError(f"no {path}: write your `async def user_main()` there first")
    print(f"deploy-user: {path} -> device :/user_main.py")
    mpremote(port, "fs", "cp", local_path(path), ":/user_main.py")


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        raise MpyBloxError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise MpyBloxError(f"{path}: not valid JSON ({e})") from None
