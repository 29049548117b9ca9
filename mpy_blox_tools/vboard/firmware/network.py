# Emulated `network` of the virtual board: an ESP32 station interface.
#
# The "access point" is described in board.json (`wlan`: ssid and psk, or null
# for any). The host takes the network down and up by writing one byte to
# `run/net` in the board folder ("1" up, "0" down); `mpy-blox vboard net` and
# the test fixtures do that. Sockets are not cut: code must notice through
# isconnected()/status(), as it must on hardware when the AP goes away.
import time

import _vb_host

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_BEACON_TIMEOUT = 200
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204

_CONNECT_DELAY_MS = 100  # association + DHCP take a moment on hardware too

_net_file = None


def _start(net_file):
    global _net_file
    _net_file = net_file


def _network_up():
    _net_file.seek(0)
    return _net_file.read(1) != b"0"


class WLAN:
    # One state per interface, as the ESP32 port shares it between WLAN() objects.
    _state = {}

    def __init__(self, interface=STA_IF):
        self._if = interface
        self._s = WLAN._state.setdefault(
            interface, {"active": False, "ssid": None, "key": None, "since": None}
        )

    def active(self, is_active=None):
        if is_active is None:
            return self._s["active"]
        self._s["active"] = bool(is_active)
        if not is_active:
            self._s["since"] = None

    def connect(self, ssid=None, key=None, *, bssid=None):
        if not self._s["active"]:
            raise OSError("Wifi Not Started")
        self._s["ssid"] = ssid
        self._s["key"] = key
        self._s["since"] = time.ticks_ms()

    def disconnect(self):
        self._s["since"] = None

    def status(self, param=None):
        if param == "rssi":
            return -55
        if param is not None:
            raise ValueError("unknown status param")
        s = self._s
        if not s["active"] or s["since"] is None:
            return STAT_IDLE
        ap = _vb_host.board.get("wlan") or {}
        if not _network_up() or (ap.get("ssid") and ap["ssid"] != s["ssid"]):
            return STAT_NO_AP_FOUND
        if ap.get("psk") and ap["psk"] != s["key"]:
            return STAT_WRONG_PASSWORD
        if time.ticks_diff(time.ticks_ms(), s["since"]) < _CONNECT_DELAY_MS:
            return STAT_CONNECTING
        return STAT_GOT_IP

    def isconnected(self):
        return self._if == STA_IF and self.status() == STAT_GOT_IP

    def ifconfig(self, config=None):
        if config is not None:
            return
        if self.isconnected():
            # The board's sockets really go out over the host's loopback.
            return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def config(self, *args, **kwargs):
        if args == ("mac",):
            return bytes.fromhex(_vb_host.board["unique_id"])
        if args in (("hostname",), ("dhcp_hostname",)):
            return "esp32-" + _vb_host.board["unique_id"]
        if args:
            raise ValueError("unknown config param")

    def scan(self):
        ap = _vb_host.board.get("wlan") or {}
        if not (self._s["active"] and _network_up()):
            return []
        return [
            ((ap.get("ssid") or "vboard").encode(), b"\x02\x00\x00\x00\x00\x01", 6, -55, 3, False)
        ]


def hostname(name=None):
    if name is None:
        return "esp32-" + _vb_host.board["unique_id"]
