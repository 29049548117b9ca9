# The trial: a new set of files proves itself healthy, or is rolled back.
#
# The install boot commits a list through the journal and resets; the journal
# stays `applied`, the replaced files kept as backups (mpypi_recover), and
# last_update says "trial". The app of the next boot asks record.on_trial() and, if
# so, runs one Trial beside user_main. The set is healthy when, within
# update.trial_s of the boot (default 120):
#
# - the framework booted (this runs at all);
# - MQTT connected, if the install boot's last phase reached the broker (a
#   broker already gone before the reset is no fault of the new code);
# - user_main ran update.healthy_after_s (default 30) without raising (a
#   MemoryError included): the supervisor calls failed() at the first failure;
# - the optional `async def health()` of user_main.py returned true within
#   update.health_timeout_s (default 10).
#
# Then confirm(): the journal ends (mpypi_recover.confirm, the point of no
# return), last_update says "ok", status "ok". Anything else is failed(reason):
# mpypi_recover.request_rollback(reason) and a reset; boot recovery runs the
# journal backwards before anything imports from /lib, and the agent of the
# old set reports rolled_back. A watchdog reset or a fourth boot during the
# trial is rolled back by boot recovery itself. The state machine, with what a
# power cut at each step leads to, is in docs/protocol.md, "The trial".
#
# Loaded only during a trial: the app asks record.on_trial() first.
import asyncio
import gc
import sys
import time

from mpy_blox.log import get_logger
from mpy_blox.update import record

_POLL_MS = const(1000)

log = get_logger("update")


class Trial:
    def __init__(self, config, node, started_ms):
        self.node = node
        self.trial_ms = max(1, config.get_int("update.trial_s", 120)) * 1000
        self.healthy_ms = max(0, config.get_int("update.healthy_after_s", 30)) * 1000
        self.health_timeout_s = max(1, config.get_int("update.health_timeout_s", 10))
        self.started = started_ms
        last = record.load_last() or {}
        self.seq = last.get("at")
        self.list = last.get("list")
        # A firmware image on trial (mpy_blox.update.firmware): the partition
        # it runs from. The bootloader rolls it back at any reset before confirm.
        self.firmware = last.get("firmware")
        # The install boot says so when its last phase found no broker.
        self.need_broker = last.get("broker", True) is not False
        self.done = asyncio.Event()  # set once confirmed: the agent takes lists again
        node.state = "trial"  # what a (re)connect publishes until the verdict
        node.state_fields = {"seq": self.seq, "left_s": self.left_s()}

    def left_s(self):
        return max(0, (self.trial_ms - time.ticks_diff(time.ticks_ms(), self.started)) // 1000)

    async def run(self, sup, client_of):
        """Watch until healthy (confirm) or not (failed): client_of() is the MQTT client."""
        while True:
            client = client_of()
            online = client is not None and client.is_connected
            self.node.state_fields["left_s"] = self.left_s()  # for the next (re)connect
            ran = sup.healthy_ms()
            if ran is not None and ran >= self.healthy_ms and (online or not self.need_broker):
                await self._health(sup.module)
                await self.confirm()
                return
            if time.ticks_diff(time.ticks_ms(), self.started) >= self.trial_ms:
                self.failed(self._late(ran, online))
            await asyncio.sleep_ms(_POLL_MS)

    def _late(self, ran, online):
        # Why the trial ran out: the first condition not met.
        if ran is None or ran < self.healthy_ms:
            return "user_main did not run %d s within %d s" % (
                self.healthy_ms // 1000,
                self.trial_ms // 1000,
            )
        return "no broker within %d s" % (self.trial_ms // 1000)

    async def _health(self, module):
        health = getattr(sys.modules.get(module), "health", None)
        if health is None:
            return
        try:
            ok = await asyncio.wait_for(health(), self.health_timeout_s)
        except asyncio.TimeoutError:
            return self.failed("health() did not return within %d s" % self.health_timeout_s)
        except Exception as e:  # noqa: BLE001  (the user's check failing is a verdict)
            return self.failed("health() raised " + _short(e))
        if not ok:
            self.failed("health() returned %r" % (ok,))

    async def confirm(self):
        # The journal ends first (the point of no return; a cut after it leaves
        # last_update at "trial", which the agent finishes: agent._settle).
        if self.firmware:
            # The image's own point of no return: otadata marks it valid, and
            # no later reset rolls it back. A cut before last_update says ok
            # leaves it on trial again at the next boot, which confirms again.
            import esp32

            esp32.Partition.mark_app_valid_cancel_rollback()
        import mpypi_recover

        mpypi_recover.confirm()
        sys.modules.pop("mpypi_recover", None)
        gc.collect()
        last = record.save_last("ok", self.seq, None, self.list)
        log.info("update confirmed: the new set is healthy")
        self.node.state = "online"
        self.node.state_fields = {}
        self.node.info_extra["last_update"] = last
        await self.node.publish_info()
        await self.node.publish_status("ok", seq=self.seq)
        self.done.set()

    def failed(self, reason):
        """Roll back: boot recovery puts the old set back after this reset."""
        import machine

        log.error("trial failed: %s; rolling back", reason)
        try:
            import mpypi_recover

            mpypi_recover.request_rollback(reason)
        except Exception as e:  # noqa: BLE001  (no heap to load it: the reset still counts)
            # The next boots are trial boots again; boot recovery rolls back
            # by itself at the fourth (without this reason).
            log.exception("cannot request the rollback", e)
        machine.reset()


async def settle(node, last):
    """The outcome of the last trial, for the agent of the next boot: a
    rollback boot recovery finished (reported once, then its marker goes), or
    a confirm cut after its point of no return (the journal gone, last_update
    still "trial": the set was confirmed). Returns last_update."""
    import mpypi_recover

    reason = mpypi_recover.rolled_back()
    if reason is None:
        return record.save_last("ok", last.get("at"), None, last.get("list"))
    log.error("the update was rolled back: %s", reason)
    last = record.save_last("rolled_back", last.get("at"), reason, last.get("list"))
    await record.status(node, "rolled_back", seq=last.get("at"), error=reason)
    mpypi_recover.forget_rollback()  # reported: last_update keeps it
    sys.modules.pop("mpypi_recover", None)
    return last


def _short(exc):
    """'RuntimeError: boom', at most 160 characters: for status and last_update."""
    return ("%s: %s" % (type(exc).__name__, exc))[:160]


def user_main_failed(exc):
    """The reason a user_main failure gives (the supervisor's words for it)."""
    return "user_main raised " + _short(exc)
