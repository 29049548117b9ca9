# Emulated `esp32` module of the virtual board: NVS with the ESP32 API and errors.
#
# As in ESP-IDF, all handles of one namespace see each other's writes at once;
# a write is durable only after commit(). The emulation takes that literally:
# uncommitted changes are lost on reset or power cut, so code that forgets to
# commit fails here as it may on hardware. Storage: `nvs.json` in the board folder.
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

    def get_i32(self, key):
        return self._get(key, "i32")

    def set_blob(self, key, value):
        _check_key(key)
        value = bytes(value)
        if len(value) > _MAX_BLOB:
            _fail(_ERR_VALUE_TOO_LONG)
        self._items(True)[key] = ["blob", value.hex()]

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

    def commit(self):
        _vb_host.write_atomic("nvs.json", json.dumps(_load()).encode())


def _check_key(key):
    if not key:
        _fail(_ERR_INVALID_NAME)
    if len(key) > _MAX_KEY:
        _fail(_ERR_KEY_TOO_LONG)
