"""Our OTA against what users would use instead: mip and the original mpy-blox.

One set of packages (the framework wheel, a library wheel of 20 modules of about
10 KB each, a 1 MiB data file) goes from version 1 to version 2 on the same virtual
board (the lane's board heap, 8M of LittleFS), three ways:

- ours: the signed list and packages published to Mosquitto (64K chunks, the
  publisher's default), the board's app installs them (accept, reset into the
  install boot, download, verify, stage, commit). Timed on the host from the first
  publish to the board's `rebooting` status after `installing` (bench_update's end
  point: the new set committed, the reboot into it not counted).
- mip: `mip.install` from an index the bench generates from the same wheels and
  file (bench/peers_index.py), served by a local HTTP server. Timed on the board
  around the two `mip.install` calls (the framework and library under /lib, the
  data under /data).
- upstream: the original mpy-blox's install (bench/peers_device.py), each package
  one retained MQTT message read whole into RAM. Timed on the board. It needs the
  whole wheel twice in RAM: where the board heap is too small its timed rows run at
  PEERS_UPSTREAM_HEAP (default 4M, an ESP32 with PSRAM) and say so.

Every version-1 file differs from its version-2 file (version 1 of the framework
is built from a copy of the source with one line added to each module), so each
method writes the same files; mip would otherwise skip files whose hash is
unchanged (docs/benchmarks.md).

Each method runs on the loopback and through a shaped link (bench/shaper.py:
PEERS_RATE bytes/s each way, default 1000000, and PEERS_DELAY_MS each way, default
20): every board connection goes through the shaper, which counts the bytes both
ways ("wire KB"; on loopback it only counts). Then, on the loopback: a run with the
heap probe (peers_device.PROBE: the least free heap at a file write, after a
collect) and a run with a power cut at half the block writes of the clean run's
busiest boot, after which the board boots again and the set on its flash is
compared with version 1 and version 2, file by file.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

from appboard import StatusTimeline
from bench_heap import _with_probe
from peers_device import MAIN, MIP, PROBE, UPSTREAM
from peers_index import IndexServer, write_package
from shaper import Shaper, link_from_env
from vboards import USER_MAIN

from mpy_blox_tools import build, micropython, mqtt, publish, wheel
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

LANE = micropython.board_lane()
RATE, DELAY_S = link_from_env("PEERS")
UPSTREAM_HEAP = os.environ.get("PEERS_UPSTREAM_HEAP", "4M")
# A micropython-lib checkout (or its git directory) to take mip and requests from
# when the lane's MicroPython has no frozen mip (the 32-bit lane's build has none).
MICROPYTHON_LIB = os.environ.get("PEERS_MICROPYTHON_LIB", "")
TITLE = (
    f"Ours vs mip vs upstream mpy-blox, {LANE.name}, {LANE.heap} heap; "
    f"shaped: {RATE / 1e6:g} MB/s, {DELAY_S * 1000:g} ms each way"
)
REPO = Path(__file__).resolve().parents[1]
FLASH = "8M"
DATA = "data/blob.bin"
MARCH = build.PLATFORMS["esp32"]
TAG = f"{build.BYTECODE_TAG}-esp32"


class Sets:
    """Version 1 and version 2 of the three packages, and the files each puts on flash."""

    def __init__(self, work: Path) -> None:
        source = work / "v1src" / "mpy_blox"
        shutil.copytree(REPO / "mpy_blox", source, ignore=shutil.ignore_patterns("__pycache__"))
        for py in source.rglob("*.py"):  # every .mpy of version 1 differs from version 2's
            py.write_text(py.read_text() + "\n_PEERS_V1 = 1\n")
        self.fw = [
            build.build(out_dir=work / "fw1", source_dir=source),
            build.build(dev=True, out_dir=work / "fw2"),
        ]
        self.recover = build.compile_framework(work / "compiled").parent / "mpypi_recover.mpy"
        self.lib = [
            wheel.assemble(
                work / f"benchlib-{v}.0-{TAG}.whl", "benchlib", f"{v}.0", TAG, library(v), "bench"
            )
            for v in (1, 2)
        ]
        self.data = [random.Random(v).randbytes(1024 * 1024) for v in (1, 2)]
        (work / "blob.bin").write_bytes(self.data[1])
        self.packages = [
            publish.wheel_package(self.fw[1]),
            publish.wheel_package(self.lib[1]),
            publish.src_package(work / "blob.bin", DATA),
        ]
        self.files = [self.flash_files(v) for v in (0, 1)]

    def flash_files(self, v: int) -> dict[str, bytes]:
        files = {
            f"lib/{n}": d
            for w in (self.fw[v], self.lib[v])
            for n, d in wheel.read_wheel(w).items()
        }
        files[DATA] = self.data[v]
        return files

    def tree(self, v: int, top: Path) -> Path:
        """Version `v`'s files in a host folder (lib/, data/), to put on a board at once."""
        for path, data in self.files[v].items():
            (top / path).parent.mkdir(parents=True, exist_ok=True)
            (top / path).write_bytes(data)
        return top

    def classify(self, board: Board) -> str:
        """What the board's flash holds: 'old set', 'new set' or how they are mixed."""
        listing = {f"{top}/{k}": v for top in ("lib", "data") for k, v in board.ls(top).items()}
        old, new = self.files
        good = {0: 0, 1: 0}
        broken = 0
        stale = []  # files of the new set that are not the new set's
        for path in sorted(set(old) | set(new)):
            size = listing.get(path)
            if size is None:
                continue
            want = [v for v, files in ((0, old), (1, new)) if len(files.get(path, b"x")) == size]
            data = board.cat(path) if want else b""
            hit = [v for v in want if (old, new)[v].get(path) == data]
            for v in hit:
                good[v] += 1
            broken += not hit
            if path in new and 1 not in hit:
                stale.append(path.rsplit("/", 1)[-1])
        if good[1] == len(new) and not broken:
            return "new set"
        if good[0] == len(old) and not broken:
            return "old set"
        return (
            f"MIXED: {good[1]}/{len(new)} new ({', '.join(stale[:2])} not), "
            f"{good[0]}/{len(old)} old, {broken} broken"
        )


def library(version: int) -> dict[str, bytes]:
    """20 modules of about 10 KB; the same code in both versions but for VERSION."""
    rng = random.Random(20)
    files = {}
    for i in range(20):
        text = f'"""Bench library module {i}."""\nVERSION = {version}\n'
        k = 0
        while len(text) < 10_000:
            a, b, c = rng.randrange(10**6), rng.randrange(10**6), rng.getrandbits(48)
            text += f"\n\ndef f{k}(x):\n    return x * {a} + {b}  # {c:012x}\n"
            k += 1
        files[f"benchlib/m{i:02d}.py"] = text.encode()
    return files


def _compile(work: Path, name: str, source: str) -> bytes:
    src, out = work / "src" / name, work / "src" / (name[:-3] + ".mpy")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(source)
    build.compile_source(src, name, MARCH, out)
    return out.read_bytes()


def _mip_sources() -> dict[str, str] | None:
    """mip and requests from PEERS_MICROPYTHON_LIB, or None when it is not set."""
    if not MICROPYTHON_LIB:
        return None
    root = Path(MICROPYTHON_LIB)
    paths = {
        "mip/__init__.py": "micropython/mip/mip/__init__.py",
        "requests/__init__.py": "python-ecosys/requests/requests/__init__.py",
    }
    out = {}
    for name, path in paths.items():
        if (root / path).is_file():
            out[name] = (root / path).read_text()
        else:  # a bare git directory (a mirror)
            show = ["git", "--git-dir", str(root), "show", f"HEAD:{path}"]
            out[name] = subprocess.run(show, capture_output=True, text=True, check=True).stdout
    return out


def _mip_frozen() -> bool:
    proc = subprocess.run([LANE.executable, "-c", "import mip"], capture_output=True)
    return proc.returncode == 0


class _WriteWatch:
    """The most block writes any one boot made, polled from the board's run/writes."""

    def __init__(self, board: Board) -> None:
        self.board, self.busiest, self._stop = board, 0, False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop:
            self.busiest = max(self.busiest, self.board.block_writes())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop = True
        self._thread.join()
        return max(self.busiest, self.board.block_writes())


def _peak(console: str) -> tuple[int, int] | None:
    found = [(int(f), int(t)) for f, t in re.findall(r"PEAK free (\d+) of (\d+)", console)]
    return min(found) if found else None


class Bench:
    def __init__(self, work: Path, broker: Mosquitto, mqtt_link: Shaper, http_link: Shaper):
        self.work, self.broker = work, broker
        self.mqtt_link, self.http_link = mqtt_link, http_link
        self.sets = Sets(work)
        self.key = secrets.token_hex(32)
        self.url = mqtt.BrokerURL(broker.host, broker.port)
        self.client = mqtt.connect(self.url)
        self.n = 0
        self.probe = _compile(work, "peakprobe.py", PROBE)
        self.ours_template = self._ours_template()
        self.peer_template = self._peer_template()

    def _board(self, name: str) -> Board:
        board = Board.create(self.work / name, flash_size=FLASH, executable=LANE.executable)
        tree = self.sets.tree(0, self.work / "v1tree")
        board.put_tree(tree / "lib", "lib")
        board.put_tree(tree / "data", "data")
        return board

    # -- ours -------------------------------------------------------------------

    def _ours_template(self) -> Board:
        board = self._board("ours-template")
        for path, data in {
            "main.py": (REPO / "main.py").read_bytes(),
            "mpypi_recover.mpy": self.sets.recover.read_bytes(),
            "provision.json": json.dumps({"update.key": self.key}).encode(),
            "user_main.py": USER_MAIN.format(tag="v1").encode(),
        }.items():
            board.write(path, data)
        return board

    def ours(self, link: str, cut: int = 0, probe: bool = False, timeout: float = 600) -> dict:
        self.n += 1
        channel = f"peers-{self.n}"  # no retained list of an earlier run on it
        board = self.ours_template.clone(self.work / f"ours{self.n}")
        settings = {
            # the shaper in front of Mosquitto, as in vboards.deploy_template otherwise
            "mqtt": {"server": "127.0.0.1", "port": self.mqtt_link.port, "wait_s": 5},
            "update": {"channel": channel, "auto_update": True, "healthy_after_s": 1},
            "app": {"restart_delay_ms": 100},
        }
        board.write("settings.json", json.dumps(settings).encode())
        if probe:
            board.write(
                "main.py", _with_probe((REPO / "main.py").read_text(), "peakprobe").encode()
            )
            board.write("lib/peakprobe.mpy", self.probe)
        self._shape(self.mqtt_link, link)
        watch = _WriteWatch(board)
        out = {}
        with RunningBoard(board, heap=LANE.heap, executable=LANE.executable, cut_at=cut) as rb:
            rb.wait_for("v1 running", timeout=120)
            timeline = StatusTimeline(self.client, board.device_id)
            self.mqtt_link.reset()
            t0 = time.monotonic()
            publish.publish_update(
                self.url,
                self.sets.packages,
                channel=channel,
                key=self.key.encode(),
                client=self.client,
                log=lambda *a: None,
            )
            published = time.monotonic()
            if cut:
                rb.wait_for("power-cut at block write", timeout=600)
            else:
                marks = timeline.wait_for(
                    t0, "downloading", "installing", "rebooting", timeout=timeout
                )
                out["seconds"] = marks["rebooting"] - t0
                out["wire"] = self.mqtt_link.total
                out["phases"] = _phases(t0, published, marks)
            rb.wait_for("v1 running", count=2, timeout=timeout)  # the app is back
            out["console"] = rb.console()
        out["writes"] = watch.stop()
        out["set"] = self.sets.classify(board)
        return out

    # -- mip and upstream ---------------------------------------------------------

    def _peer_template(self) -> Board:
        board = self._board("peer-template")
        board.write("lib/peers_mip.mpy", _compile(self.work, "peers_mip.py", MIP))
        board.write("lib/peers_upstream.mpy", _compile(self.work, "peers_upstream.py", UPSTREAM))
        fw, lib, _ = self.sets.packages
        lines = [f"wheel upstream/{p.entry['pkg_sha256']} -" for p in (fw, lib)]
        lines.append(f"src upstream/{self.sets.packages[2].entry['pkg_sha256']} /{DATA}")
        board.write("upstream.list", "\n".join(lines).encode() + b"\n")
        for p in self.sets.packages:
            topic = f"upstream/{p.entry['pkg_sha256']}"
            self.client.publish(topic, p.data, qos=1, retain=True).wait_for_publish(60)
        self.mip_note = "frozen in the firmware"
        if not _mip_frozen():
            sources = _mip_sources()
            if sources is None:
                self.mip_note = None  # no mip on this lane: its rows say so
                return board
            for name, text in sources.items():
                board.write(
                    f"lib/{name[:-3]}.mpy", _compile(self.work, name.replace("/", "_"), text)
                )
            self.mip_note = "compiled .mpy in /lib (from PEERS_MICROPYTHON_LIB)"
        index = self.work / "index"
        fw_files = {n: d for n, d in wheel.read_wheel(self.sets.fw[1]).items()}
        lib_files = {n: d for n, d in wheel.read_wheel(self.sets.lib[1]).items()}
        write_package(index, "mpy-blox", "2", hashed=fw_files)
        write_package(index, "benchlib", "2.0", hashed=lib_files)
        write_package(index, "bench-set", "2", deps=["mpy-blox", "benchlib"])
        write_package(index, "benchdata", "2", urls={"blob.bin": self.sets.data[1]})
        return board

    def peer(self, method: str, link: str, heap: int, cut: int = 0, probe: bool = False) -> dict:
        self.n += 1
        board = self.peer_template.clone(self.work / f"{method}{self.n}")
        shaper = self.http_link if method == "mip" else self.mqtt_link
        board.write("todo", f"peers_{method} {shaper.port}".encode())
        board.write("main.py", MAIN.format(probe="import peakprobe" if probe else "").encode())
        if probe:
            board.write("lib/peakprobe.mpy", self.probe)
        self._shape(shaper, link)
        shaper.reset()
        out = {}
        # A cut board stays off (once): powered again, it would run the installer again.
        run = RunningBoard(
            board, heap=heap, executable=LANE.executable, cut_at=cut, once=bool(cut)
        )
        with run as rb:
            rb.wait_for(r"power-cut at block write|PEERS (done|failed)", timeout=600)
            out["console"] = console = rb.console()
            out["writes"] = board.block_writes()
        out["wire"] = shaper.total
        done = re.search(r"PEERS done ms (\d+)", console)
        failed = re.search(r"PEERS failed (.*)", console)
        if "partially installed" in console:
            out["error"] = "mip: package may be partially installed"
        elif done:
            out["seconds"] = int(done.group(1)) / 1000
        elif failed:
            out["error"] = failed.group(1).strip()
        if cut:
            board.rm("todo")  # what the next boot finds: the set as the cut left it
        out["set"] = self.sets.classify(board)
        return out

    def _shape(self, shaper: Shaper, link: str) -> None:
        shaped = link == "shaped"
        shaper.rate = RATE if shaped else 0
        shaper.delay_s = DELAY_S if shaped else 0


def run(workdir: Path) -> list[dict]:
    rows = []
    with Mosquitto(
        workdir / "broker", persistence=False, extra_config="max_packet_size 16777216"
    ) as broker:
        (workdir / "index").mkdir()
        with (
            Shaper((broker.host, broker.port)) as mqtt_link,
            IndexServer(workdir / "index") as http,
            Shaper(("127.0.0.1", http.port)) as http_link,
        ):
            bench = Bench(workdir, broker, mqtt_link, http_link)
            rows += _ours_rows(bench)
            rows += _mip_rows(bench)
            rows += _upstream_rows(bench)
            mqtt.disconnect(bench.client)
    best = {r["link"]: r["seconds"] for r in rows if r["method"] == "ours"}
    for r in rows:
        if isinstance(r["seconds"], float) and best.get(r["link"]):
            r["ours/this"] = round(best[r["link"]] / r["seconds"], 2)
    return rows


def _row(method, link, result, heap_cell, cut_cell, note="") -> dict:
    if result.get("set", "new set") != "new set":  # a timed run must end on the new set
        note = f"{note}; after: {result['set']}" if note else f"after: {result['set']}"
    return {
        "method": method,
        "link": link,
        "seconds": round(result["seconds"], 2)
        if "seconds" in result
        else result.get("error", "-"),
        "wire KB": round(result.get("wire", 0) / 1000),
        "peak heap KB": heap_cell,
        "cut at midpoint": cut_cell,
        "note": note,
    }


def _heap_cell(console: str, heap: int | None = None) -> str:
    """The board heap minus the least free heap the probe saw (the supervisor gives
    the process the emulation's share on top, so the board's code starts with about
    --heap free: docs/vboard.md)."""
    peak = _peak(console)
    heap = heap or micropython.parse_size(LANE.heap)
    return f"{(heap - peak[0]) / 1000:.1f} (least free {peak[0] / 1000:.1f})" if peak else "-"


def _phases(t0: float, published: float, marks: dict[str, float]) -> str:
    """Where ours' seconds went, by the board's status reports: the publish (the
    workstation's, the list last), then until the first download, the downloads,
    and the stage and commit. The publish overlaps the rest: the install boot
    starts on the list, which goes last."""
    return (
        f"publish {published - t0:.2f}, to 1st download {marks['downloading'] - t0:.2f}, "
        f"downloads {marks['installing'] - marks['downloading']:.2f}, "
        f"stage+commit {marks['rebooting'] - marks['installing']:.2f}"
    )


def _ours_rows(bench: Bench) -> list[dict]:
    timed = {link: bench.ours(link) for link in ("loopback", "shaped")}
    try:  # the probe's own heap and collects may be more than the install boot can spare
        heap = _heap_cell(bench.ours("loopback", probe=True, timeout=120)["console"])
    except (RuntimeError, TimeoutError, MpyBloxError):
        free = [int(f) for f in re.findall(r"free heap (\d+)", timed["loopback"]["console"])]
        board = micropython.parse_size(LANE.heap)
        heap = f"{(board - min(free)) / 1000:.1f} (least free {min(free) / 1000:.1f}, app log)"
    cut_at = timed["loopback"]["writes"] // 2
    cut = bench.ours("loopback", cut=cut_at)
    cut_cell = f"write {cut_at}: {cut['set']} at the next app boot"
    return [_row("ours", link, r, heap, cut_cell, r["phases"]) for link, r in timed.items()]


def _mip_rows(bench: Bench) -> list[dict]:
    if bench.mip_note is None:
        note = "skipped: no mip on this lane (set PEERS_MICROPYTHON_LIB)"
        return [
            _row("mip", link, {"error": "skipped"}, "-", "-", note)
            for link in ("loopback", "shaped")
        ]
    timed = {link: bench.peer("mip", link, LANE.heap) for link in ("loopback", "shaped")}
    heap = _heap_cell(bench.peer("mip", "loopback", LANE.heap, probe=True)["console"])
    cut_at = timed["loopback"]["writes"] // 2
    cut = bench.peer("mip", "loopback", LANE.heap, cut=cut_at)
    cut_cell = f"write {cut_at}: {cut['set']}"
    return [
        _row("mip", link, r, heap, cut_cell, f"mip {bench.mip_note}") for link, r in timed.items()
    ]


def _upstream_rows(bench: Bench) -> list[dict]:
    at_board = bench.peer("upstream", "loopback", LANE.heap, probe=True)
    heap_used = micropython.parse_size(UPSTREAM_HEAP)
    if "error" in at_board:
        big = bench.peer("upstream", "loopback", heap_used, probe=True)
        heap = f"MemoryError at {LANE.heap}; at {UPSTREAM_HEAP}: " + _heap_cell(
            big["console"], heap_used
        )
        note = f"at --heap {UPSTREAM_HEAP}: does not fit {LANE.heap}"
    else:
        heap_used = LANE.heap
        heap, note = _heap_cell(at_board["console"]), ""
    timed = {link: bench.peer("upstream", link, heap_used) for link in ("loopback", "shaped")}
    cut_at = timed["loopback"]["writes"] // 2
    cut = bench.peer("upstream", "loopback", heap_used, cut=cut_at)
    cut_cell = f"write {cut_at}: {cut['set']}"
    return [_row("upstream", link, r, heap, cut_cell, note) for link, r in timed.items()]
