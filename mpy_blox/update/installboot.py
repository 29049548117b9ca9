# The install boot: installs the list the agent accepted before the reset.
#
# mpy_blox.app runs this instead of the app while an install is pending
# (record.pending()): WLAN, MQTT and the install core only (no user
# code, no supervisor, no agent), through the boot steps the two boots share
# (mpy_blox.startup). Three phases, each in its own run of the asyncio loop
# (mpy_blox.app.main):
#
#   download()  online: fetch the retained list again, download each package
#               from its retained topic straight into the stage (its size and
#               SHA256 checked), publish "installing", hang up;
#   commit()    offline, with the MQTT client's modules dropped: stage (the
#               wheel decoder, RECORD checks) and commit. The loop in between
#               is what lets their heap go: asyncio keeps a task that was
#               cancelled or awaited while asleep reachable until its loop
#               ends, and with it the stopped client;
#   report()    the install core dropped, the client back: info and status
#               (rebooting, failed or idle), then the reset.
#
# A firmware entry (mpy_blox.update.firmware) is downloaded first, straight into
# the next OTA partition; commit() writes the packages' journal bound to that
# partition (applied by boot recovery once it runs), then set_boot is the switch
# (docs/protocol.md, "Firmware").
#
# No loop: each start counts itself in NVS first and every outcome clears
# the pending topic, so an install boot that dies (power cut, crash) runs at most
# _MAX_TRIES times. A power cut leaves the old or the new set (the journal).
import gc
import sys

from mpy_blox import startup
from mpy_blox.log import get_logger
from mpy_blox.topics import channel_topic, list_to, node_topic
from mpy_blox.update import record
from mpy_blox.update.fetch import Fetcher

_MAX_TRIES = const(3)

log = get_logger("update")


class InstallBoot:
    def __init__(self, config, boot_count):
        from mpy_blox.node import Node, device_id

        self.config = config
        self.to, self.tries = record.pending()
        self.tries += 1
        record.set_pending(self.to, self.tries)  # counted before anything else can fail
        node = self.node = Node(device_id(), config, boot_count)
        node.state = "installing"
        if config.get_bool("hass.enabled", False):
            # Home Assistant's update entity shows the progress: this module
            # alone, not the rest of mpy_blox.hass.
            from mpy_blox.hass import progress

            progress.hook(node)
        log.info("%s install boot %d (attempt %d)", node.device_id, boot_count, self.tries)
        self.seq = record.nvs_seq()
        self.listed = self.digest = None  # the list being installed: its seq and SHA256
        self.trust = self.now = None  # what it is checked with (a manifest.Trust), the time
        self.error = None  # the short reason of a failure, for status
        self.package = None  # the package it concerns
        self.inst = None  # the Installer holding the downloads
        self.installed = False
        self.firmware = None  # a firmware list: the partition its image boots from
        self.target = None  # and the image written there, to set_boot (firmware.Target)
        self.finished = False  # last_update written, nothing pending

    async def download(self):
        """Phase 1: fetch the list and download what it needs; then hang up."""
        import machine

        config, node = self.config, self.node
        if self.tries > _MAX_TRIES:
            self.error = "install boot did not finish in %d attempts" % _MAX_TRIES
            # Before the network, which may be what keeps failing. Named as the
            # agent accepted it, so that the app does not take it up again.
            from mpy_blox.update.trust import signed

            listed = signed(config) and self.seq or None
            self.finish_list(listed, record.pending_digest())
        record.info(node, self.seq, record.load_last())  # before the connect: its info carries it
        # What the list is checked with, and the time, now: the trust policy's
        # code goes back to the heap before the connection and the install core
        # take their blocks (imported later, it cost the downloads a block).
        from mpy_blox.update import trust

        self.trust, self.now = trust.trust(config), trust.now()
        trust = None
        startup.drop(("mpy_blox.update.trust",))
        await startup.wlan_up(config)
        # The client's modules: imported by the app before this module.
        client = await startup.mqtt_up(sys.modules["mpy_blox.mqtt"], config, node)
        if self.error is None and (client is None or not client.is_connected):
            log.error("install boot without a broker: retrying after a reset")
            machine.reset()  # counted: after _MAX_TRIES the app boots again
        if self.error is None:
            ib = Fetcher(client, node, config.get_int("update.stall_s", 30))
            try:
                await self._fetch(ib)
                if self.inst is not None or self.firmware:
                    await ib.status("installing")
            except ValueError as e:  # InvalidUpdate: a short reason for status
                self.error = str(e)
            except MemoryError as e:
                # Where the blocks lie depends on what arrived when (at 100K, a
                # 1148-byte file block after a firmware image can be missing):
                # a fresh heap may fit, and the downloads resume. Counted.
                self._heap_retry(e)
                log.exception("download failed", e)
                self.error = repr(e)[:100]
            except Exception as e:  # noqa: BLE001  (report it; the app boots next either way)
                log.exception("download failed", e)
                self.error = repr(e)[:100]
            self.package = ib.current
            ib = None
        if client is not None:
            # Cleanly (no will): the retained status stays "installing".
            await client.stop()
        node.client = client = None

    async def _fetch(self, ib):
        if self.to == record.CMD:
            to = list_to(node_topic(self.node.device_id, "cmd"))
        else:
            to = list_to(channel_topic(self.config.get_str("update.channel", "stable")))
        entries = self._check(await ib.fetch_list(to), to)
        # The list is checked: its format, signature and trust code go back to
        # the heap before the downloads want blocks for their files (the
        # install core has paths' InvalidUpdate). Dropped out here, not in
        # _check, whose frame could keep a stale pointer to them on the stack
        # for the (conservative) collector.
        startup.drop(("mpy_blox.update.manifest", "mpy_blox.update.trust"))
        startup.drop(("mpy_blox.hmac", "mpy_blox.ed25519"))
        firmware = [e for e in entries if e["type"] == "firmware"]  # one at most
        if firmware:
            entries = [e for e in entries if e["type"] != "firmware"]
            await self._firmware(ib, firmware[0])
            if not entries:
                return
            # The image's chunked download code goes back to the heap before the
            # install core takes its blocks (a package of the list that is chunked
            # imports it again): at 100K the core found no 1 KiB block without it.
            startup.drop(("mpy_blox.update.chunks",))
        # The install core after the connection has its buffers (it takes
        # fewer, smaller blocks) and into the room the list's check left;
        # without room for it, the next attempt may fare better.
        if startup.import_optional("mpy_blox.update.install") is None:
            import machine

            log.error("no room for the install core: retrying after a reset")
            machine.reset()  # counted
        log.info("install boot; free heap %d bytes", gc.mem_free())
        self.inst = await ib.download(entries)

    async def _firmware(self, ib, entry):
        # A firmware image, first (mpy_blox.update.firmware): into the next OTA
        # partition, verified; set_boot comes in commit(), after the packages'
        # journal. Without packages the install core is never loaded.
        from mpy_blox.update import firmware

        self.target = await firmware.download(ib, entry)
        self.firmware = self.target.label() if self.target else firmware.running_label()
        ib.current = None

    def _check(self, payload, to):
        # The list's entries, once its signature, seq and expiry are checked;
        # a newer list than the agent accepted is accepted here, as the agent does.
        from mpy_blox.update import manifest

        self.digest = record.digest(payload)
        got = manifest.decode(payload, self.trust, to)
        self.trust = None
        listed = self.listed = got.seq
        if listed is not None and listed < self.seq:
            raise manifest.InvalidUpdate(
                "replayed or older list: seq %d, device at %d" % (listed, self.seq)
            )
        # trust.check_expires, without loading trust again: it is dropped.
        if got.expires is not None and self.now is not None and self.now > got.expires:
            raise manifest.InvalidUpdate("list expired")
        if listed is not None and listed > self.seq:
            # Its key rotation first; NVS, then RAM.
            from mpy_blox.update import trust

            trust.note(self.config, got)
            record.set_pending(record.pending()[0], self.tries, listed, self.digest)
            self.seq = listed
        return got.entries

    def _heap_retry(self, e):
        # Reset and try again from a fresh heap, unless this was the last attempt.
        if self.tries < _MAX_TRIES:
            import machine

            log.exception("out of heap: retrying after a reset", e)
            machine.reset()

    def commit(self):
        """Phase 2, between two runs of the loop: stage and commit, offline."""
        startup.drop_all("mpy_blox.mqtt")
        # The list's modules went after its check (_fetch); if the download
        # failed before that, they go now: the deflate window wants the room.
        startup.drop(("mpy_blox.update.manifest", "mpy_blox.update.trust"))
        startup.drop(("mpy_blox.hmac", "mpy_blox.ed25519"))
        # So do the chunked downloads' code (imported only by a list with chunks).
        startup.drop(("mpy_blox.update.chunks",))
        inst, self.inst = self.inst, None
        journaled = False
        if inst is not None and self.error is None:
            log.info("staging; free heap %d bytes", gc.mem_free())
            try:
                # Beside a firmware image: the journal bound to its partition,
                # applied by boot recovery once that partition runs.
                journaled = self.installed = inst.finish(self.firmware)
            except ValueError as e:  # InvalidUpdate
                self.error = str(e)
                from mpy_blox.update.paths import HeapShort  # loaded with the core

                if isinstance(e, HeapShort):
                    # The decoder's blocks were not there in this heap (nothing
                    # is journaled yet; the stage is cleaned): as a download's
                    # MemoryError, a fresh heap may have them. Counted.
                    self._heap_retry(e)
            except Exception as e:  # noqa: BLE001  (reported; the old set stays)
                if isinstance(e, MemoryError):
                    # Safe at any point, as a power cut is: before the journal,
                    # the stage is cleaned; after it, boot recovery rolls it on.
                    self._heap_retry(e)
                log.exception("install failed", e)
                self.error = repr(e)[:100]
        inst = None
        if self.firmware and self.error is None:
            # Its code in the firmware module, loaded for the list: the
            # install boot's own code stays what every download has to hold.
            sys.modules["mpy_blox.update.firmware"].switch(self, journaled)
        self.target = None
        if self.error is not None:
            _drop_downloads()
        if not self.finished:
            self.finish_list(self.listed, self.digest)

    async def report(self):
        """Phase 3: reconnect without the install core; report; reset."""
        import machine

        startup.drop_all(
            "mpy_blox.update.",
            ("mpy_blox.update.record", "mpy_blox.update.fetch", "mpy_blox.update.installboot"),
        )
        sys.modules.pop("mpypi_recover", None)
        gc.collect()
        node = self.node
        record.info(node, self.seq, record.load_last())
        mqtt = startup.import_optional("mpy_blox.mqtt")
        client = None
        if mqtt is not None:  # else the app's next boot reports
            client = await startup.mqtt_up(mqtt, self.config, node, announce=False)
        mqtt = None
        if self.installed and self.error is None:
            # No info: it would name the running framework beside the files
            # just committed (two sets); the next boot's info is the new set's.
            if client is None or not client.is_connected:
                # A broker gone before the new code boots is not its fault:
                # its trial does not wait for one (mpy_blox/update/trial.py).
                last = record.load_last() or {}
                record.save_last(
                    "trial", last.get("at"), None, last.get("list"), False, last.get("firmware")
                )
        else:
            await node.publish_info()
        client = None
        if self.error is not None:
            log.error("update failed: %s", self.error)
            await record.status(node, "failed", error=self.error, package=self.package)
        elif self.installed:
            log.info("update installed: resetting")
            await record.status(node, "rebooting", seq=self.listed)
        else:
            await record.status(node, "idle")
        machine.reset()

    def finish_list(self, seq, digest):
        # last_update names the list (seq and digest) even when it failed, so the
        # retained copy is not taken up again: a new list (a new seq) is needed.
        # Then nothing is pending: the next boot is the app's.
        # A committed set boots on trial (mpy_blox/update/trial.py).
        result = "failed" if self.error else "trial" if self.installed else "ok"
        firmware = None if self.error else self.firmware  # the image on trial
        record.save_last(result, seq, self.error, digest, True, firmware)
        record.set_pending(0, 0, None, digest)  # finished: this list (it may be a newer one)
        self.finished = True


def _drop_downloads():
    # A failed list is not taken up again: its chunked downloads, kept across
    # the install boot's restarts (mpy_blox.update.chunks), go. The install
    # core is loaded for it only when there are any.
    import os

    try:
        os.stat("/.mpypi/dl")
    except OSError:
        return
    try:
        from mpy_blox.update.install import Installer

        Installer().drop_downloads()
    except MemoryError:  # after a failure for want of heap: the next list drops them
        pass
