# The app's MQTT client. One supervisor task connects and reconnects forever,
# with exponential backoff and jitter. While a connection is up, two more tasks
# run beside it and are cancelled with it:
#   receive: reads packets and runs the handlers, one message at a time;
#   watch:   sends PINGREQ, and declares the connection dead when reads starve
#            or the Wi-Fi station is down.
# Every wait for an answer (SUBACK, PUBACK, ...) ends when the answer comes or
# when the connection is lost: the watch task is the only clock.
import asyncio
import random
import time
from micropython import const

from mpy_blox.log import get_logger
from mpy_blox.mqtt import dial, packet
from mpy_blox.mqtt.errors import MQTTError, ProtocolError, SubscribeError
from mpy_blox.mqtt.message import Message
from mpy_blox.mqtt.topic import check_filter, matches, respelled

_STABLE_MS = const(30000)  # a connection that lasted this long resets the backoff
_MAX_TOPIC = const(512)  # longer topics are refused: the topic string is held in RAM
_MAX_INFLIGHT = const(16)  # packets awaiting an answer; bounds the waiter table
_NETWORK_POLL_MS = const(500)

log = get_logger("mqtt")


def _why(e):
    return "%s: %s" % (type(e).__name__, e)


class MQTTClient:
    def __init__(
        self,
        client_id,
        server,
        port=1883,
        *,
        user=None,
        password=None,
        keepalive_s=60,
        clean_session=True,
        will=None,
        ssl=False,
        ssl_params=None,
        ssl_insecure=False,
        backoff_min_ms=1000,
        backoff_max_ms=60000,
        buffer_size=1024,
    ):
        if not 0 <= keepalive_s <= 65535:
            raise ValueError("keepalive_s out of range")
        self._id = client_id
        self._server = server
        self._port = port
        self._user = user
        self._password = password
        self._keepalive_ms = keepalive_s * 1000
        self._clean = clean_session
        self._will = will
        self._ssl = ssl
        self._ssl_params = ssl_params or {}
        self._ssl_insecure = ssl_insecure
        if ssl and not ssl_insecure and not self._ssl_params.get("ca_file"):
            raise ValueError(dial.NO_CA)  # now, not as a connect failure retried forever
        self._ssl_context = None
        self._backoff_min_ms = backoff_min_ms
        self._backoff_max_ms = backoff_max_ms
        self._buffer_size = buffer_size
        self._subs = []  # [filter, handler, qos] in registration order
        self._callbacks = []
        self._waiters = {}  # packet id -> [Event or None, result]
        self._pid = 0
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._reason = None
        self._conn = None
        self._task = None
        self._receiver = None
        self._wlan = None

    # -- the app's API -------------------------------------------------------

    @property
    def is_connected(self):
        """True while connected, once the subscriptions are in place."""
        return self._up.is_set()

    @property
    def can_publish(self):
        """True from the CONNACK on: handlers of the retained messages that come with
        the subscriptions publish before is_connected says so."""
        return self._linked()

    async def connected(self):
        """Return once connected and subscribed (at once if so now)."""
        await self._up.wait()

    async def disconnected(self):
        """Return once the current connection is lost (at once if not connected)."""
        if self._conn is not None:
            await self._lost.wait()

    def add_connect_callback(self, callback):
        """`await callback()` after every (re)connect, once subscriptions are re-sent."""
        self._callbacks.append(callback)

    def start(self):
        """Start connecting, in the background, and keep connected until stop()."""
        if self._task is None:
            self._wlan = dial.station()
            self._task = asyncio.create_task(self._run())

    async def stop(self):
        """Disconnect cleanly (no will is published) and end the background tasks."""
        task, self._task = self._task, None
        if task is None:
            return
        if self._linked():
            try:
                await self._conn.send(packet.BYE)
            except OSError:
                pass  # the connection was going anyway
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def subscribe(self, topic_filter, handler, qos=1):
        """Route messages matching topic_filter to `async def handler(msg)`.

        Kept across reconnects. When connected, waits for the SUBACK (except in a
        handler, where waiting would stall the receive loop that brings it).
        """
        check_filter(topic_filter)
        if qos not in (0, 1):
            raise ValueError("QoS 0 or 1")
        for sub in self._subs:
            if sub[0] == topic_filter:
                sub[1], sub[2] = handler, qos
                break
        else:
            self._subs.append([topic_filter, handler, qos])
        if self._linked():
            pid = self._next_pid()
            code = await self._request(pid, packet.subscribe(pid, topic_filter, qos))
            if code == packet.SUBACK_FAILURE:
                self._forget(topic_filter)
                raise SubscribeError("subscription to %s refused by the broker" % topic_filter)

    async def unsubscribe(self, topic_filter):
        self._forget(topic_filter)
        if self._linked():
            pid = self._next_pid()
            await self._request(pid, packet.unsubscribe(pid, topic_filter))

    async def publish(self, topic, payload, retain=False, qos=0):
        """Publish payload (bytes or str). QoS 1 waits for the PUBACK (not in a handler).

        Raises MQTTError at once when disconnected: nothing is queued.
        """
        if isinstance(payload, str):
            payload = payload.encode()
        if qos not in (0, 1):
            raise ValueError("QoS 0 or 1")
        if "+" in topic or "#" in topic or not topic:
            raise ValueError("bad topic to publish to: %r" % topic)
        if not qos:
            head = packet.publish_header(topic, len(payload), 0, retain, False, 0)
            conn = self._live()
            try:
                await conn.send(head, payload)
            except OSError as e:
                self._lose(e)  # see _request
                raise
            return
        pid = self._next_pid()
        head = packet.publish_header(topic, len(payload), 1, retain, False, pid)
        await self._request(pid, head, payload)

    # -- requests and their answers ------------------------------------------

    def _linked(self):
        # A connection is up (CONNACK received), though perhaps not yet re-subscribed.
        return self._conn is not None and not self._lost.is_set()

    def _live(self):
        if not self._linked():
            raise MQTTError("not connected")
        return self._conn

    def _next_pid(self):
        while True:
            self._pid = self._pid % 65535 + 1
            if self._pid not in self._waiters:
                return self._pid

    async def _request(self, pid, data, payload=None):
        # Send a packet that the broker answers, and wait for the answer.
        conn = self._live()
        if len(self._waiters) >= _MAX_INFLIGHT:
            raise MQTTError("too many packets awaiting an answer")
        # In a handler the answer cannot arrive before the handler returns: the
        # receive task runs it. Send, and let _resolve() take the answer later.
        wait = asyncio.current_task() is not self._receiver
        waiter = self._waiters[pid] = [asyncio.Event() if wait else None, None]
        try:
            await conn.send(data, payload)
        except Exception as e:
            self._waiters.pop(pid, None)
            if isinstance(e, OSError):
                # A write that fails ends the connection at once (a packet may
                # be half sent): later requests fail as "not connected", and
                # connected() waits for the next connection, rather than for
                # the receive task to notice (it may be busy in a handler).
                self._lose(e)
            raise
        if not wait:
            return None
        await waiter[0].wait()
        if isinstance(waiter[1], Exception):
            raise waiter[1]
        return waiter[1]

    def _resolve(self, pid, result):
        waiter = self._waiters.pop(pid, None)
        if waiter is None:
            log.debug("answer to unknown packet id %d", pid)
        elif waiter[0] is None:
            if result == packet.SUBACK_FAILURE:
                log.error("a subscription sent from a handler was refused")
        else:
            waiter[1] = result
            waiter[0].set()

    def _forget(self, topic_filter):
        self._subs = [s for s in self._subs if s[0] != topic_filter]

    def _lose(self, reason):
        # The connection is dead: wake everyone who waits on it, once.
        if self._lost.is_set():
            return
        self._up.clear()  # now: connected() waits for the next connection
        self._reason = reason
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if waiter[0] is not None:
                waiter[1] = MQTTError("connection lost: %s" % reason)
                waiter[0].set()
        self._lost.set()

    # -- the supervisor ------------------------------------------------------

    async def _run(self):
        failures = 0
        while True:
            await self._wait_for_network()
            try:
                conn = await self._connect()
            except Exception as e:  # the supervisor: anything but cancellation retries
                log.warning("connecting to %s:%d failed (%s)", self._server, self._port, _why(e))
                failures += 1
                await self._backoff(failures)
                continue
            began = time.ticks_ms()
            await self._session(conn)
            log.warning("disconnected (%s)", _why(self._reason))
            if time.ticks_diff(time.ticks_ms(), began) >= _STABLE_MS:
                failures = 0
            failures += 1
            await self._backoff(failures)

    async def _backoff(self, failures):
        delay = min(self._backoff_max_ms, self._backoff_min_ms << min(failures - 1, 16))
        # Half fixed, half random: a fleet that lost its broker does not come back
        # all in the same millisecond.
        half = delay // 2
        await asyncio.sleep_ms(half + (random.getrandbits(10) * half >> 10))

    def _network_down(self):
        return dial.network_down(self._wlan)

    async def _connect(self):
        ctx = None
        if self._ssl:
            if self._ssl_context is None:  # built once: parsing the CA costs time and heap
                self._ssl_context = dial.ssl_context(self._ssl_params, self._ssl_insecure)
            ctx = self._ssl_context
        hello = packet.connect(
            self._id,
            self._user,
            self._password,
            self._keepalive_ms // 1000,
            self._clean,
            self._will,
        )
        return await dial.dial(
            self._server,
            self._port,
            ctx,
            self._ssl_params.get("server_hostname"),
            self._buffer_size,
            hello,
        )

    async def _wait_for_network(self):
        if self._network_down():
            log.info("waiting for the network")
            while self._network_down():
                await asyncio.sleep_ms(_NETWORK_POLL_MS)

    async def _session(self, conn):
        self._conn = conn  # from here publish() works: handlers of retained messages may
        self._lost = asyncio.Event()  # publish while the subscriptions are re-sent
        self._reason = None
        self._receiver = asyncio.create_task(self._receive(conn))
        watcher = asyncio.create_task(self._watch(conn))
        try:
            log.info("connected to %s:%d", self._server, self._port)
            await self._resubscribe()
            if not self._lost.is_set():  # else lost meanwhile: connected() must wait
                self._up.set()
            for callback in self._callbacks:
                try:
                    await callback()
                except Exception as e:
                    if self._lost.is_set():
                        break
                    log.exception("connect callback failed", e)
            await self._lost.wait()
        except Exception as e:
            self._lose(e)
        finally:
            self._up.clear()
            self._receiver.cancel()
            watcher.cancel()
            self._receiver = self._conn = None
            conn.close()
            self._lose(MQTTError("stopped"))  # if stop() cancelled us, waiters still wake

    async def _resubscribe(self):
        # All SUBSCRIBEs first, then the answers: retained messages arrive between
        # them and are handled meanwhile by the receive task.
        pending = []
        for topic_filter, _, qos in list(self._subs):
            pid = self._next_pid()
            pending.append((topic_filter, pid))
            self._waiters[pid] = [asyncio.Event(), None]
            await self._conn.send(packet.subscribe(pid, topic_filter, qos))
        for topic_filter, pid in pending:
            waiter = self._waiters.get(pid)
            if waiter is None:
                continue
            await waiter[0].wait()
            if isinstance(waiter[1], Exception):
                raise waiter[1]
            if waiter[1] == packet.SUBACK_FAILURE:
                log.error("subscription to %s refused by the broker", topic_filter)

    # -- the connection's tasks ----------------------------------------------

    async def _receive(self, conn):
        try:
            while True:
                first, length = await conn.read_header()
                if first >> 4 == packet.PUBLISH:
                    await self._on_publish(conn, first, length)
                    continue
                kind = packet.check_control(first, length)
                body = await conn.read_control(length)
                if kind == packet.CONNACK:
                    raise ProtocolError("CONNACK while connected")
                if kind != packet.PINGRESP:
                    code = body[2] if kind == packet.SUBACK else 0
                    self._resolve(body[0] << 8 | body[1], code)
        except Exception as e:  # the connection's supervisor: log, drop, reconnect
            self._lose(e)

    async def _on_publish(self, conn, first, length):
        qos, retain, dup = packet.check_publish(first, length)
        topic_len = await conn.read_u16()
        size = packet.check_topic(topic_len, length, qos, _MAX_TOPIC)
        raw = bytearray(topic_len)
        await conn.readexactly(memoryview(raw))
        topic = str(raw, "utf-8")
        pid = await conn.read_u16() if qos else 0
        msg = Message(conn, topic, size, qos, retain, dup)
        handler = self._handler(topic)
        if handler is None:
            log.debug("no handler for %s", topic)
        else:
            try:
                await handler(msg)
            except Exception as e:
                if conn.error is not None:
                    raise conn.error  # the connection failed under the handler
                log.exception("handler for %s failed", e, topic)
        await msg.release()
        if qos:
            # Only now: the handler has consumed the payload (or failed on it).
            await conn.send(packet.puback(pid))

    def _handler(self, topic):
        # The first subscription whose filter matches; failing that, an exact
        # one the broker delivered respelled ('.' as '/', RabbitMQ: topic.py).
        # The second pass runs only for a topic nothing else matched.
        for topic_filter, handler, _ in self._subs:
            if matches(topic_filter, topic):
                return handler
        for topic_filter, handler, _ in self._subs:
            if respelled(topic_filter, topic):
                return handler
        return None

    async def _watch(self, conn):
        keepalive = self._keepalive_ms
        period = min(1000, keepalive // 4) if keepalive else 1000
        pinged = time.ticks_ms()
        try:
            while True:
                await asyncio.sleep_ms(period)
                if self._network_down():
                    raise MQTTError("network down")
                if not keepalive:
                    continue
                starved = conn.starved_ms()
                if starved > keepalive:
                    raise MQTTError("no byte from the broker for %d ms" % starved)
                now = time.ticks_ms()
                since_tx = time.ticks_diff(now, conn.tx_ms)
                # Ping when we have been quiet for half the keepalive, or when the
                # broker has been silent that long (whatever we sent: QoS 0
                # publishes get no answer), at most once a half keepalive: only
                # an answer proves the connection alive.
                half = keepalive // 2
                if since_tx >= half or (starved >= half and time.ticks_diff(now, pinged) >= half):
                    await conn.send(packet.PING)
                    pinged = now
        except Exception as e:
            self._lose(e)
