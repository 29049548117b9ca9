# Emulated `esp32` module of the virtual board: NVS with the ESP32 API and errors.
#
# As in ESP-IDF: each set_i32, set_blob and erase_key is durable on its own the
# moment it returns (nvs_set_* writes the entry to flash at once; nvs_commit is a
# no-op for the default NVS implementation), and one set_blob replaces a blob
# whole. commit() exists and does nothing. So a power cut between two writes
# keeps the first and loses the second: code that updates several keys must
# order them (docs/vboard.md). Each write is one "NVS write": counted in
# run/nvs_writes, and the board can lose power at a chosen one (--cut-nvs-at),
# as it can at a flash block write. Storage: `nvs.json` in the board folder.
import json

import _vb_host

# ESP-IDF error codes (esp_err.h / nvs.h). MicroPython raises OSError(-code, name).
_ERR = {
    0x1102: "ESP_ERR_NVS_NOT_FOUND",
    0x1106: "ESP_ERR_NVS_INVALID_NAME",
    0x1109: "ESP_ERR_NVS_KEY_TOO_LONG",
    0x110C: "ESP_ERR_NVS_INVALID_LENGTH",
    0x110E: "ESP_ERR_NVS_VALUE_TOO_LONG",
}
_ERR_NOT_FOUND = 0x1102
_ERR_INVALID_NAME = 0x1106
_ERR_KEY_TOO_LONG = 0x1109
_ERR_INVALID_LENGTH = 0x110C
_ERR_VALUE_TOO_LONG = 0x110E
_MAX_KEY = 15  # NVS_KEY_NAME_MAX_SIZE - 1
_MAX_BLOB = 508000  # a blob may span pages, but not the whole partition

_store = None  # {namespace: {key: ["i32", int] | ["blob", hex]}}
# The cut points (_start): NVS writes counted since the supervisor's run began.
_writes = 0
_cut_at = 0  # 0: never
_counter = None  # an open host file the count is mirrored to
_on_cut = None


def _start(counter, base, cut_at, on_cut):
    """From the boot ROM: count NVS writes from `base`; cut the power at `cut_at`."""
    global _counter, _writes, _cut_at, _on_cut
    _counter, _writes, _cut_at, _on_cut = counter, base, cut_at, on_cut
    _mirror()


def _mirror():
    if _counter:
        _counter.seek(0)
        _counter.write(("%10d\n" % _writes).encode())


def _write():
    # One NVS write: the power fails before it reaches the partition, or it
    # lands whole (ESP-IDF writes an entry, then marks it valid).
    global _writes
    _writes += 1
    if _writes == _cut_at:
        _on_cut(_writes)
    _vb_host.write_json_atomic("nvs.json", _load())
    _mirror()


def _fail(code):
    raise OSError(-code, _ERR[code])


def _load():
    global _store
    if _store is None:
        data = _vb_host.read("nvs.json")
        _store = json.loads(data) if data else {}
    return _store


class NVS:
    def __init__(self, namespace):
        if not namespace or len(namespace) > _MAX_KEY:
            _fail(_ERR_INVALID_NAME)
        self._namespace = namespace

    def _items(self, create=False):
        store = _load()
        items = store.get(self._namespace)
        if items is None:
            items = {}
            if create:
                store[self._namespace] = items
        return items

    def _get(self, key, kind):
        _check_key(key)
        item = self._items().get(key)
        if item is None or item[0] != kind:
            _fail(_ERR_NOT_FOUND)  # NVS looks entries up by key *and* type
        return item[1]

    def set_i32(self, key, value):
        _check_key(key)
        if not -0x80000000 <= value <= 0x7FFFFFFF:
            raise OverflowError("overflow converting long int to machine word")
        self._items(True)[key] = ["i32", value]
        _write()

    def get_i32(self, key):
        return self._get(key, "i32")

    def set_blob(self, key, value):
        _check_key(key)
        value = bytes(value)
        if len(value) > _MAX_BLOB:
            _fail(_ERR_VALUE_TOO_LONG)
        self._items(True)[key] = ["blob", value.hex()]
        _write()

    def get_blob(self, key, buffer):
        value = bytes.fromhex(self._get(key, "blob"))
        if len(buffer) < len(value):
            _fail(_ERR_INVALID_LENGTH)
        buffer[: len(value)] = value
        return len(value)

    def erase_key(self, key):
        _check_key(key)
        items = self._items()
        if key not in items:
            _fail(_ERR_NOT_FOUND)
        del items[key]
        _write()

    def commit(self):
        pass  # as nvs_commit in ESP-IDF: every write above is durable already


def _check_key(key):
    if not key:
        _fail(_ERR_INVALID_NAME)
    if len(key) > _MAX_KEY:
        _fail(_ERR_KEY_TOO_LONG)


_ERR_INVALID_ARG = 0x102
_ERR_INVALID_SIZE = 0x104
_ERR_ESP_NOT_FOUND = 0x105
_ERR_OTA_VALIDATE_FAILED = 0x1503
_ERR.update(
    {
        _ERR_INVALID_ARG: "ESP_ERR_INVALID_ARG",
        _ERR_INVALID_SIZE: "ESP_ERR_INVALID_SIZE",
        _ERR_ESP_NOT_FOUND: "ESP_ERR_NOT_FOUND",
        _ERR_OTA_VALIDATE_FAILED: "ESP_ERR_OTA_VALIDATE_FAILED",
    }
)
_SECTOR = 4096  # the flash's erase unit, and the only block size emulated


class Partition:
    """The board's partition table, as `esp32.Partition` (ports/esp32/esp32_partition.c).

    Rows come from board.json (`[label, type, subtype, address, size]`) with the
    device behind each: the filesystem's flash for `vfs`, a host file for
    `otadata`, `ota_0` and `ota_1`, nothing for a small board's `factory` (its
    firmware is the supervisor's executable). Every program and sector erase goes
    through the counted, cuttable flash driver (_vb_flash.count). The OTA state
    (BOOT, set_boot, mark_app_valid_cancel_rollback) lives in _vb_ota, loaded only
    on a board with OTA partitions."""

    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1
    _table = []  # [label, type, subtype, address, size, device] (_vb_rom)
    _running = None  # the running app partition's label (_vb_rom, from the bootloader)
    _ota = None  # the _vb_ota module on a board with OTA partitions

    def __init__(self, id, block_size=_SECTOR):
        if block_size != _SECTOR:
            raise ValueError("block_size: the virtual board has 4096 only")
        if isinstance(id, list):  # a row of the table (find, get_next_update)
            row = id
        elif id == Partition.BOOT or id == Partition.RUNNING:
            if id == Partition.BOOT and Partition._ota:
                label = Partition._ota.boot_label()
            else:
                label = Partition._running
            row = _row(label, Partition.TYPE_APP) if label else _first_app()
        elif isinstance(id, str):
            row = _row(id, Partition.TYPE_APP) or _row(id, Partition.TYPE_DATA)
        else:
            raise ValueError
        if row is None:
            raise OSError(2)  # ENOENT, as esp32_partition_new on NULL
        self._row = row

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None, block_size=_SECTOR):  # the ESP32's names
        return [
            Partition(r, block_size)
            for r in Partition._table
            if r[1] == type and subtype in (0xFF, r[2]) and label in (None, r[0])
        ]

    def info(self):
        r = self._row
        return (r[1], r[2], r[3], r[4], r[0], False)

    def __repr__(self):
        r = self._row
        return "<Partition type=%u, subtype=%u, address=%u, size=%u, label=%s, encrypted=0>" % (
            r[1],
            r[2],
            r[3],
            r[4],
            r[0],
        )

    def _device(self, addr, n):
        # esp_partition_read/write/erase_range's checks, then the device.
        if addr > self._row[4]:
            _fail(_ERR_INVALID_ARG)
        if n > self._row[4] - addr:
            _fail(_ERR_INVALID_SIZE)
        dev = self._row[5]
        if dev is None:
            raise OSError(5)  # EIO: no bytes behind a small board's factory partition
        return dev

    def readblocks(self, block, buf, offset=0):
        addr = block * _SECTOR + offset
        self._device(addr, len(buf)).readblocks(0, buf, addr)

    def writeblocks(self, block, buf, offset=None):
        addr = block * _SECTOR
        if offset is not None:  # the extended form: program only, erased before
            addr += offset
            self._device(addr, len(buf)).writeblocks(0, buf, addr)
            return
        # The simple form erases what it writes first (esp_partition_erase_range,
        # whole sectors only), then programs it, one sector after another: each
        # erase and each program is one counted block write.
        n = len(buf)
        dev = self._device(addr, n)
        if n % _SECTOR:
            _fail(_ERR_INVALID_SIZE)
        mv = memoryview(buf)
        for i in range(0, n, _SECTOR):
            dev.ioctl(6, (addr + i) // _SECTOR)
        for i in range(0, n, _SECTOR):
            dev.writeblocks(0, mv[i : i + _SECTOR], addr + i)

    def ioctl(self, op, arg):
        if op == 4:  # BLOCK_COUNT
            return self._row[4] // _SECTOR
        if op == 5:  # BLOCK_SIZE
            return _SECTOR
        if op == 6:  # BLOCK_ERASE
            self._device(arg * _SECTOR, _SECTOR).ioctl(6, arg)
            return 0
        if op in (1, 2, 3):  # INIT, DEINIT, SYNC
            return 0
        return None

    def set_boot(self):
        if self._row[1] != Partition.TYPE_APP:
            _fail(_ERR_OTA_VALIDATE_FAILED)  # esp_image_verify finds no app there
        if Partition._ota is None:
            _fail(_ERR_ESP_NOT_FOUND)  # no otadata partition
        Partition._ota.set_boot(self)

    def get_next_update(self):
        # esp_ota_get_next_update_partition: the OTA slot after this one, else the first.
        slots = [r for r in Partition._table if r[1] == 0 and 0x10 <= r[2] < 0x20]
        for i in range(len(slots)):
            if slots[i] is self._row and i + 1 < len(slots):
                return Partition(slots[i + 1])
        if not slots:
            raise OSError(2)  # ENOENT: no OTA partition on this board
        return Partition(slots[0])

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        if cls._ota is None:
            _fail(_ERR_ESP_NOT_FOUND)  # no otadata partition: the -261 of MicroPython's docs
        cls._ota.mark_valid()


def _row(label, type):
    for r in Partition._table:
        if r[0] == label and r[1] == type:
            return r
    return None


def _first_app():
    for r in Partition._table:
        if r[1] == Partition.TYPE_APP:
            return r
    return None


def _start_partitions(table, devices, running, ota):
    """From the boot ROM: the partition table with its devices ({label: device})."""
    # In posix mode the filesystem has no block device: no vfs partition either.
    Partition._table = [
        r + [devices.get(r[0])] for r in table if r[0] != "vfs" or devices.get("vfs")
    ]
    Partition._running = running
    Partition._ota = ota
