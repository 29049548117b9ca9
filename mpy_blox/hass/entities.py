# Entities for user code, announced to Home Assistant (mpy_blox/hass/hub.py).
#
#   from mpy_blox.hass.entities import BinarySensor, Button, Light, Number, Sensor, Switch
#
#   temp = Sensor("Temperature", unit="°C", device_class="temperature")
#   await temp.set(21.5)                          # publishes the state (retained)
#
#   async def pump(on):                           # called on a command from HA
#       pin.value(on)
#   Switch("Pump", pump)
#   Button("Restart", restart)                    # async def restart()
#   Number("Setpoint", setpoint, min=5, max=30, step=0.5, unit="°C")
#   Light("Desk", desk, brightness=True)          # async def desk(on, brightness)
#
# A handler that returns records the new state and publishes it; one that
# raises changes nothing (ValueError: logged as bad input, others with their
# traceback). Commands out of range or of the wrong form never reach it.
# Extra discovery fields go in as keywords: Sensor("Flow", state_class="measurement").
import json

from mpy_blox.hass.entity import Entity


class Sensor(Entity):
    component = "sensor"

    def __init__(self, name, unit=None, device_class=None, **extra):
        super().__init__(name, unit_of_measurement=unit, device_class=device_class, **extra)


class BinarySensor(Entity):
    component = "binary_sensor"

    def __init__(self, name, device_class=None, **extra):
        super().__init__(name, device_class=device_class, **extra)

    def payload(self):
        return None if self.value is None else ("ON" if self.value else "OFF")


class _Commanded(Entity):
    has_command = True

    def __init__(self, name, handler, **extra):
        super().__init__(name, **extra)
        self.handler = handler


class Switch(_Commanded):
    component = "switch"

    def payload(self):
        return None if self.value is None else ("ON" if self.value else "OFF")

    async def command(self, payload):
        on = _on_off(payload)
        await self.handler(on)
        await self.set(on)


class Button(_Commanded):
    component = "button"
    has_state = False

    def __init__(self, name, handler, **extra):
        super().__init__(name, handler, payload_press="PRESS", **extra)

    async def command(self, payload):
        if payload != b"PRESS":
            raise ValueError("not PRESS")
        await self.handler()


class Number(_Commanded):
    component = "number"

    def __init__(self, name, handler, min=0, max=100, step=1, unit=None, mode=None, **extra):
        super().__init__(
            name,
            handler,
            min=min,
            max=max,
            step=step,
            unit_of_measurement=unit,
            mode=mode,
            **extra,
        )
        self.min = min
        self.max = max

    async def command(self, payload):
        try:
            v = float(payload)
        except ValueError:
            raise ValueError("not a number") from None
        if not (self.min <= v <= self.max):  # also NaN
            raise ValueError("out of range %s..%s" % (self.min, self.max))
        if v == int(v) and isinstance(self.extra.get("step"), int):
            v = int(v)
        await self.handler(v)
        await self.set(v)


class Light(_Commanded):
    """On/off, with brightness 0..255 when brightness=True (Home Assistant's JSON schema)."""

    component = "light"

    def __init__(self, name, handler, brightness=False, **extra):
        extra["supported_color_modes"] = ["brightness" if brightness else "onoff"]
        super().__init__(name, handler, schema="json", **extra)
        self.dimmable = brightness
        self.brightness = 255

    def payload(self):
        if self.value is None:
            return None
        st = {"state": "ON" if self.value else "OFF"}
        if self.dimmable:
            st["brightness"] = self.brightness
            st["color_mode"] = "brightness"
        return json.dumps(st)

    async def command(self, payload):
        try:
            cmd = json.loads(payload)
        except ValueError:
            raise ValueError("not JSON") from None
        if not isinstance(cmd, dict):
            raise ValueError("not a JSON object")
        on = _on_off(cmd.get("state", "").encode())
        b = cmd.get("brightness", self.brightness)
        if not self.dimmable and "brightness" in cmd:
            raise ValueError("no brightness")
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b <= 255:
            raise ValueError("brightness not 0..255")
        if self.dimmable:
            await self.handler(on, b)
        else:
            await self.handler(on)
        self.brightness = b
        await self.set(on)


def _on_off(payload):
    if payload == b"ON":
        return True
    if payload == b"OFF":
        return False
    raise ValueError("not ON or OFF")
