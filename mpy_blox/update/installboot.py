# The install boot: installs the list the agent left in /.mpypi/pending.
#
# mpy_blox.app.main() runs this instead of the app when the file exists:
# configuration, WLAN, MQTT and the install core only (no user code, no
# supervisor, no idle agent), so a 100 KB heap has room for the deflate window
# and LittleFS's caches. It downloads each package from its retained topic
# straight into the stage, stages, commits, and resets into the new code.
#
# No loop, whatever happens: every outcome removes the pending file before the
# reset, and each start counts itself in NVS first, so an install boot that
# dies (a power cut, a crash) is retried at most _MAX_TRIES times in all.
# A power cut leaves the old or the new set: the journal sees to that.
import gc
import asyncio

from mpy_blox import app
from mpy_blox.log import get_logger
from mpy_blox.update import record

_CHUNK = const(1024)
_PROGRESS_MS = const(1000)  # at most one downloading status a second
_STALL_S = const(30)  # no byte for this long: the package is not on the broker
_RETRIES = const(5)
_MAX_TRIES = const(3)
_MAX_LIST = const(16384)  # manifest.MAX_LIST_BYTES

log = get_logger("update")


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


class InstallBoot:
    def __init__(self, client, node):
        self.client = client  # the started MQTTClient
        self.node = node
        self.current = None  # the package being worked on, for status

    async def status(self, st, qos=1, **fields):
        await record.status(self.node, st, qos, **fields)

    async def fetch_list(self, to):
        """The list retained on mpypi/{to}, as the agent accepted it (or newer)."""
        from mpy_blox.update.manifest import InvalidUpdate

        got = []
        arrived = asyncio.Event()

        async def handler(msg):
            if msg.size and not arrived.is_set():
                try:
                    got.append(await msg.read(_MAX_LIST))
                except ValueError:
                    got.append(b"")  # too long: decode_list refuses it
                arrived.set()

        topic = "mpypi/" + to
        await self.client.subscribe(topic, handler)
        try:
            await asyncio.wait_for(arrived.wait(), _STALL_S)
        except asyncio.TimeoutError:
            raise InvalidUpdate("update list no longer on the broker") from None
        finally:
            try:
                await self.client.unsubscribe(topic)
            except OSError:
                pass  # not connected: nothing subscribed any more
        return got[0]

    async def install(self, entries):
        """Plan, pre-flight, download, stage, commit; True if anything was installed."""
        from mpy_blox.update.install import Installer

        inst = Installer()
        needed = inst.plan(entries)
        if not needed:
            return False
        inst.preflight(needed)
        try:
            for entry in needed:
                self.current = _label(entry)
                await self._download(inst, entry)
                await self.status("verifying", package=self.current)
                inst.stage(entry)
                gc.collect()
        except BaseException:
            inst.abort()
            raise
        self.current = None
        await self.status("installing")
        inst.commit()
        return True

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
        # Progress from here, not from the handler, and at QoS 0: a QoS 1
        # publish waits for its PUBACK, which the receive loop reads only after
        # the package it is streaming; QoS 0 goes out at once.
        label = _label(t.entry)
        total = t.entry["size"]
        status = self.status
        await status("downloading", 0, package=label, done=0, total=total)
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
                await status("downloading", 0, package=label, done=t.done, total=total)
            else:
                idle_ms += _PROGRESS_MS
                if idle_ms > _STALL_S * 1000:
                    from mpy_blox.update.manifest import InvalidUpdate

                    raise InvalidUpdate("package not on the broker: " + label)


async def run(config, mqtt, boot_count):
    """The install boot, from mpy_blox.app once the configuration and MQTT
    module are loaded (mqtt not None); it ends in a reset."""
    import machine
    from mpy_blox.node import Node, device_id

    to, tries = record.pending()
    tries += 1
    record.set_pending(to, tries)  # counted before anything else can fail
    node = app.node = Node(device_id(), config, boot_count)
    node.state = "installing"
    log.info("%s install boot %d (attempt %d)", node.device_id, boot_count, tries)
    error = None
    seq = record.nvs_seq()
    if tries > _MAX_TRIES:
        error = "install boot did not finish in %d attempts" % _MAX_TRIES
        # Before the network, which may be what keeps failing. Named as the
        # agent accepted it, so that the app does not take it up again.
        signed = config.get_str("update.key") and seq or None
        _done(error, signed, record.pending_digest())
    record.info(node, seq, record.load_last())  # before the connect: its info carries it
    await app._wlan_up(config)
    client = app.client = await app._mqtt_up(mqtt, config, node)
    if error is None and (client is None or not client.is_connected):
        log.error("install boot without a broker: retrying after a reset")
        machine.reset()  # counted: after _MAX_TRIES the app boots again
    # The install core after the connection has its buffers (it takes fewer,
    # smaller blocks); without room for it, the next attempt may fare better.
    if error is None and app._import("mpy_blox.update.install") is None:
        log.error("no room for the install core: retrying after a reset")
        machine.reset()  # counted
    ib = InstallBoot(client, node)
    installed = False
    if error is None:
        if to == record.CMD:
            to = "nodes/%s/cmd" % node.device_id
        else:
            to = "channels/" + config.get_str("update.channel", "stable")
        listed = digest = None
        try:
            from mpy_blox.update import manifest

            payload = await ib.fetch_list(to)
            digest = record.digest(payload)
            key = config.get_str("update.key") or None
            listed, entries = manifest.decode_list(payload, key, to)
            payload = None
            if listed is not None:
                if listed < seq:
                    raise manifest.InvalidUpdate("replayed or older list: seq %d, device at %d"
                                                 % (listed, seq))
                if listed > seq:  # a newer list replaced the accepted one: accept it
                    record.set_pending(record.pending()[0], tries, listed, digest)
                    seq = listed
            gc.collect()
            log.info("install boot; free heap %d bytes", gc.mem_free())
            installed = await ib.install(entries)
        except ValueError as e:  # InvalidUpdate: a short reason for status
            error = str(e)
        except Exception as e:  # noqa: BLE001  (report it; the app boots next either way)
            log.exception("install failed", e)
            error = repr(e)[:100]
        _done(error, listed, digest)
    record.info(node, seq, record.load_last())
    await node.publish_info()
    if error is not None:
        log.error("update failed: %s", error)
        await ib.status("failed", error=error, package=ib.current)
    elif installed:
        log.info("update installed: resetting")
        await ib.status("rebooting", seq=listed)
    else:
        await ib.status("idle")
    machine.reset()


def _done(error, seq=None, digest=None):
    # last_update names the list (seq and digest) even when it failed, so the
    # retained copy is not taken up again: a new list (a new seq) is needed.
    # Then nothing is pending: the next boot is the app's.
    record.save_last("failed" if error else "ok", seq, error, digest)
    record.set_pending(0, 0)


def _label(entry):
    return entry.get("name") or entry.get("path")
