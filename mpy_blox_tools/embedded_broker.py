"""The embedded MQTT broker: amqtt, for `mpy-blox broker` on a workstation without Mosquitto.

It listens on one plain-TCP address, keeps retained messages on disk across restarts
(`retained_store`), and with a password file admits only the users of a
`mosquitto_passwd` file, the same file Mosquitto reads. amqtt 0.12 puts no limit on a
packet's size (a 4 MiB package passes at QoS 1); a session with clean-session false
keeps QoS 1 messages for its absent client, but in memory only: after a restart a
device subscribes again, as it does after every reconnect. SIGINT and SIGTERM stop it
cleanly, after the last retained message is on disk.

amqtt is an optional dependency (the `broker` extra): import this module only to run it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from amqtt.broker import Broker, BrokerContext
from amqtt.contexts import BrokerConfig, ListenerConfig
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from mpy_blox_tools import mosquitto_passwd
from mpy_blox_tools.errors import MpyBloxError

# amqtt drops a client that sends nothing for its keepalive plus this many seconds.
# MQTT 3.1.1 (3.1.2.10) gives one and a half keepalives: 30 s is that for the devices'
# 60 s, and spares paho, which pings only once a whole keepalive has passed.
DISCONNECT_GRACE_S = 30


class MosquittoPasswordPlugin(BaseAuthPlugin):
    """amqtt plugin: only the users of a Mosquitto password file, with their password."""

    @dataclass
    class Config:
        password_file: str

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self.users = mosquitto_passwd.load(Path(self.config.password_file))

    async def authenticate(self, *, session: Session) -> bool:
        encoded = self.users.get(session.username or "")
        return encoded is not None and mosquitto_passwd.verify(session.password or "", encoded)


class AnyonePlugin(BaseAuthPlugin):
    """amqtt plugin: anyone may connect, as with Mosquitto's `allow_anonymous true`.

    amqtt's own AnonymousAuthPlugin marks every session anonymous, and amqtt then keeps
    no messages for an anonymous client that asked for a persistent session (clean
    session false) while it is away; Mosquitto keeps them, and so does this.
    """

    async def authenticate(self, *, session: Session) -> bool:
        return True


def broker_config(
    retained_dir: Path, port: int, bind: str, password_file: Path | None
) -> BrokerConfig:
    """One TCP listener, retained messages in `retained_dir`, and who may connect."""
    auth = (
        {f"{__name__}.MosquittoPasswordPlugin": {"password_file": str(password_file)}}
        if password_file
        else {f"{__name__}.AnyonePlugin": {}}
    )
    host = f"[{bind}]" if ":" in bind else bind
    return BrokerConfig(
        listeners={"default": ListenerConfig(bind=f"{host}:{port}")},
        timeout_disconnect_delay=DISCONNECT_GRACE_S,
        plugins={
            **auth,
            "mpy_blox_tools.retained_store.RetainedStorePlugin": {"directory": str(retained_dir)},
        },
    )


async def serve(config: BrokerConfig, on_started=None) -> None:
    """Run the broker until SIGINT or SIGTERM, then shut it down with everything saved."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    broker = Broker(config)
    try:
        await broker.start()
    except BrokerError as e:
        raise MpyBloxError(f"amqtt did not start: {e.__cause__ or e}") from e
    if on_started:
        on_started()
    await stop.wait()
    await broker.shutdown()


def run_embedded_broker(directory: Path, port: int, bind: str, password_file: Path | None) -> int:
    """`mpy-blox broker --engine amqtt`: in the foreground, retained messages in `directory`."""
    if password_file:
        mosquitto_passwd.load(password_file)  # a bad file is an error now, not at login
    retained_dir = directory.resolve() / "retained"
    try:  # there before the line that names it, and a bad --dir is one line now
        retained_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MpyBloxError(f"{retained_dir}: cannot keep retained messages there ({e})") from None
    config = broker_config(retained_dir, port, bind, password_file)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)  # a line per state change

    def started() -> None:
        print(
            f"mpy-blox: amqtt (embedded broker) on mqtt://{bind}:{port}, "
            f"retained messages kept in {retained_dir}",
            flush=True,
        )

    asyncio.run(serve(config, started))
    print(f"mpy-blox: broker stopped; retained messages saved in {retained_dir}", flush=True)
    return 0
