"""Shared fixtures: a real Mosquitto, virtual boards, and MicroPython snippets.

Device code always comes from the working tree (`REPO/mpy_blox`), never from an
installed copy: snippets get REPO on sys.path; boards get the tree copied to /lib.

Two lanes (mpy_blox_tools.micropython): the 64-bit PyPI build every test runs on,
and the 32-bit build named by MPY_BLOX_MICROPYTHON32, with an ESP32's object
sizes. A test that claims a heap figure takes the `lane` fixture, runs once per
lane and reads its heap from the lane; `lane32` alone for what only the 32-bit
lane can say. Without the 32-bit binary those runs are skipped, saying why.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from mpy_blox_tools import build, micropython
from mpy_blox_tools.broker import INSTALL_HINT, Mosquitto, find_mosquitto
from mpy_blox_tools.micropython import Lane
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption(
        "--soak",
        action="store_true",
        help="also run the long exhaustive tests marked soak (make soak)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="exhaustive variant: run with make soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (item.rep_call), so fixtures can tell
    at teardown whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


_HEAP_LINES: list[str] = []
HEAP_PROPERTY = "heap figure"


@pytest.fixture
def heap_report(request):
    """report(text): a heap figure the run shows at its end (pytest's summary), per test."""

    def report(text: str) -> None:
        print(text)
        # In the test's report, not a list here: under `-n` the test runs in a worker
        # and the summary is written by the controller, which receives the reports.
        request.node.user_properties.append((HEAP_PROPERTY, text))

    return report


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        # Without the "@group" --dist loadgroup adds to the names of grouped tests.
        name = report.nodeid.split("::")[-1].split("@")[0]
        for key, text in report.user_properties:
            if key == HEAP_PROPERTY:
                _HEAP_LINES.append(f"{name}: {text}")


def pytest_terminal_summary(terminalreporter):
    if _HEAP_LINES:
        terminalreporter.section("heap figures (free heap measured by the boards)")
        for line in _HEAP_LINES:
            terminalreporter.write_line(line)


def pytest_sessionstart(session):
    if not find_mosquitto():
        pytest.exit(INSTALL_HINT, returncode=3)


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Mosquitto:
    """One Mosquitto for the whole session, on a free loopback port."""
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture
def broker_factory(tmp_path_factory):
    """Make brokers of your own (extra config lines: auth, ACL, TLS, keepalive)."""
    made = []

    def make(extra_config: str = "", **kwargs) -> Mosquitto:
        b = Mosquitto(tmp_path_factory.mktemp("mosquitto"), extra_config=extra_config, **kwargs)
        made.append(b)
        return b.start()

    yield make
    for b in made:
        b.stop()


_client_ids = itertools.count()


@pytest.fixture
def mqtt_client(broker):
    """A connected paho client on the session broker (call with another broker if needed)."""
    clients = []

    def connect(target: Mosquitto = broker, **kwargs) -> mqtt.Client:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"pytest-{os.getpid()}-{next(_client_ids)}",
            **kwargs,
        )
        c.connect(target.host, target.port)
        c.loop_start()
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.loop_stop()
        c.disconnect()


NO_LANE32 = (
    f"no 32-bit micropython: set {micropython.ENV_VAR_32} to one (docs/runtime.md, "
    "'The 32-bit lane')"
)


@pytest.fixture(scope="session")
def lane32() -> Lane:
    """The 32-bit lane: an ESP32's word size and heap figures (skips without its binary)."""
    lane = micropython.lane32()
    if lane is None:
        pytest.skip(NO_LANE32)
    return lane


@pytest.fixture(scope="session")
def lane64() -> Lane:
    """The 64-bit lane: the default executable, the heap figures derived for it."""
    return micropython.lane64()


@pytest.fixture(params=["64-bit", "32-bit"])
def lane(request) -> Lane:
    """Each lane in turn (test ids end in [64-bit] and [32-bit])."""
    return request.getfixturevalue("lane32" if request.param == "32-bit" else "lane64")


@pytest.fixture(scope="session")
def board_lane() -> Lane:
    """The lane fleets and the demo use: 32-bit when its binary is there, else 64-bit."""
    return micropython.board_lane()


@pytest.fixture
def run_mpy():
    """Run a device snippet on MicroPython (working-tree mpy_blox importable)."""

    def run(
        code: str,
        heap: str | int = "100K",
        timeout: float = 60,
        check: bool = True,
        env: dict[str, str] | None = None,
        lane: Lane | None = None,
    ) -> str:
        proc = micropython.run_snippet(
            code,
            heap=heap,
            path=[str(REPO)],
            timeout=timeout,
            env=env,
            executable=lane.executable if lane else None,
        )
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        if check and proc.returncode:
            raise AssertionError(f"micropython exited {proc.returncode}:\n{out}")
        return out

    return run


@pytest.fixture(scope="session")
def full_mpy(tmp_path_factory) -> Path:
    """All of mpy_blox compiled, as the framework wheel installs it (mpypi_recover.mpy
    in the parent folder)."""
    return build.compile_framework(tmp_path_factory.mktemp("full-mpy"))


@pytest.fixture(scope="session")
def runtime_src(tmp_path_factory) -> Path:
    """mpy_blox without the update agent, as sources: the runtime's own tests need no
    agent."""
    dest = tmp_path_factory.mktemp("runtime-src") / "mpy_blox"
    shutil.copytree(
        REPO / "mpy_blox", dest, ignore=shutil.ignore_patterns("update", "__pycache__")
    )
    return dest


@pytest.fixture(scope="session")
def runtime_mpy(runtime_src, tmp_path_factory) -> Path:
    """runtime_src compiled, as a device runs it: compiling the framework on a board
    costs more heap than the framework itself (docs/runtime.md)."""
    return build.compile_framework(tmp_path_factory.mktemp("runtime-mpy"), runtime_src)


BOARD_CONSOLE_TAIL = 6000


@pytest.fixture
def boards(tmp_path, request):
    """Factory of virtual boards in tmp_path; every started board is switched off after.
    When the test failed, each board's console (its end) is printed: a flaky failure in
    CI is then explained by what the board said, not only by what the test saw."""
    running: list[RunningBoard] = []
    counter = itertools.count()

    class Factory:
        def create(
            self,
            *,
            framework: bool = False,
            files: dict[str, str | bytes] | None = None,
            lane: Lane | None = None,
            **kwargs,
        ) -> Board:
            """A board; from flash_size="4M" up its firmware (ota_0) is `lane`'s."""
            if lane is not None:
                kwargs["executable"] = lane.executable
            board = Board.create(tmp_path / f"board{next(counter)}", **kwargs)
            if framework:
                board.put_tree(REPO / "mpy_blox", "lib/mpy_blox")
            for path, content in (files or {}).items():
                board.write(path, content.encode() if isinstance(content, str) else content)
            return board

        def start(self, board: Board, *, lane: Lane | None = None, **kwargs) -> RunningBoard:
            """Boot `board` (on `lane`'s executable when given; the heap is still yours)."""
            if lane is not None:
                kwargs["executable"] = lane.executable
                if board.has_ota and not _runs_on(board, lane):
                    # A board with OTA partitions boots its own firmware, not the lane's.
                    pytest.fail(f"{board.dir} has OTA partitions: create it with lane=")
            rb = RunningBoard(board, **kwargs)
            running.append(rb)
            return rb.start()

    yield Factory()
    failed = getattr(request.node, "rep_call", None)
    for rb in running:
        rb.stop()
        if failed is not None and failed.failed:
            print(f"--- console of {rb.board.dir} (last {BOARD_CONSOLE_TAIL} chars) ---")
            print(rb.console()[-BOARD_CONSOLE_TAIL:])


@pytest.fixture
def sntp():
    """Start SNTP responders on 127.0.0.1 (tests/sntp_server.py): sntp(mode) -> Responder."""
    from sntp_server import Responder

    made: list[Responder] = []

    def make(mode: str = "good") -> Responder:
        r = Responder(mode)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _runs_on(board: Board, lane: Lane) -> bool:
    """Is the firmware in the board's ota_0 (its factory image) `lane`'s executable?"""
    from mpy_blox_tools.vboard import image

    head = board.read_partition("ota_0")[: image.HEADER_SIZE]
    digest = image.unpack_header(head)[3]
    return digest == hashlib.sha256(Path(lane.executable).read_bytes()).digest()


def settings_for(broker: Mosquitto, **extra) -> str:
    """A settings.json text pointing a board at `broker`; NTP off unless `ntp=` says
    (a test must not ask pool.ntp.org: tests/sntp_server.py is the tests' server)."""
    from sntp_server import NO_NTP

    settings = {"mqtt": {"server": broker.host, "port": broker.port}, **NO_NTP, **extra}
    return json.dumps(settings)
