"""A virtual board's folder: its configuration, flash image, NVS and run-time files.

    DIR/board.json    device identity and hardware (fs type, flash size, emulated AP)
    DIR/flash.img     the flash: LittleFS2 or FAT on a block-device image
    DIR/flash/        ... or a host folder in `posix` mode
    DIR/nvs.json      the emulated NVS partition (committed values only)
    DIR/otadata.img, ota_0.img, ota_1.img   the OTA partitions (from 4M of flash up)
    DIR/console.log   everything the board printed, with the supervisor's boot lines
    DIR/run/          live files shared with the running board (lock, serial, net, writes)

The flash is read and written through MicroPython itself (`firmware/_vb_tool.py`),
so the workstation sees exactly the filesystem the board sees.
"""

from __future__ import annotations

import fcntl
import json
import secrets
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

from mpy_blox_tools import fleet, micropython
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard import bootloader

FIRMWARE = Path(__file__).with_name("firmware")
FILESYSTEMS = ("littlefs", "fat", "posix")
BLOCK_SIZE = 4096  # the ESP32's flash sector
DEFAULT_FLASH = "2M"
# The board's RTC at power-on (firmware/time.py): "unset" starts at 2000-01-01, as an
# ESP32 does until NTP sets it; "host" starts at the host's time.
CLOCKS = ("unset", "host")


class Board:
    """One virtual board folder. Create with `Board.create`, open with `Board(dir)`."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).resolve()
        try:
            self.config = json.loads((self.dir / "board.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise MpyBloxError(f"{directory}: not a virtual board (no board.json)") from None
        except json.JSONDecodeError as e:
            raise MpyBloxError(f"{directory}/board.json: {e}") from None

    @classmethod
    def create(
        cls,
        directory: str | Path,
        *,
        device_id: str | None = None,
        fs: str = "littlefs",
        flash_size: str | int = DEFAULT_FLASH,
        wlan: dict | None = None,
        executable: str | None = None,
        clock: str = "unset",
    ) -> Board:
        """Make a new board with an empty, formatted flash.

        clock "host" starts its RTC at the host's time at power-on; "unset" (default)
        at 2000-01-01, as an ESP32's until NTP sets it.
        From 4M of flash up it has OTA partitions, with `executable` (default: the
        `micropython` boards run on, micropython.executable()) as the firmware in
        ota_0, as a board fresh from `esptool write_flash`."""
        directory = Path(directory)
        if (directory / "board.json").exists():
            raise MpyBloxError(f"{directory}: a board exists there already")
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise MpyBloxError(f"{directory}: not an empty folder; a board needs one of its own")
        if fs not in FILESYSTEMS:
            raise MpyBloxError(
                f"unknown filesystem {fs!r}: choose one of {', '.join(FILESYSTEMS)}"
            )
        if clock not in CLOCKS:
            raise MpyBloxError(f"unknown clock {clock!r}: choose one of {', '.join(CLOCKS)}")
        unique_id = secrets.token_hex(6) if device_id is None else _unique_id(device_id)
        size = micropython.parse_size(flash_size)
        if size % BLOCK_SIZE or size < 16 * BLOCK_SIZE:
            raise MpyBloxError(f"flash size {flash_size}: a multiple of 4K, at least 64K")
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 1,
            "unique_id": unique_id,
            "fs": fs,
            "flash_size": size,
            "block_size": BLOCK_SIZE,
            "wlan": wlan,  # the emulated access point: {"ssid", "psk"} or None for any
            "chip": "esp32",
            "chip_id": 0,  # ESP-IDF's esp_chip_id_t, as firmware images name it
            "clock": clock,  # the RTC at power-on: "unset" (2000-01-01) or "host"
            "partitions": bootloader.partition_table(size),
        }
        (directory / "board.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            bootloader.make_partitions(directory, config, executable or micropython.executable())
        except MpyBloxError:
            for name in ("board.json", "otadata.img", "ota_0.img", "ota_1.img"):
                (directory / name).unlink(missing_ok=True)
            raise
        if fs == "posix":
            (directory / "flash").mkdir(exist_ok=True)
        else:
            with open(directory / "flash.img", "wb") as f:
                f.truncate(size)  # sparse: erased flash costs no disk
        board = cls(directory)
        board.tool("format")
        return board

    def clone(self, directory: str | Path, *, device_id: str | None = None) -> Board:
        """A copy of this stopped board (flash, NVS, partitions) under another device id
        (default: a random one), without its console log or run/ files: a fleet of
        boards deployed once."""
        directory = Path(directory)
        unique_id = secrets.token_hex(6) if device_id is None else _unique_id(device_id)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise MpyBloxError(f"{directory}: not an empty folder; a board needs one of its own")
        with self.lock():
            shutil.copytree(
                self.dir,
                directory,
                ignore=shutil.ignore_patterns("run", "console.log"),
                dirs_exist_ok=True,
            )
        config = dict(self.config, unique_id=unique_id)
        (directory / "board.json").write_text(json.dumps(config, indent=2) + "\n")
        return Board(directory)

    @property
    def has_ota(self) -> bool:
        """Does the board have OTA app partitions (ota_0, ota_1)?"""
        return bool(bootloader.slots(self.config))

    def otadata(self) -> list[dict]:
        """The two otadata entries: [{"seq", "state", "written"}, ...], the state by
        name; `written` when the entry holds a sequence whose CRC matches."""
        out = []
        for seq, state, crc in bootloader.read_otadata(self.dir / "otadata.img"):
            written = seq != 0xFFFFFFFF and crc == bootloader.entry_crc(seq)
            name = bootloader.STATE_NAMES.get(state, state)
            out.append({"seq": seq, "state": name, "written": written})
        return out

    def read_partition(self, label: str) -> bytes:
        """The bytes of an OTA partition's file (otadata, ota_0, ota_1)."""
        if label != "otadata" and label not in (p[0] for p in bootloader.slots(self.config)):
            raise MpyBloxError(f"{self.dir}: no partition {label!r} with bytes of its own")
        return (self.dir / f"{label}.img").read_bytes()

    @property
    def device_id(self) -> str:
        return "esp32-" + self.config["unique_id"]

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    # -- the stopped board's flash ------------------------------------------------

    @contextmanager
    def lock(self):
        """Hold the board exclusively (a running supervisor holds it for its lifetime)."""
        self.run_dir.mkdir(exist_ok=True)
        with open(self.run_dir / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MpyBloxError(f"{self.dir}: the board is running; stop it first") from None
            yield

    def tool(self, op: str, *args: str) -> bytes:
        """Run one flash operation through MicroPython; return its standard output."""
        with self.lock():
            proc = subprocess.run(
                [
                    micropython.executable(),
                    "-X",
                    "heapsize=256K",
                    str(FIRMWARE / "_vb_tool.py"),
                    str(self.dir),
                    op,
                    *args,
                ],
                capture_output=True,
                cwd=FIRMWARE,
            )
        if proc.returncode:
            detail = proc.stderr.decode(errors="replace").strip().splitlines()
            what = f"{op} {args[-1]}" if args else op
            raise MpyBloxError(f"vboard {what}: {detail[-1] if detail else proc.returncode}")
        return proc.stdout

    def ls(self, path: str = "") -> dict[str, int | None]:
        """{path: size} of every file under `path`; folders map to None."""
        listing = {}
        for line in self.tool("ls", path).decode().splitlines():
            kind, size, name = line.split(None, 2)
            listing[name] = int(size) if kind == "f" else None
        return listing

    def cat(self, path: str) -> bytes:
        _check_flash_path(path)
        return self.tool("cat", path)

    def put(self, source: str | Path, path: str) -> None:
        source = Path(source).resolve()
        if not source.is_file():
            raise MpyBloxError(f"{source}: no such file")
        _check_flash_path(path)
        self.tool("put", str(source), path)

    def put_tree(self, source: str | Path, path: str) -> None:
        """Copy a workstation folder (without __pycache__) to `path` on the flash."""
        source = Path(source).resolve()
        if not source.is_dir():
            raise MpyBloxError(f"{source}: no such folder")
        self.tool("putdir", str(source), path)

    def write(self, path: str, data: bytes) -> None:
        """Put `data` at `path` on the flash."""
        self.run_dir.mkdir(exist_ok=True)
        staged = self.run_dir / "upload.tmp"
        staged.write_bytes(data)
        try:
            self.put(staged, path)
        finally:
            staged.unlink()

    def rm(self, path: str) -> None:
        _check_flash_path(path)
        self.tool("rm", path)

    def fill(self, leave: int = 0) -> int:
        """Fill the flash with one file, leaving about `leave` bytes free; return its size."""
        return int(self.tool("fill", str(leave)))

    def df(self) -> tuple[int, int]:
        """(total, free) bytes of the flash filesystem."""
        total, free = self.tool("df").split()
        return int(total), int(free)

    # -- files shared with the running board ----------------------------------------

    def set_network(self, up: bool) -> None:
        """Take the emulated access point down or bring it back (takes effect at once)."""
        self.run_dir.mkdir(exist_ok=True)
        net = self.run_dir / "net"
        # In place, one byte: the board keeps this file open and rereads it.
        with open(net, "r+b" if net.exists() else "wb") as f:
            f.write(b"1" if up else b"0")

    def block_writes(self) -> int:
        """Flash block writes since the board last booted."""
        try:
            return int((self.run_dir / "writes").read_text() or 0)
        except FileNotFoundError:
            return 0

    def nvs_writes(self) -> int:
        """NVS writes (set_*, erase_key) since `vboard run` started, over all its boots."""
        try:
            return int((self.run_dir / "nvs_writes").read_text() or 0)
        except FileNotFoundError:
            return 0

    def nvs(self) -> dict:
        """The NVS contents: {namespace: {key: [type, value]}}."""
        try:
            return json.loads((self.dir / "nvs.json").read_text())
        except FileNotFoundError:
            return {}

    def serial_port(self) -> str | None:
        """The pseudo-terminal path of the running board, if it runs."""
        try:
            return (self.run_dir / "serial").read_text().strip() or None
        except FileNotFoundError:
            return None


def _unique_id(device_id: str) -> str:
    """The unique_id (MAC hex) of a device id `esp32-<12 hex>`, refusing other ids."""
    fleet.check_device_id(device_id)
    return fleet.DEVICE_ID.match(device_id).group(1)


def _check_flash_path(path: str) -> None:
    """Refuse a flash path that would leave the flash's root (a '..' part)."""
    if ".." in path.replace("\\", "/").split("/"):
        raise MpyBloxError(f"{path}: an unsafe path (it leaves the flash's root)")
