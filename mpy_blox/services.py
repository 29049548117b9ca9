# The optional services, started by the app after MQTT and the update agent:
# Home Assistant discovery (mpy_blox/hass/, `hass.enabled`) and the remote log
# (mpy_blox/remotelog.py, `logging.remote`). The app imports this module only
# when one of them is enabled, and drops it again: the code of a service
# nobody enabled never takes heap on a device.
from mpy_blox.log import get_logger

log = get_logger("app")


async def start(client, config, node, agent):
    """Start each enabled service; one that fails is logged, the device runs on."""
    if config.get_bool("hass.enabled", False):
        try:
            from mpy_blox import hass

            await hass.start(client, config, node, agent)
        except Exception as e:  # noqa: BLE001  (MemoryError too)
            log.exception("Home Assistant discovery failed to start", e)
    if config.get_bool("logging.remote", False):
        try:  # `mpy-blox logs DEVICE` reads it
            from mpy_blox import remotelog

            remotelog.start(client, node, config)
        except Exception as e:  # noqa: BLE001  (MemoryError: the device runs on without it)
            log.exception("remote log failed to start", e)
