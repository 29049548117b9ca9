# The device MQTT client: MQTT 3.1.1 on asyncio, payloads streamed through a
# fixed buffer, reconnecting forever. See docs/mqtt.md.
from mpy_blox.mqtt.client import MQTTClient
from mpy_blox.mqtt.errors import ConnectError, MQTTError, ProtocolError, SubscribeError
from mpy_blox.mqtt.message import Message
from mpy_blox.mqtt.packet import Will

__all__ = [
    "MQTTClient",
    "Will",
    "Message",
    "MQTTError",
    "ProtocolError",
    "ConnectError",
    "SubscribeError",
]
