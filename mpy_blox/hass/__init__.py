# Home Assistant through MQTT discovery (docs/homeassistant.md).
#
# The app loads this package only when `hass.enabled` is true, after MQTT and
# the update agent are up, and calls start(): the device then announces itself
# (retained configs under hass.discovery_prefix, default "homeassistant"), with
# an update entity (mpy_blox/hass/update.py) and its diagnostics as sensors
# (mpy_blox/hass/diag.py). User code adds entities (mpy_blox/hass/entities.py):
#
#   from mpy_blox.hass.entities import Sensor, Switch
#   temp = Sensor("Temperature", unit="°C", device_class="temperature")
#   await temp.set(21.5)
#
# Topics, for the device esp32-<mac> and an entity "Temperature":
#   <prefix>/sensor/esp32-<mac>/temperature/config   retained discovery config
#   <prefix>/sensor/esp32-<mac>/temperature/state    retained state
#   <prefix>/switch/esp32-<mac>/pump/set             commands (one subscription)
# Availability is the device's own status topic: its will says offline.
#
# A command runs in a task of its own, never in the client's receive loop (a
# handler that publishes at QoS 1 would wait there for its own PUBACK). Bad
# input (unknown entity, wrong payload, out of range) is logged and ignored.
#
# Nothing is imported here at the top: the install boot loads
# mpy_blox.hass.progress alone.


async def start(client, config, node, agent=None):
    """Start discovery: the update entity, the diagnostics, and user entities."""
    from mpy_blox.hass import hub, progress, update

    h = hub.current = hub.Hub(client, config, node)
    progress.hook(node)

    update.UpdateEntity(node, agent)
    if config.get_bool("hass.diagnostics", True):
        from mpy_blox.hass import diag

        diag.start(h, config.get_int("hass.diagnostics_s", 60))
    await h.start()
    hub.log.info("announcing to Home Assistant under %s/", h.prefix)
    return h
