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
    _vb_host.write_atomic("nvs.json", json.dumps(_load()).encode())
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


class Partition:
    """The `vfs` data partition: the board's flash, as a raw block device.

    As on an ESP32 (`esp32.Partition.find(TYPE_DATA, label="vfs")`), code may read
    the blocks under the filesystem (the provisioning scrub checks them); writes go
    through the same counted, cuttable block device as the filesystem's."""

    TYPE_APP = 0
    TYPE_DATA = 1
    _flash = None  # the mounted _vb_flash.Flash (_vb_rom), None in posix mode

    def __init__(self, flash):
        self._dev = flash

    @classmethod
    def find(cls, type=TYPE_APP, subtype=0xFF, label=None):  # the ESP32 API's names
        if cls._flash is None or type != cls.TYPE_DATA or label not in (None, "vfs"):
            return []
        return [cls(cls._flash)]

    def info(self):
        n = self._dev.ioctl(4, 0) * self._dev.ioctl(5, 0)
        return (self.TYPE_DATA, 0x81, 0x200000, n, "vfs", False)

    def readblocks(self, block, buf, offset=0):
        self._dev.readblocks(block, buf, offset)

    def writeblocks(self, block, buf, offset=0):
        self._dev.writeblocks(block, buf, offset)

    def ioctl(self, op, arg):
        return self._dev.ioctl(op, arg)
