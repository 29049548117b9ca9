# The base of every entity (mpy_blox/hass/hub.py announces them): its name,
# object_id and extra discovery fields, its state and how it is published. The
# helpers for user code are in mpy_blox/hass/entities.py, imported only by
# user code that uses them.
from mpy_blox.hass import hub


class Entity:
    component = None
    has_state = True
    has_command = False

    def __init__(self, name, oid=None, **extra):
        self.name = name
        self.object_id = oid or hub.object_id(name)
        self.extra = {k: v for k, v in extra.items() if v is not None}
        self.value = None
        hub.register(self)

    def payload(self):
        """The state as published; None: nothing to publish yet."""
        return None if self.value is None else str(self.value)

    async def publish(self):
        p = self.payload()
        if p is not None and hub.current is not None:
            await hub.current.publish_state(self, p)

    async def set(self, value):
        """Record the state and publish it (when connected: else at the next connect)."""
        self.value = value
        await self.publish()

    async def command(self, payload):
        raise ValueError("read-only")
