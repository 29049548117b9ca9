# Configuration: /settings.json (plain) with the secure store laid over it.
#
#   settings = config.load_settings()            # {} and one log line if bad
#   cfg = config.Config(settings, store.values)
#   cfg.get_str("mqtt.server", "127.0.0.1")
#
# Keys are dotted. A value is found under the flat key ({"mqtt.port": 1883}) or
# by walking nested objects ({"mqtt": {"port": 1883}}); the secure store wins
# over settings.json. JSON null means "not set": the getter's default applies.
# A value of the wrong type is logged and the default used, so a typo in
# settings.json degrades one feature instead of stopping the boot.
import json
import os

from mpy_blox.log import get_logger

SETTINGS = "/settings.json"
_MAX_SETTINGS = const(8192)  # parsed whole: keep a runaway file out of the heap
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")

log = get_logger("config")


def load_settings(path=SETTINGS):
    """Parse settings.json into a dict; missing or malformed gives {} and one log line."""
    try:
        size = os.stat(path)[6]
    except OSError:
        log.warning("no %s: using defaults", path)
        return {}
    if size > _MAX_SETTINGS:
        log.error("%s is too large (%d > %d bytes): using defaults", path, size, _MAX_SETTINGS)
        return {}
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        log.error("%s is malformed (%s): using defaults", path, e)
        return {}
    if not isinstance(settings, dict):
        log.error("%s is malformed (not a JSON object): using defaults", path)
        return {}
    return settings


def _lookup(tree, key):
    value = tree.get(key)
    if value is not None or "." not in key:
        return value
    for part in key.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


class Config:
    def __init__(self, settings=None, secure=None):
        self.settings = settings or {}
        self.secure = secure or {}

    def get(self, key, default=None):
        """The raw value of `key` (secure first), or `default` when unset."""
        value = _lookup(self.secure, key)
        if value is None:
            value = _lookup(self.settings, key)
        return default if value is None else value

    def _bad(self, key, value, kind, default):
        log.warning("%s: expected %s, got %r: using %r", key, kind, value, default)
        return default

    def get_str(self, key, default=None):
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return self._bad(key, value, "a string", default)

    def get_int(self, key, default=0):
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return self._bad(key, value, "an integer", default)
        try:
            return int(value)
        except (TypeError, ValueError):
            return self._bad(key, value, "an integer", default)

    def get_float(self, key, default=0.0):
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return self._bad(key, value, "a number", default)
        try:
            return float(value)
        except (TypeError, ValueError):
            return self._bad(key, value, "a number", default)

    def get_bool(self, key, default=False):
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value != 0
        if isinstance(value, str):
            text = value.lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        return self._bad(key, value, "true or false", default)

    def get_dict(self, key, default=None):
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, dict):
            return value
        return self._bad(key, value, "an object", default)
