# The hub of Home Assistant discovery (the package's docs: mpy_blox/hass/__init__.py):
# the registry of entities, their configs and states, and the one subscription
# that routes commands to them.
import asyncio
import gc
import json

from mpy_blox.log import get_logger
from mpy_blox.topics import node_topic

log = get_logger("hass")

_MAX_COMMAND = const(256)  # a command payload is a word or a small JSON object
_TRIES = const(3)  # announcing an entity again after a MemoryError, before giving up
AVAILABLE = "{{ 'offline' if value_json.state == 'offline' else 'online' }}"

current = None  # the Hub, once the app started it
_entities = []  # every entity user code made, announced once the hub is up


def object_id(name):
    """'Water temp.' -> 'water_temp_': the id part of topics and unique_id."""
    out = ""
    for c in name.lower():
        out += c if ("a" <= c <= "z" or "0" <= c <= "9") else "_"
    return out or "entity"


def register(entity):
    """Called by each entity as it is made: announced now, or when the hub starts.

    One of the same kind and name is replaced: a restarted user_main makes its
    entities again, with the handlers of its new run."""
    for i, e in enumerate(_entities):
        if e.component == entity.component and e.object_id == entity.object_id:
            _entities[i] = entity
            break
    else:
        _entities.append(entity)
    if current is not None:
        current.schedule(entity)


class Hub:
    def __init__(self, client, config, node):
        self.client = client
        self.config = config
        self.node = node
        self.prefix = config.get_str("hass.discovery_prefix", "homeassistant")
        self._device = None
        self.ids = {"identifiers": [node.device_id]}
        # Entities waiting to be announced, one at a time by one task: a user_main
        # that makes five entities at once would otherwise hold five configs'
        # JSON and five PUBACK waits in the heap together (a MemoryError at 100K).
        self._queue = []
        self._draining = False

    def base(self, component, oid):
        return "%s/%s/%s/%s" % (self.prefix, component, self.node.device_id, oid)

    def device(self):
        """The device block every config carries (built once)."""
        if self._device is None:
            import os

            import mpy_blox

            u = os.uname()
            dev = {
                "identifiers": [self.node.device_id],
                "name": self.config.get_str("hostname") or self.node.device_id,
                "manufacturer": "Mpy-BLOX",
                "model": u.machine,
                "sw_version": "%s (MicroPython %s)" % (mpy_blox.__version__, u.release),
            }
            mac = _mac(self.node.device_id)
            if mac:
                dev["connections"] = [["mac", mac]]
            area = self.config.get_str("device.suggested_area")
            if area:
                dev["suggested_area"] = area
            self._device = dev
        return self._device

    def config_of(self, entity):
        """The discovery config of `entity` (built when sent, not kept)."""
        oid = entity.object_id
        base = self.base(entity.component, oid)
        cfg = {
            "~": base,
            "name": entity.name,
            "unique_id": "%s_%s" % (self.node.device_id, oid),
            # The whole device block rides on the update entity's config; Home
            # Assistant merges the others into the same device by identifier,
            # which keeps their configs small enough for a 100 KB heap.
            "device": self.device() if entity.component == "update" else self.ids,
            "availability_topic": node_topic(self.node.device_id, "status"),
            "availability_template": AVAILABLE,
        }
        if entity.has_state:
            cfg["state_topic"] = "~/state"
        if entity.has_command:
            cfg["command_topic"] = "~/set"
        cfg.update(entity.extra)
        return cfg

    async def start(self):
        flt = "%s/+/%s/+/set" % (self.prefix, self.node.device_id)
        await self.client.subscribe(flt, self._on_command)
        self.client.add_connect_callback(self.announce_all)
        if self.client.is_connected:
            await self.announce_all()

    async def announce_all(self):
        for e in _entities:
            self.schedule(e)

    def schedule(self, entity):
        """Announce `entity` soon, after those already waiting."""
        if entity not in self._queue:
            self._queue.append(entity)
        if not self._draining:
            self._draining = True
            asyncio.create_task(self._drain())

    async def _drain(self):
        tries = 0
        try:
            while self._queue:
                if await self.announce(self._queue[0]) or tries == _TRIES:
                    self._queue.pop(0)
                    tries = 0
                else:  # out of memory for now: the heap may have room in a moment
                    tries += 1
                    await asyncio.sleep_ms(200 * tries)
        finally:
            self._draining = False

    async def announce(self, entity):
        """Publish `entity`'s config and state. False only for a MemoryError (worth
        another try); a lost link is the next connect's to announce again."""
        c = self.client
        if not c.is_connected:
            return True  # the next connect announces it
        base = self.base(entity.component, entity.object_id)
        try:
            gc.collect()  # a config is a few hundred bytes in one piece
            await c.publish(base + "/config", json.dumps(self.config_of(entity)), True, 1)
            await entity.publish()
        except OSError as e:  # MQTTError: the link went; the next connect announces again
            log.warning("cannot announce %s: %r", entity.object_id, e)
        except MemoryError as e:
            log.warning("cannot announce %s yet: %r", entity.object_id, e)
            return False
        except Exception as e:  # noqa: BLE001  (a task of ours, not user code's)
            log.exception("cannot announce %s", e, entity.object_id)
        return True

    async def publish_state(self, entity, payload):
        c = self.client
        if not c.is_connected:
            return False
        try:
            await c.publish(
                self.base(entity.component, entity.object_id) + "/state", payload, True, 0
            )
            return True
        except OSError as e:
            log.warning("cannot publish %s: %r", entity.object_id, e)
            return False

    async def _on_command(self, msg):
        parts = msg.topic.split("/")
        try:
            payload = await msg.read(_MAX_COMMAND)
        except ValueError:
            log.warning("%s: command over %d bytes ignored", msg.topic, _MAX_COMMAND)
            return
        entity = None
        if len(parts) >= 4:  # <prefix>/<component>/<device>/<object_id>/set
            for e in _entities:
                if e.component == parts[-4] and e.object_id == parts[-2]:
                    entity = e
                    break
        if entity is None:
            log.warning("%s: no such entity: command ignored", msg.topic)
            return
        if not entity.has_command:
            log.warning("%s: read-only: command ignored", msg.topic)
            return
        asyncio.create_task(_run(entity, payload))


async def _run(entity, payload):
    try:
        await entity.command(payload)
    except ValueError as e:  # bad input: said once, nothing changes
        log.warning("%s: %s: command %r ignored", entity.object_id, e, payload[:40])
    except Exception as e:  # noqa: BLE001  (a broken handler must not stop the device)
        log.exception("%s: command handler failed", e, entity.object_id)


def _mac(device_id):
    # The device id carries the base MAC (mpy_blox.node.device_id).
    h = device_id.rpartition("-")[2]
    if len(h) != 12:
        return None
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))
