# The client's errors, named for what the caller decides.
#
# All are OSError subclasses: to the app, every one means "the network did not
# do it", so code that already handles socket errors handles these too.


class MQTTError(OSError):
    """The operation failed: not connected, connection lost, or refused by the broker."""


class ProtocolError(MQTTError):
    """The broker sent something that is not MQTT 3.1.1: the connection is dropped."""


class SubscribeError(MQTTError):
    """The broker refused a subscription (SUBACK 0x80); it is not kept."""


class ConnectError(MQTTError):
    """The broker refused CONNECT; `code` is the CONNACK return code."""

    def __init__(self, code):
        super().__init__("connection refused: %s" % _REASONS.get(code, "code %d" % code))
        self.code = code


_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    # What a user can fix: the device's credentials (docs/configuration.md).
    4: "bad user name or password (check mqtt.username, mqtt.password)",
    5: "not authorized (check mqtt.username, mqtt.password)",
}
