# The update agent: the MQTT glue around the install core (mpy_blox.update.install).
#
# The runtime calls `await start(client, config, node)` once MQTT is up. Lists
# arrive on mpypi/channels/{update.channel} and mpypi/nodes/{id}/cmd; their
# handlers only queue the payload, because a handler runs in the client's
# receive loop and an install must receive packages itself. One worker task
# installs: accept the list (signature, seq), plan, pre-flight, persist the seq
# in NVS, download each package from its retained topic straight to the stage
# (a broken link is retried after the reconnect), stage, commit, reset.
#
# Heap: the runtime imports this module at boot, so it imports the rest lazily:
# the list format when a list arrives, the install core only to install (the
# board resets after an install, which gives that heap back).
import gc
import os
import json
import asyncio

from mpy_blox.log import get_logger

_NVS = "mpypi"
_LAST = "/.mpypi/last.json"
_CHUNK = const(1024)
_PROGRESS_MS = const(1000)  # at most one downloading status a second
_STALL_S = const(30)  # no byte for this long: the package is not on the broker
_RETRIES = const(5)
_MAX_LIST = const(16384)  # manifest.MAX_LIST_BYTES

log = get_logger("update")


async def start(client, config, node):
    agent = Agent(client, config, node)
    await agent.start()
    return agent


def _load_last():
    try:
        with open(_LAST) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _Transfer:
    # One package download; `handler` runs in the client's receive loop.
    def __init__(self, inst, entry):
        self.inst = inst
        self.entry = entry
        self.done = 0
        self.error = None
        self.finished = asyncio.Event()

    async def handler(self, msg):
        if self.finished.is_set():
            return  # a second delivery of the retained package
        size = self.entry["size"]
        if size is not None and msg.size != size:
            from mpy_blox.update.manifest import InvalidUpdate

            self.error = InvalidUpdate("size mismatch: %d bytes published, %d listed"
                                       % (msg.size, size))
            self.finished.set()
            return
        buf = bytearray(_CHUNK)
        mv = memoryview(buf)
        sink = self.inst.download(self.entry)
        try:
            while True:
                n = await msg.readinto(buf)
                if not n:
                    break
                sink.write(mv[:n])
                self.done += n
            sink.close()
            sink.finish()
        except (ValueError, OSError) as e:  # InvalidUpdate is a ValueError
            self.error = e
        finally:
            sink.close()
            self.finished.set()


class Agent:
    def __init__(self, client, config, node):
        self.client = client
        self.node = node
        self.key = config.get_str("update.key") or None
        self.channel = config.get_str("update.channel", "stable")
        self.auto = config.get_bool("update.auto_update", True)
        self.pending = {}  # topic suffix -> (payload, retained): one per topic
        self.wake = asyncio.Event()
        self.seq = 0
        self.last = None
        self.current = None  # the package being worked on, for status

    async def start(self):
        _confirm()
        self.seq = self._nvs_seq()
        self.last = _load_last()
        self._refresh_info()
        asyncio.create_task(self._worker())
        # Topics as manifest.channel_topic/node_topic spell them.
        await self.client.subscribe("mpypi/channels/" + self.channel, self._on_list)
        await self.client.subscribe("mpypi/nodes/%s/cmd" % self.node.device_id, self._on_list)
        await self.node.publish_info()

    # -- persistent state ------------------------------------------------------

    def _nvs_seq(self):
        import esp32

        try:
            return esp32.NVS(_NVS).get_i32("seq")
        except OSError:
            return 0

    def _save_seq(self, seq):
        import esp32

        nvs = esp32.NVS(_NVS)
        nvs.set_i32("seq", seq)
        nvs.commit()
        self.seq = seq

    def _save_last(self, result, seq, error=None):
        self.last = {"result": result, "at": seq}
        if error:
            self.last["error"] = error
        try:
            try:
                os.mkdir("/.mpypi")
            except OSError:
                pass  # it exists
            with open(_LAST, "w") as f:
                json.dump(self.last, f)
        except OSError as e:
            log.warning("cannot write %s: %r", _LAST, e)

    def _refresh_info(self, available=None):
        from mpy_blox.update import state

        extra = self.node.info_extra
        extra["packages"] = {k: v[0] for k, v in state.installed_wheels().items()}
        extra["src"] = state.src_index()
        extra["seq"] = self.seq
        extra["last_update"] = self.last
        if available is not None:
            extra["available"] = available

    # -- lists -------------------------------------------------------------------

    async def _on_list(self, msg):
        if msg.size == 0:
            return  # a retained list was cleared
        try:
            payload = await msg.read(_MAX_LIST)
        except ValueError:
            payload = b""  # refused by decode as malformed
        self.pending[msg.topic[len("mpypi/"):]] = (payload, msg.retain)
        self.wake.set()

    async def _worker(self):
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                to, (payload, retained) = self.pending.popitem()
                self.current = None
                try:
                    await self._handle(payload, to, retained)
                except ValueError as e:  # InvalidUpdate: a short reason for status
                    await self._failed(str(e), self.current)
                except Exception as e:  # noqa: BLE001  (the agent must stay up for a fix)
                    log.exception("update failed", e)
                    await self._failed(repr(e)[:100], self.current)
                gc.collect()

    async def _failed(self, error, package=None):
        log.error("update refused or failed: %s", error)
        self._save_last("failed", None, error)
        self._refresh_info()
        await self.node.publish_info()
        await self._status("failed", error=error, package=package)

    async def _status(self, st, **fields):
        await self.node.publish_status(st, **{k: v for k, v in fields.items() if v is not None})

    async def _handle(self, payload, to, retained):
        from mpy_blox.update import manifest
        from mpy_blox.update.manifest import InvalidUpdate

        seq, entries = manifest.decode_list(payload, self.key, to)
        if seq is not None:
            finished = self.last is not None and self.last.get("at") == seq
            if seq < self.seq or (seq == self.seq and finished and not retained):
                raise InvalidUpdate("replayed or older list: seq %d, device at %d"
                                    % (seq, self.seq))
            if seq == self.seq and finished:
                return  # the retained list already installed: nothing to say
        if to.startswith("channels/") and not self.auto:
            self._refresh_info(available=seq)
            await self.node.publish_info()
            return
        # Imported only now: the install core (zip, deflate, journal) is heap a
        # device needs only while it installs, and it resets afterwards.
        from mpy_blox.update.install import Installer

        inst = Installer()
        needed = inst.plan(entries)
        if seq is not None and seq > self.seq:
            self._save_seq(seq)  # before anything is fetched: no replay after this
        if not needed:
            self._save_last("ok", seq)
            self._refresh_info()
            await self.node.publish_info()
            await self._status("idle")
            return
        inst.preflight(needed)
        try:
            for entry in needed:
                self.current = _label(entry)
                await self._download(inst, entry)
                await self._status("verifying", package=_label(entry))
                inst.stage(entry)
        except BaseException:
            inst.abort()
            raise
        self.current = None
        await self._status("installing")
        inst.commit()
        self._save_last("ok", seq)
        self._refresh_info()
        await self.node.publish_info()
        await self._status("rebooting", seq=seq)
        log.info("update installed: resetting")
        import machine

        machine.reset()

    async def _download(self, inst, entry):
        from mpy_blox.update.manifest import InvalidUpdate, package_topic

        topic = package_topic(entry)
        error = None
        for _ in range(_RETRIES):
            await self.client.connected()
            t = _Transfer(inst, entry)
            try:
                await self.client.subscribe(topic, t.handler)
                await self._follow(t)
            except OSError as e:
                t.error = e
            finally:
                try:
                    await self.client.unsubscribe(topic)
                except OSError:
                    pass  # not connected: a new connection has no subscription
            if t.error is None:
                return
            if isinstance(t.error, InvalidUpdate):
                raise t.error
            error = t.error
            log.warning("download of %s broken (%r): retrying", topic, error)
        raise InvalidUpdate("download failed: %r" % error)

    async def _follow(self, t):
        # Progress from here, not from the handler: a QoS 1 publish waits for
        # its PUBACK, which the handler's receive loop would have to read.
        label = _label(t.entry)
        total = t.entry["size"]
        await self._status("downloading", package=label, done=0, total=total)
        shown = 0
        idle_ms = 0
        while not t.finished.is_set():
            try:
                await asyncio.wait_for_ms(t.finished.wait(), _PROGRESS_MS)
            except asyncio.TimeoutError:
                pass
            if t.finished.is_set():
                break
            if not self.client.is_connected:
                raise OSError("broker connection lost")
            if t.done != shown:
                shown = t.done
                idle_ms = 0
                await self._status("downloading", package=label, done=t.done, total=total)
            else:
                idle_ms += _PROGRESS_MS
                if idle_ms > _STALL_S * 1000:
                    from mpy_blox.update.manifest import InvalidUpdate

                    raise InvalidUpdate("package not on the broker: " + label)


def _confirm():
    # An applied update whose code booted and reached the broker is confirmed:
    # its backups go (docs/protocol.md). The recovery module is dropped again.
    try:
        os.stat("/.mpypi/journal")
    except OSError:
        return
    import sys
    import mpypi_recover

    if mpypi_recover.state() == "applied":
        mpypi_recover.confirm()
    sys.modules.pop("mpypi_recover", None)
    gc.collect()


def _label(entry):
    return entry.get("name") or entry.get("path")
