"""The embedded MQTT broker: amqtt, for `mpy-blox broker` on a workstation without Mosquitto.

It listens on one plain-TCP address, keeps retained messages on disk across restarts
(`retained_store`), and with a password file admits only the users of a
`mosquitto_passwd` file and applies a Mosquitto ACL file to them (`mosquitto_acl`), the
same files Mosquitto reads. amqtt 0.12 has neither a packet size limit nor an ACL that
covers retained messages and wills; `Broker` below adds both:

- a packet larger than `max_packet_size` ends its connection before its body is read
  (`LimitedReader`, as Mosquitto's `max_packet_size`);
- retained messages sent for a subscription pass the ACL's read check one by one
  (amqtt checks only live messages), and a will on a topic the client may not write
  is refused at CONNECT (amqtt would publish it unchecked), as Mosquitto does;
- a client that connects gets retained messages for its own subscriptions only
  (amqtt sends those of every client's filters), and a SUBSCRIBE from another client
  meanwhile no longer kills its session (`SnapshotDict`).

A session with clean-session false keeps QoS 1 messages for its absent client, but in
memory only: after a restart a device subscribes again, as it does after every
reconnect. SIGINT and SIGTERM stop it cleanly, after the last retained message is on
disk.

amqtt is an optional dependency (the `broker` extra): import this module only to run it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker, BrokerContext
from amqtt.contexts import Action, BrokerConfig, ListenerConfig
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from mpy_blox_tools import mosquitto_acl, mosquitto_passwd
from mpy_blox_tools.errors import MpyBloxError

# amqtt drops a client that sends nothing for its keepalive plus this many seconds.
# MQTT 3.1.1 (3.1.2.10) gives one and a half keepalives: 30 s is that for the devices'
# 60 s, and spares paho, which pings only once a whole keepalive has passed.
DISCONNECT_GRACE_S = 30

log = logging.getLogger("mpy_blox.broker")


class MosquittoPasswordPlugin(BaseAuthPlugin):
    """amqtt plugin: only the users of a Mosquitto password file, with their password."""

    @dataclass
    class Config:
        password_file: str
        acl_file: str | None = None

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self.users = mosquitto_passwd.load(Path(self.config.password_file))
        self.acl = mosquitto_acl.load(Path(self.config.acl_file)) if self.config.acl_file else None

    async def authenticate(self, *, session: Session) -> bool:
        encoded = self.users.get(session.username or "")
        if encoded is None or not mosquitto_passwd.verify(session.password or "", encoded):
            return False
        will = session.will_topic if session.will_flag else None
        user = session.username
        if self.acl and will and not self.acl.may_publish(user, session.client_id, will):
            log.warning(
                "%s (user %s): refused, its will is on %s, which it may not write",
                session.client_id, session.username, will,
            )  # fmt: skip
            return False
        return True


class MosquittoAclPlugin(BaseTopicPlugin):
    """amqtt plugin: who may publish, subscribe and receive what, from a Mosquitto ACL file."""

    @dataclass
    class Config:
        acl_file: str

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self.acl = mosquitto_acl.load(Path(self.config.acl_file))

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or not topic:
            return False
        user, client_id = session.username, session.client_id
        if action == Action.PUBLISH:
            allowed = self.acl.may_publish(user, client_id, topic)
        elif action == Action.SUBSCRIBE:
            allowed = self.acl.may_subscribe(user, client_id, topic)
        elif action == Action.RECEIVE:
            return self.acl.may_receive(user, client_id, topic)
        else:
            return False
        if not allowed:
            log.info("%s (user %s): may not %s %s", client_id, user, action, topic)
        return allowed


class AnyonePlugin(BaseAuthPlugin):
    """amqtt plugin: anyone may connect, as with Mosquitto's `allow_anonymous true`.

    amqtt's own AnonymousAuthPlugin marks every session anonymous, and amqtt then keeps
    no messages for an anonymous client that asked for a persistent session (clean
    session false) while it is away; Mosquitto keeps them, and so does this.
    """

    async def authenticate(self, *, session: Session) -> bool:
        return True


class LimitedReader(ReaderAdapter):
    """A connection's reader that ends it at a packet over `limit` bytes, header included.

    It follows MQTT's framing in the bytes amqtt reads (amqtt reads the fixed header
    a byte at a time, then exactly the rest of the packet), so the size is known from
    the remaining-length field before any of the body is read: an oversize packet
    costs the broker nothing. Its end is an EOF to amqtt, which then closes the
    connection and publishes the client's will, as Mosquitto does.
    """

    def __init__(self, inner: ReaderAdapter, limit: int, peer: str) -> None:
        self.inner = inner
        self.limit = limit
        self.peer = peer
        self.header: list[int] = []  # the fixed header read so far
        self.body = 0  # bytes of the current packet's body still to come

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        i = 0
        while i < len(data):
            if self.body:  # inside a packet's body: skip what of it this read holds
                take = min(self.body, len(data) - i)
                self.body -= take
                i += take
                continue
            self.header.append(data[i])
            i += 1
            if len(self.header) == 1 or self.header[-1] & 0x80:
                continue  # the type byte, or a remaining-length byte with more to come
            remaining = sum((b & 0x7F) << (7 * k) for k, b in enumerate(self.header[1:]))
            size = len(self.header) + remaining
            self.header = []
            if size > self.limit:
                log.warning(
                    "%s sent a packet of %d bytes (limit %d, --max-packet-size): disconnected",
                    self.peer, size, self.limit,
                )  # fmt: skip
                self.feed_eof()
                return b""
            self.body = remaining
        return data

    def feed_eof(self) -> None:
        self.inner.feed_eof()


class SnapshotDict(dict):
    """A dict whose iteration walks a copy of its keys. amqtt 0.12 walks its
    subscriptions (`for topic in self._subscriptions`, with an `await` in the body)
    as a client connects; a SUBSCRIBE handled meanwhile added a key, and the
    RuntimeError it raised ended that client's session after its CONNACK: connected,
    never answered again."""

    def __iter__(self):
        return iter(list(dict.keys(self)))


class LimitedBroker(Broker):
    """amqtt's broker with a packet size limit, the ACL applied to retained messages, and
    the login checked before a client id can touch a session."""

    def __init__(
        self, config: BrokerConfig, max_packet_size: int, logins_by_name: bool = False
    ) -> None:
        super().__init__(config)
        self._subscriptions = SnapshotDict()
        self.max_packet_size = max_packet_size
        self.logins_by_name = logins_by_name  # a password file: client id = user name

    async def stream_connected(self, reader, writer, listener_name: str) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        limited = LimitedReader(
            StreamReaderAdapter(reader), self.max_packet_size, f"{host}:{port}"
        )
        await self.external_connected(limited, StreamWriterAdapter(writer), listener_name)

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
        # amqtt 0.12 looks the CONNECT's client id up, and for a clean session deletes
        # the session of that id (a connected device's subscriptions included), before
        # it checks the password: anyone could cut a device off from its commands by
        # connecting with its id. Here the login comes first; with a password file a
        # client's id is then its user name (Mosquitto's use_username_as_clientid), so
        # no account takes over another's session. The rest is amqtt's own.
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except (AMQTTError, NoDataError) as e:
            raise AMQTTError(e) from e
        except MQTTError:
            await writer.close()
            raise
        if self.logins_by_name:
            if not await self._authenticate(session, None):
                session.client_id = session.client_id or "<refused>"
                handler.attach(session, reader, writer)
                await handler.mqtt_connack_authorize(False)
                await writer.close()
                raise AMQTTError(f"{remote_address}:{remote_port}: login refused")
            session.client_id = session.username
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive"):
                setattr(existing, name, getattr(session, name))
            existing.username, existing.password = session.username, session.password
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        grace = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(grace, int):
            session.keep_alive += grace
        return handler, session

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        # amqtt 0.12 sends retained messages for a new subscription, and on a
        # persistent session's return for *every* client's filters, without the read
        # check it applies to live messages: filter them here, one by one, for the
        # filters this session holds (a client that just connected holds none unless
        # its persistent session came back with them).
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        handler = self._get_handler(session)
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter) or handler is None:
                continue
            if await self._topic_filtering(session, topic, Action.RECEIVE):
                qos_out = min(qos, retained.qos or qos)
                sends.append(handler.mqtt_publish(topic, retained.data, qos_out, retain=True))
        if sends:  # all at once and all awaited, as amqtt does
            await asyncio.gather(*sends, return_exceptions=True)


def broker_config(
    retained_dir: Path,
    port: int,
    bind: str,
    password_file: Path | None,
    acl_file: Path | None = None,
) -> BrokerConfig:
    """One TCP listener, retained messages in `retained_dir`, and who may do what."""
    if password_file:
        auth = {
            f"{__name__}.MosquittoPasswordPlugin": {
                "password_file": str(password_file),
                "acl_file": str(acl_file) if acl_file else None,
            }
        }
        if acl_file:
            auth[f"{__name__}.MosquittoAclPlugin"] = {"acl_file": str(acl_file)}
    else:
        auth = {f"{__name__}.AnyonePlugin": {}}
    host = f"[{bind}]" if ":" in bind else bind
    return BrokerConfig(
        listeners={"default": ListenerConfig(bind=f"{host}:{port}")},
        timeout_disconnect_delay=DISCONNECT_GRACE_S,
        plugins={
            **auth,
            "mpy_blox_tools.retained_store.RetainedStorePlugin": {"directory": str(retained_dir)},
        },
    )


async def serve(
    config: BrokerConfig, max_packet_size: int, on_started=None, *, logins_by_name: bool = False
) -> None:
    """Run the broker until SIGINT or SIGTERM, then shut it down with everything saved."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    broker = LimitedBroker(config, max_packet_size, logins_by_name)
    try:
        await broker.start()
    except BrokerError as e:
        raise MpyBloxError(f"amqtt did not start: {e.__cause__ or e}") from e
    if on_started:
        on_started()
    await stop.wait()
    await broker.shutdown()


def run_embedded_broker(
    directory: Path,
    port: int,
    bind: str,
    password_file: Path | None,
    acl_file: Path | None,
    max_packet_size: int,
) -> int:
    """`mpy-blox broker --engine amqtt`: in the foreground, retained messages in `directory`."""
    if password_file:
        mosquitto_passwd.load(password_file)  # a bad file is an error now, not at login
    if acl_file:
        mosquitto_acl.load(acl_file)
    retained_dir = directory.resolve() / "retained"
    try:  # there before the line that names it, and a bad --dir is one line now
        retained_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MpyBloxError(f"{retained_dir}: cannot keep retained messages there ({e})") from None
    config = broker_config(retained_dir, port, bind, password_file, acl_file)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)  # a line per state change

    def started() -> None:
        print(
            f"mpy-blox: amqtt (embedded broker) on mqtt://{bind}:{port}, "
            f"retained messages kept in {retained_dir}"
            + (f", ACL {acl_file}" if acl_file else ""),
            flush=True,
        )

    asyncio.run(serve(config, max_packet_size, started, logins_by_name=bool(password_file)))
    print(f"mpy-blox: broker stopped; retained messages saved in {retained_dir}", flush=True)
    return 0
