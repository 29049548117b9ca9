"""Home Assistant discovery (mpy_blox/hass/) on virtual boards through real Mosquitto:
the discovery configs and states of the device's update entity, its diagnostics and
each helper, checked against Home Assistant's MQTT schemas written out below; commands
and bad input; `payload_install` installing with auto-update off, with its progress;
the heap of a user_main with five entities."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import micropython
from mpy_blox_tools.micropython import DEFAULT_HEAP as ESP32_HEAP
from mpy_blox_tools.micropython import format_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "update"))
from sntp_server import NO_NTP
from update_kit import REPO, make_src

KEY = "0123456789abcdef" * 4


@pytest.fixture
def lane_heap(board_lane):
    """(lane, heap) of the functional tests: the 32-bit lane at an ESP32's 100K when
    its binary is there; else the 64-bit lane with room to spare (its 100K carried
    leaves no room for the entities' configs: the heap figure is the 32-bit lane's,
    test_a_user_main_with_five_entities_boots_and_idles_at_100k)."""
    return board_lane, ESP32_HEAP if board_lane.name == "32-bit" else "200K"


# --- Home Assistant's schemas, from its MQTT documentation -------------------------
# https://www.home-assistant.io/integrations/update.mqtt/ (and mqtt/#discovery-messages,
# sensor.mqtt, binary_sensor.mqtt, switch.mqtt, button.mqtt, number.mqtt, light.mqtt
# "JSON schema"): the keys each discovery config may carry, and the JSON state of an
# update entity. A key outside these is a typo Home Assistant drops without a word.
COMMON = {
    "~", "name", "unique_id", "device", "availability", "availability_mode",
    "availability_template", "availability_topic", "payload_available",
    "payload_not_available", "enabled_by_default", "encoding", "entity_category",
    "icon", "json_attributes_template", "json_attributes_topic", "object_id",
    "default_entity_id", "origin", "qos", "platform", "entity_picture",
}  # fmt: skip
SCHEMA = {
    "update": COMMON | {
        "command_topic", "device_class", "display_precision", "latest_version_template",
        "latest_version_topic", "payload_install", "release_summary", "release_url",
        "retain", "state_topic", "title", "value_template",
    },
    "sensor": COMMON | {
        "device_class", "expire_after", "force_update", "last_reset_value_template",
        "options", "suggested_display_precision", "state_class", "state_topic",
        "unit_of_measurement", "value_template",
    },
    "binary_sensor": COMMON | {
        "device_class", "expire_after", "force_update", "off_delay", "payload_off",
        "payload_on", "state_topic", "value_template",
    },
    "switch": COMMON | {
        "command_template", "command_topic", "device_class", "optimistic", "payload_off",
        "payload_on", "retain", "state_off", "state_on", "state_topic", "value_template",
    },
    "button": COMMON | {
        "command_template", "command_topic", "device_class", "payload_press", "retain",
    },
    "number": COMMON | {
        "command_template", "command_topic", "device_class", "max", "min", "mode",
        "optimistic", "payload_reset", "retain", "state_topic", "step",
        "unit_of_measurement", "value_template",
    },
    "light": COMMON | {
        "schema", "brightness", "brightness_scale", "command_topic", "effect",
        "effect_list", "flash_time_long", "flash_time_short", "max_mireds", "min_mireds",
        "optimistic", "retain", "state_topic", "supported_color_modes", "white_scale",
    },
}  # fmt: skip
DEVICE = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer",
    "model", "model_id", "name", "serial_number", "suggested_area", "sw_version",
    "via_device",
}  # fmt: skip
# The update entity's JSON state: key -> the types Home Assistant takes.
UPDATE_STATE = {
    "installed_version": (str, type(None)),
    "latest_version": (str, type(None)),
    "title": (str,),
    "release_summary": (str,),
    "release_url": (str,),
    "entity_picture": (str,),
    "in_progress": (bool,),
    "update_percentage": (int, float, type(None)),
}


def check_config(component: str, cfg: dict, device_id: str) -> None:
    assert set(cfg) <= SCHEMA[component], set(cfg) - SCHEMA[component]
    assert set(cfg["device"]) <= DEVICE, set(cfg["device"]) - DEVICE
    assert cfg["device"]["identifiers"] == [device_id]
    if component == "update":  # the whole block once: HA merges the rest by identifier
        mac = ":".join(re.findall("..", device_id.split("-")[1]))
        assert cfg["device"]["connections"] == [["mac", mac]]
        assert cfg["device"]["manufacturer"] == "Mpy-BLOX"
        assert re.match(r"\d+\.\d+\.\d+.* \(MicroPython 1\.\d+", cfg["device"]["sw_version"])
    assert cfg["unique_id"].startswith(device_id + "_")
    assert cfg["availability_topic"] == f"mpypi/nodes/{device_id}/status"
    for key in ("state_topic", "command_topic"):
        if key in cfg:  # "~" abbreviates the entity's base topic (HA expands it)
            assert cfg[key].startswith("~/") or cfg[key].startswith("homeassistant/")


def check_update_state(state: dict) -> None:
    assert set(state) <= set(UPDATE_STATE), set(state) - set(UPDATE_STATE)
    for k, v in state.items():
        assert isinstance(v, UPDATE_STATE[k]), (k, v)
    pct = state.get("update_percentage")
    assert pct is None or 0 <= pct <= 100
    assert len(state.get("release_summary", "")) <= 255


def test_the_schemas_catch_a_bad_payload():
    # The checks above can fail: a misspelt key, a wrong type, a percentage over 100.
    with pytest.raises(AssertionError):
        check_update_state({"installed_version": 3})
    with pytest.raises(AssertionError):
        check_update_state({"in_progres": True})
    with pytest.raises(AssertionError):
        check_update_state({"in_progress": True, "update_percentage": 120})
    cfg = {"device": {"identifiers": ["esp32-0a0b0c0d0e0f"]}, "stat_topic": "~/state"}
    cfg.update(unique_id="esp32-0a0b0c0d0e0f_x", availability_topic="x")
    with pytest.raises(AssertionError):
        check_config("sensor", cfg, "esp32-0a0b0c0d0e0f")


# --- the device -------------------------------------------------------------------
ENTITIES_USER_MAIN = """
import asyncio
from mpy_blox.hass.entities import BinarySensor, Button, Light, Number, Sensor, Switch

async def on_pump(on):
    print("USER pump", on)

async def on_press():
    print("USER pressed")

async def on_setpoint(v):
    print("USER setpoint", v)

async def on_desk(on, brightness):
    print("USER desk", on, brightness)

async def user_main():
    temp = Sensor("Temperature", unit="C", device_class="temperature",
                  state_class="measurement")
    door = BinarySensor("Door", device_class="door")
    Switch("Pump", on_pump)
    Button("Restart", on_press)
    Number("Setpoint", on_setpoint, min=5, max=30, step=0.5, unit="C")
    Light("Desk", on_desk, brightness=True)
    await temp.set(21.5)
    await door.set(True)
    print("USER up")
    while True:
        await asyncio.sleep(1)
"""


class Collector:
    """Every message under homeassistant/# and the device's node topics, in order."""

    def __init__(self, client, device_id: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        client.on_message = self._on_message
        client.subscribe("homeassistant/#", qos=1)
        client.subscribe(f"mpypi/nodes/{device_id}/+", qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload, msg.retain))
            self._cond.notify_all()

    def latest(self, topic: str):
        for t, p, _ in reversed(self.messages):
            if t == topic:
                return p
        return None

    def wait(self, topic: str, pred=lambda payload: True, timeout: float = 30):
        """The first message on `topic` (from the start) whose JSON passes `pred`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, p, _ in self.messages:
                    if t == topic and p:
                        try:
                            v = json.loads(p)
                        except ValueError:
                            v = p.decode()
                        if pred(v):
                            return v
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(t, p[:120]) for t, p, _ in self.messages if t == topic][-5:]
                    raise TimeoutError(f"nothing on {topic} passes; seen {seen}")
                self._cond.wait(left)


@pytest.fixture
def channel(monkeypatch):
    return f"hass-test-{uuid.uuid4().hex[:8]}"


def hass_board(boards, full_mpy, broker, channel, user_main, lane=None, auto_update=False):
    settings = {
        "mqtt": {"server": broker.host, "port": broker.port},
        **NO_NTP,
        "hostname": "kitchen",
        "device": {"suggested_area": "Kitchen"},
        "update": {"channel": channel, "auto_update": auto_update, "healthy_after_s": 1},
        "hass": {"enabled": True, "diagnostics_s": 5},
        "app": {"restart_delay_ms": 50},
    }
    board = boards.create(lane=lane)
    board.put_tree(full_mpy, "lib/mpy_blox")
    files = {
        "main.py": (REPO / "main.py").read_bytes(),
        "mpypi_recover.mpy": (full_mpy.parent / "mpypi_recover.mpy").read_bytes(),
        "settings.json": json.dumps(settings).encode(),
        "provision.json": json.dumps({"update.key": KEY}).encode(),
        "user_main.py": user_main.encode(),
    }
    for path, data in files.items():
        board.write(path, data)
    return board


def publish(client, topic: str, payload: bytes | str, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


def test_discovery_configs_states_and_commands_of_each_entity(
    boards, full_mpy, broker, channel, mqtt_client, lane_heap
):
    board = hass_board(boards, full_mpy, broker, channel, ENTITIES_USER_MAIN)
    dev = board.device_id
    col = Collector(mqtt_client(), dev)
    rb = boards.start(board, heap=lane_heap[1], lane=lane_heap[0])
    rb.wait_for("USER up", timeout=30)
    base = f"homeassistant/%s/{dev}/%s"
    expected = {
        ("update", "software"),
        ("sensor", "temperature"),
        ("binary_sensor", "door"),
        ("switch", "pump"),
        ("button", "restart"),
        ("number", "setpoint"),
        ("light", "desk"),
        ("sensor", "diag_mem_free"),
        ("sensor", "diag_fs_free"),
        ("sensor", "diag_rssi"),
        ("sensor", "diag_uptime"),
        ("sensor", "diag_last_update"),
    }
    configs = {}
    for comp, oid in expected:
        try:
            cfg = col.wait(base % (comp, oid) + "/config")
        except TimeoutError as e:  # the board says why
            raise AssertionError(f"{e}\n{rb.console()[-3000:]}") from None
        check_config(comp, cfg, dev)
        configs[comp, oid] = cfg
        assert cfg["~"] == base % (comp, oid)
    late = Collector(mqtt_client(), dev)  # a Home Assistant started later gets them all
    for comp, oid in expected:
        late.wait(base % (comp, oid) + "/config")
    assert all(r for t, _, r in late.messages if t.endswith("/config"))  # retained
    upd = configs["update", "software"]
    assert upd["payload_install"] == "install" and upd["command_topic"] == "~/set"
    assert upd["device_class"] == "firmware" and upd["state_topic"] == "~/state"
    assert upd["device"]["name"] == "kitchen" and upd["device"]["suggested_area"] == "Kitchen"
    assert "'offline' if value_json.state == 'offline'" in upd["availability_template"]
    assert configs["light", "desk"]["schema"] == "json"
    assert configs["light", "desk"]["supported_color_modes"] == ["brightness"]
    assert configs["number", "setpoint"]["min"] == 5 and configs["number", "setpoint"]["max"] == 30
    assert configs["button", "restart"]["payload_press"] == "PRESS"
    assert "state_topic" not in configs["button", "restart"]
    assert configs["sensor", "diag_mem_free"]["entity_category"] == "diagnostic"

    state = col.wait(base % ("update", "software") + "/state")
    check_update_state(state)
    assert state["installed_version"] == "0" and state["latest_version"] == "0"
    assert state["in_progress"] is False and "channel " + channel in state["release_summary"]
    assert col.wait(base % ("sensor", "temperature") + "/state") == 21.5
    assert col.wait(base % ("binary_sensor", "door") + "/state") == "ON"
    diag = col.wait(f"homeassistant/sensor/{dev}/diagnostics/state")
    assert diag["mem_free"] > 4000 and diag["fs_free"] > 0 and diag["uptime"] >= 0
    assert diag["last_update"] == "none"
    for comp, oid in expected:  # each value_template names a field the state has
        tpl = configs[comp, oid].get("value_template", "")
        if "diagnostics" in configs[comp, oid].get("state_topic", ""):
            assert re.match(r"\{\{ value_json\.(\w+) \}\}", tpl).group(1) in diag

    # Commands, good ones first.
    publish(mqtt_client(), base % ("switch", "pump") + "/set", "ON")
    rb.wait_for("USER pump True")
    assert col.wait(base % ("switch", "pump") + "/state") == "ON"
    publish(mqtt_client(), base % ("button", "restart") + "/set", "PRESS")
    rb.wait_for("USER pressed")
    publish(mqtt_client(), base % ("number", "setpoint") + "/set", "21.5")
    rb.wait_for("USER setpoint 21.5")
    assert col.wait(base % ("number", "setpoint") + "/state") == 21.5
    publish(mqtt_client(), base % ("light", "desk") + "/set", '{"state": "ON", "brightness": 128}')
    rb.wait_for("USER desk True 128")
    light = col.wait(base % ("light", "desk") + "/state")
    assert light == {"state": "ON", "brightness": 128, "color_mode": "brightness"}

    # Bad input: logged, ignored, nothing changes (no handler runs, no state).
    bad = [
        (("number", "setpoint"), "99", "out of range 5..30"),
        (("number", "setpoint"), "nan", "out of range 5..30"),
        (("number", "setpoint"), "warm", "not a number"),
        (("switch", "pump"), "MAYBE", "not ON or OFF"),
        (("light", "desk"), "{bad json", "not JSON"),
        (("light", "desk"), '{"state": "ON", "brightness": 300}', "brightness not 0..255"),
        (("button", "restart"), "push", "not PRESS"),
        (("update", "software"), "upgrade", "not install"),
    ]
    states_before = len([m for m in col.messages if m[0].endswith("/state")])
    for (comp, oid), payload, why in bad:
        publish(mqtt_client(), base % (comp, oid) + "/set", payload)
        rb.wait_for(re.escape(f"hass: {oid}: {why}: command "))
    publish(mqtt_client(), base % ("sensor", "temperature") + "/set", "5")
    rb.wait_for(re.escape(f"hass: {base % ('sensor', 'temperature')}/set: read-only"))
    publish(mqtt_client(), base % ("switch", "nosuch") + "/set", "ON")
    rb.wait_for(re.escape(f"hass: {base % ('switch', 'nosuch')}/set: no such entity"))
    time.sleep(0.5)
    out = rb.console()
    assert out.count("USER pump") == 1 and out.count("USER setpoint") == 1
    assert out.count("USER desk") == 1 and out.count("USER pressed") == 1
    states = [m for m in col.messages[:] if m[0].endswith("/state")]
    assert all("diagnostics" in t for t, _, _ in states[states_before:])  # only the timer's
    assert "Traceback" not in out and "safe mode" not in out


V1 = "async def user_main():\n    print('USER v1')\n"
V2 = b"async def user_main():\n    print('USER v2')\n" + b"#" * 4000


def test_install_from_home_assistant_with_auto_update_off_and_its_progress(
    boards, full_mpy, broker, channel, mqtt_client, lane_heap
):
    board = hass_board(
        boards, full_mpy, broker, channel, "async def user_main():\n    print('USER v1')\n"
    )
    dev = board.device_id
    col = Collector(mqtt_client(), dev)
    rb = boards.start(board, heap=lane_heap[1], lane=lane_heap[0])
    rb.wait_for("USER v1", timeout=30)
    state_t = f"homeassistant/update/{dev}/software/state"
    col.wait(state_t, lambda s: s["installed_version"] == "0")
    pub = mqtt_client()
    user = make_src(
        "user_main.py", b"async def user_main():\n    print('USER v2')\n" + b"#" * 4000
    )
    publish(pub, topics.package_topic(user.entry), user.data, retain=True)
    to = f"channels/{channel}"
    publish(pub, "mpypi/" + to, manifest.encode_list([user.entry], 2, KEY, to), retain=True)
    # Announced, not installed: auto_update is off.
    s = col.wait(state_t, lambda s: s.get("latest_version") == "2")
    check_update_state(s)
    assert s["installed_version"] == "0" and s["in_progress"] is False
    time.sleep(1)
    assert "USER v2" not in rb.console()
    assert not any(b'"downloading"' in p for t, p, _ in col.messages if t.endswith("/status"))

    publish(pub, f"homeassistant/update/{dev}/software/set", "install")
    rb.wait_for("USER v2", timeout=60)
    progress = col.wait(state_t, lambda s: s.get("update_percentage") == 100)
    check_update_state(progress)
    assert progress["in_progress"] is True
    col.wait(state_t, lambda s: s.get("in_progress") is True and s.get("update_percentage") == 0)
    done = col.wait(state_t, lambda s: s.get("installed_version") == "2")
    check_update_state(done)
    assert done["latest_version"] == "2" and done["in_progress"] is False
    assert rb.boots() == 3  # the app, the install boot, the new app
    publish(pub, "mpypi/" + to, b"", retain=True)


FREE = """    print("USER up")
    import gc
    gc.collect()
    print("USER free %d" % gc.mem_free())"""


def test_a_user_main_with_five_entities_boots_and_idles_at_100k(
    lane32, boards, full_mpy, broker, channel, mqtt_client, heap_report
):
    five = ENTITIES_USER_MAIN.replace('    Button("Restart", on_press)\n', "")
    five = five.replace('    print("USER up")', FREE)
    board = hass_board(boards, full_mpy, broker, channel, five)
    col = Collector(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=ESP32_HEAP, lane=lane32)
    booted = int(rb.wait_for(r"booted; free heap (\d+) bytes", timeout=30).group(1))
    free = int(rb.wait_for(r"USER free (\d+)", timeout=30).group(1))
    col.wait(f"homeassistant/light/{board.device_id}/desk/config")
    diag = col.wait(f"homeassistant/sensor/{board.device_id}/diagnostics/state")
    time.sleep(6)  # idles through a diagnostics round
    out = rb.console()
    heap_report(
        f"32-bit lane, {format_size(micropython.parse_size(ESP32_HEAP))} board, full .mpy, "
        f"hass on, five entities: free heap after boot {booted}, after user_main's "
        f"entities {free}, diagnostics mem_free {diag['mem_free']}"
    )
    assert "fatal" not in out and "MemoryError" not in out and "safe mode" not in out
    assert "update agent failed" not in out and "no update agent" not in out
    assert "Home Assistant discovery failed" not in out
    assert rb.boots() == 1
