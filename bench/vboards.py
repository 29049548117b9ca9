"""What the fleet benchmarks share: the release they publish, boards copied from a
template and booted under one `vboard fleet`, and the memory of processes as /proc
counts it (not a benchmark: bench/run.py runs bench_*)."""

from __future__ import annotations

import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mpy_blox_tools.vboard.board import Board

MIB = 1024 * 1024


def clone(template: Board, directory: Path, n: int) -> Board:
    """A copy of `template` with device id number `n` (creating 200 boards is slow)."""
    return template.clone(directory, device_id="esp32-%012x" % (0xB0A4D0000000 + n))


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss(pid: int) -> int:
    """Resident set now, in bytes (shared pages counted in full)."""
    return _status_kb(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    """The highest resident set the process has had (VmHWM), in bytes."""
    return _status_kb(pid, "VmHWM") * 1024


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages divided among their sharers, so
    the PSS of N processes adds up to what they hold together."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_s(pid: int) -> float:
    """User and system CPU time the process has used, in seconds (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The direct children of `pid` (a supervisor's board processes)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


# -- a fleet of framework boards on one channel -------------------------------------

REPO = Path(__file__).resolve().parent.parent
USER_MAIN = (
    "import asyncio\n\nasync def user_main():\n"
    "    print('{tag} running')\n    await asyncio.sleep(3600)\n"
)


def deploy_template(
    directory: Path,
    broker,
    channel: str,
    *,
    lane,
    framework_wheel: Path,
    recover_mpy: Path,
    key: str,
    auto_update: bool = False,
) -> Board:
    """A stopped board as `make deploy-lib deploy-app` leaves one: the framework wheel
    under /lib, main.py, settings on `channel` (short trials, NTP off), the HMAC key,
    USER v1."""
    from mpy_blox_tools import wheel

    board = Board.create(directory, executable=lane.executable)
    settings = {
        "mqtt": {"server": broker.host, "port": broker.port, "wait_s": 5},
        "update": {
            "channel": channel,
            "auto_update": auto_update,
            "healthy_after_s": 1,
            "trial_s": 120,
        },
        "app": {"restart_delay_ms": 100},
        # No time server on loopback: on, every board would ask DNS for pool.ntp.org
        # every 10 s, work a fleet bench would count as the update's.
        "ntp": {"enabled": False},
    }
    for name, data in wheel.read_wheel(framework_wheel).items():
        board.write(f"lib/{name}", data)
    for path, data in {
        "main.py": (REPO / "main.py").read_bytes(),
        "mpypi_recover.mpy": recover_mpy.read_bytes(),
        "settings.json": json.dumps(settings).encode(),
        "provision.json": json.dumps({"update.key": key}).encode(),
        "user_main.py": USER_MAIN.format(tag="v1").encode(),
    }.items():
        board.write(path, data)
    return board


def wait_reporting(url, channel: str, count: int, timeout: float) -> None:
    """Until `count` devices' retained info says they are on `channel`."""
    from mpy_blox_tools import fleet

    deadline = time.monotonic() + timeout
    while sum(d.channel == channel for d in fleet.fetch(url)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} devices reported on {channel}")
        time.sleep(0.5)


class PublishCounter:
    """Counts what the workstation's MQTT clients publish, by kind of topic, while in
    its `with` block (wraps mpy_blox_tools.mqtt.connect; the broker sees the same)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.messages: dict[str, int] = {}

    def _count(self, topic: str, payload) -> None:
        kind = topic.split("/")[1] if topic.startswith("mpypi/") else "other"
        if kind == "nodes":
            kind = "cmd"
        self.bytes[kind] = self.bytes.get(kind, 0) + len(payload or b"")
        self.messages[kind] = self.messages.get(kind, 0) + 1

    def __enter__(self) -> PublishCounter:
        from mpy_blox_tools import mqtt

        self._connect = original = mqtt.connect

        def connect(*args, **kwargs):
            client = original(*args, **kwargs)
            publish = client.publish

            def counted(topic, payload=None, *more, **kw):
                self._count(topic, payload)
                return publish(topic, payload, *more, **kw)

            client.publish = counted
            return client

        mqtt.connect = connect
        return self

    def __exit__(self, *exc) -> None:
        from mpy_blox_tools import mqtt

        mqtt.connect = self._connect


def load() -> str:
    """The 1-minute load average (other work on the machine skews the times)."""
    return os.getloadavg()[0].__format__(".2f")


@dataclass(frozen=True)
class Release:
    """What the fleet benches install first (v1) and publish (v2), and the key."""

    key: str
    installed: Path  # the framework wheel the boards start with
    recover: Path  # mpypi_recover.mpy, as deploy-app installs it
    packages: list  # the release: a dev framework wheel and user_main.py v2


def release(workdir: Path) -> Release:
    """Build the boards' framework and the release to publish to them, in `workdir`."""
    from mpy_blox_tools import build, publish

    installed = build.build(out_dir=workdir / "installed")
    release_wheel = build.build(dev=True, out_dir=workdir / "release")
    recover = build.compile_framework(workdir / "compiled").parent / "mpypi_recover.mpy"
    (workdir / "user_main.py").write_text(USER_MAIN.format(tag="v2"))
    packages = [
        publish.wheel_package(release_wheel),
        publish.src_package(workdir / "user_main.py"),
    ]
    return Release(secrets.token_hex(32), installed, recover, packages)


@contextmanager
def booted_fleet(top: Path, size: int, broker, channel: str, rel: Release, lane, **settings):
    """`size` boards cloned from one deployed template under one `vboard fleet`, each
    running v1 and reporting on `channel`: yields (the RunningFleet, seconds to boot,
    the load average just before the boot)."""
    from mpy_blox_tools import mqtt
    from mpy_blox_tools.vboard.process import RunningFleet

    template = deploy_template(
        top / "template",
        broker,
        channel,
        lane=lane,
        framework_wheel=rel.installed,
        recover_mpy=rel.recover,
        key=rel.key,
        **settings,
    )
    boards = [clone(template, top / f"b{i}", size * 1000 + i) for i in range(size)]
    load_before = load()
    booted = time.monotonic()
    with RunningFleet(boards, heap=lane.heap, executable=lane.executable) as fleet:
        for fb in fleet.boards:
            fb.wait_for("v1 running", timeout=60 + size)
        wait_reporting(mqtt.BrokerURL(broker.host, broker.port), channel, size, 60 + size)
        yield fleet, time.monotonic() - booted, load_before


def board_rss(supervisor: int) -> float:
    """The mean RSS of a fleet's board processes (children of its supervisor), bytes."""
    sizes = [rss(p) for p in children(supervisor)]
    return sum(sizes) / len(sizes) if sizes else 0
