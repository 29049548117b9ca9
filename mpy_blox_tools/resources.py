"""Where the tools find what they put on devices, in a checkout or an installed wheel.

    framework_dir()      the `mpy_blox/` sources the builder compiles
    main_py()            the app runner a deploy copies to the flash root
    recovery_py()        `mpypi_recover.py`, shipped compiled to the flash root
    default_settings()   the `settings.json` a deploy uses when the folder has none
    project_version()    the version the device wheel is stamped with

`main.py`, `mpypi_recover.py` and `settings.json` live at the top of the repository
(DESIGN.md, layout); the tools' wheel carries copies under `mpy_blox_tools/device/`
(pyproject.toml, `to = "mpy_blox_tools/device"`), never at the root of site-packages.
An editable install (`poetry install`) has no such copies: there the files are taken
from the checkout this package sits in. `mpy_blox` is an ordinary package of both
(the publisher imports its wire formats), so it is found wherever it is imported from.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import tomllib
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError

DISTRIBUTION = "mpy-blox-tools"
# Inside the tools' package: what the wheel installs beside the modules.
DEVICE_DIR = "device"
MAIN = "main.py"
RECOVERY = "mpypi_recover.py"
SETTINGS = "settings.json"


def _package_dir() -> Path:
    return Path(str(importlib.resources.files("mpy_blox_tools")))


def checkout() -> Path | None:
    """The repository this package runs from (an editable install), else None."""
    root = _package_dir().parent
    return root if (root / "pyproject.toml").is_file() and (root / MAIN).is_file() else None


def device_file(name: str) -> Path:
    """A top-level device file: the installed copy, else the checkout's."""
    installed = _package_dir() / DEVICE_DIR / name
    if installed.is_file():
        return installed
    root = checkout()
    if root is not None and (root / name).is_file():
        return root / name
    raise MpyBloxError(
        f"{name} is not installed with mpy_blox_tools (expected {installed}): reinstall the tools"
    )


def main_py() -> Path:
    return device_file(MAIN)


def recovery_py() -> Path:
    return device_file(RECOVERY)


def default_settings() -> Path:
    return device_file(SETTINGS)


def settings_or_default(path: str | Path | None) -> Path:
    """`path` when given; else ./settings.json when there is one, else the default."""
    if path is not None:
        return Path(path)
    here = Path(SETTINGS)
    return here if here.is_file() else default_settings()


def framework_dir() -> Path:
    """The `mpy_blox/` source folder (the device framework)."""
    import mpy_blox

    return Path(str(importlib.resources.files(mpy_blox)))


def project_version() -> str:
    """The checkout's pyproject.toml version (it may be newer than the install's), else
    the installed distribution's, which was built from that same field."""
    root = checkout()
    if root is not None:
        pyproject = root / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
            raise MpyBloxError(f"{pyproject}: no [project] version ({e})") from None
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MpyBloxError(
            f"no version: {DISTRIBUTION} is neither installed nor a checkout"
        ) from None
