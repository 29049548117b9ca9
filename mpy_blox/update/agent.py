# The update agent: accepts update lists inside the running app.
#
# The runtime calls `await start(client, config, node)` once MQTT is up. Lists
# arrive on mpypi/channels/{update.channel} and mpypi/nodes/{id}/cmd; their
# handlers only queue the payload (a handler runs in the client's receive
# loop). One worker task accepts a list (signature, seq), commits the seq and
# the pending install to NVS (record.set_pending) and resets: the next boot is
# an *install boot* (mpy_blox.update.installboot) that fetches the retained list
# again, downloads and installs with the app's heap free. Nothing is installed
# here: a busy 100 KB heap has no room for the install core, and one way to
# install is easier to trust.
#
# Heap: the runtime imports this module at boot; the list format is imported
# only when a list arrives.
import asyncio
import gc
import os

from mpy_blox.log import get_logger
from mpy_blox.topics import PREFIX, channel_topic, list_to, node_topic
from mpy_blox.update import record

_MAX_LIST = const(16384)  # manifest.MAX_LIST_BYTES
_HEAP_TRIES = const(3)  # a list that met a MemoryError is tried again this many times

log = get_logger("update")


async def start(client, config, node, hold=None):
    """hold: an asyncio.Event set when a trial confirmed; lists wait for it."""
    agent = Agent(client, config, node, hold)
    await agent.start()
    return agent


class Agent:
    def __init__(self, client, config, node, hold=None):
        self.client = client
        # During a trial a list waits: installing it would confirm the set on
        # trial unproven, and a rollback resets anyway (the list is retained).
        self.hold = hold
        self.node = node
        self.config = config
        self.channel = config.get_str("update.channel", "stable")
        self.auto = config.get_bool("update.auto_update", True)
        self.pending = {}  # topic suffix -> (payload, retained): one per topic
        self.wake = asyncio.Event()
        self.seq = 0
        self.last = None
        self.install_now = False  # install the channel's list even without auto_update

    async def start(self):
        self.seq = record.nvs_seq()
        self.last = await self._settle(record.load_last())
        if record.pending()[0]:
            # The install boot did not run (it could not be imported): say so
            # once, and let the seq mark the list done so it is not retried.
            log.error("an install boot was due but did not run")
            self.last = record.save_last(
                "failed", self.seq or None, "install boot did not run", record.pending_digest()
            )
            record.set_pending(0, 0)
        self._trust_mode()
        self._refresh_info()
        asyncio.create_task(self._worker())
        await self.client.subscribe(channel_topic(self.channel), self._on_list)
        await self.client.subscribe(node_topic(self.node.device_id, "cmd"), self._on_list)
        await self.node.publish_info()

    async def install_channel(self):
        """Install the channel's current list now, even with update.auto_update false
        (Home Assistant's install, mpy_blox/hass/update.py). Subscribing again makes
        the broker send the retained list again (MQTT 3.1.1, 3.8.4)."""
        log.info("install of the channel's list requested")
        self.install_now = True
        await self.client.subscribe(channel_topic(self.channel), self._on_list)

    # -- persistent state ------------------------------------------------------

    async def _settle(self, last):
        # The outcome of the last trial, once: trial.settle (loaded for it).
        if self.hold is not None:
            return last  # on trial: the trial decides
        try:
            os.stat("/.mpypi/rollback")  # mpypi_recover.ROLLBACK, asked by stat
        except OSError:
            if (last or {}).get("result") != "trial":
                return last
        import sys

        from mpy_blox.update import trial

        last = await trial.settle(self.node, last or {})
        sys.modules.pop("mpy_blox.update.trial", None)
        return last

    def _refresh_info(self, available=None, reread=True):
        record.info(self.node, self.seq, self.last, available, reread)

    def _trust_mode(self):
        # info.trust, once at the start; trust is dropped again until a list comes.
        import sys

        from mpy_blox import update
        from mpy_blox.update import trust

        self.node.info_extra["trust"] = trust.mode(self.config)
        sys.modules.pop("mpy_blox.update.trust", None)
        del update.trust

    # -- lists -------------------------------------------------------------------

    async def _on_list(self, msg):
        if msg.size == 0:
            return  # a retained list was cleared
        try:
            payload = await msg.read_buffer(_MAX_LIST)
        except ValueError:
            payload = b""  # refused by decode as malformed
        except MemoryError:
            # No room for it at this moment (a busy app): the worker fetches the
            # retained copy again once the heap had a breath (None: to refetch).
            payload = None
        self.pending[list_to(msg.topic)] = (payload, msg.retain)
        self.wake.set()

    async def _again(self, to, payload, retained):
        # The list once more: queued again, or, if it could not even be read,
        # fetched again: subscribing anew makes the broker send its retained
        # copy (MQTT 3.1.1, 3.8.4; every publisher retains its lists).
        if payload is not None:
            self.pending[to] = (payload, retained)
            return
        try:
            await self.client.subscribe(PREFIX + to, self._on_list)
        except Exception as e:  # noqa: BLE001  (offline: the reconnect resubscribes)
            log.warning("cannot fetch the list on %s again: %r", to, e)

    async def _worker(self):
        if self.hold is not None:
            await self.hold.wait()
        tries = 0
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                to, (payload, retained) = self.pending.popitem()
                now = self.install_now and to.startswith("channels/")
                error = None
                gc.collect()  # the garbage of other tasks (hass's JSON) out of the way
                try:
                    if payload is None:
                        raise MemoryError("no heap to read the list")
                    await self._handle(payload, to, retained)
                except ValueError as e:  # InvalidUpdate: a short reason for status
                    error = str(e)
                except MemoryError as e:
                    # A busy app's heap (Home Assistant announcing, user code) is short
                    # for a moment: try again soon, unless a newer list came meanwhile.
                    # Accepting twice is safe: a power cut between its writes and the
                    # reset leaves the same state, and the retained list comes again.
                    if tries < _HEAP_TRIES and to not in self.pending:
                        tries += 1
                        log.warning("out of heap for the list on %s: try %d soon", to, tries)
                        gc.collect()
                        await asyncio.sleep_ms(300 * tries)
                        if to not in self.pending:  # else a newer list came meanwhile
                            await self._again(to, payload, retained)
                        continue
                    log.exception("update failed", e)
                    error = repr(e)[:100]
                except Exception as e:  # noqa: BLE001  (the agent must stay up for a fix)
                    log.exception("update failed", e)
                    error = repr(e)[:100]
                tries = 0
                if now:  # one list per request
                    self.install_now = False
                try:
                    if error is not None:
                        await self._failed(error)
                except Exception as e:  # noqa: BLE001  (out of heap, even to report it)
                    log.exception("cannot report the failure", e)
                gc.collect()

    async def _failed(self, error):
        # Reported in status only: last_update (and its flash write) is for
        # what an install boot did. A junk list retained on a topic is refused
        # again at every reconnect, and must not cost a flash write each time,
        # nor overwrite the last real outcome.
        log.error("update refused or failed: %s", error)
        await record.status(self.node, "failed", error=error)

    async def _handle(self, payload, to, retained):
        from mpy_blox.update import manifest
        from mpy_blox.update import trust as trusted
        from mpy_blox.update.paths import InvalidUpdate

        got = manifest.decode(payload, trusted.trust(self.config), to)
        seq = got.seq
        digest = record.digest(payload)
        last = self.last or {}
        # Finished, ok or failed: last_update says so, or NVS if it could not;
        # NVS also knows the last list finished from each topic (a keyless
        # device with a retained cmd list and a different channel list).
        finished = last.get("list") == digest or record.finished(digest)
        if seq is not None:
            finished = finished or last.get("at") == seq
            if seq < self.seq and retained:
                # An older list still retained on its topic (a channel list
                # after a newer cmd list, say): superseded, not a failure.
                log.info("list seq %d on %s superseded: device at %d", seq, to, self.seq)
                return
            if seq < self.seq or (seq == self.seq and finished and not retained):
                raise InvalidUpdate(
                    "replayed or older list: seq %d, device at %d" % (seq, self.seq)
                )
            if seq == self.seq and finished:
                log.info("list seq %d seen again: already done", seq)  # tests wait for it
                return  # the retained list already installed: nothing to publish
        elif retained and finished:
            log.info("list seen again: already done")
            return  # the same unsigned list, seen again after a (re)connect
        trusted.check_expires(got, trusted.now())
        if to.startswith("channels/") and not self.auto and not self.install_now:
            self._refresh_info(seq, False)  # nothing installed since the boot
            await self.node.publish_info()
            return
        # Accepted. A key rotation first (a cut after it leaves the list to be
        # accepted again, by the key it made current); then the seq (no replay
        # after this) and the install boot to come, in NVS; RAM follows NVS.
        # The install boot fetches the retained list again, so nothing is
        # written to flash on this busy heap.
        trusted.note(self.config, got)
        new = seq is not None and seq > self.seq
        record.set_pending(
            record.CMD if to.endswith("/cmd") else record.CHANNEL, 0, seq if new else None, digest
        )
        if new:
            self.seq = seq
        await record.status(self.node, "rebooting", seq=seq, install_boot=True)
        log.info("update accepted: resetting into the install boot")
        import machine

        machine.reset()
