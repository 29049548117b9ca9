# Runs the user's `async def user_main()` and keeps the device alive around it.
#
# - user_main.py missing: logged once, the device runs without user code.
# - user_main (or a task it started and nobody awaits) raises: logged with its
#   traceback, restarted after a delay that doubles (app.restart_delay_ms, up
#   to 60 s).
# - MemoryError: as above, after gc.collect() and a log line with the free heap;
#   the fail-safe of the seed: the user tasks start again on a clean heap.
# - a crash loop, app.crash_limit failures within app.crash_window_s seconds
#   (default 5 in 60): safe mode. User code is not started again until the next
#   reset; MQTT and the update agent stay up so a fixed user_main.py can be
#   pushed over the air (the agent resets the board after installing it).
# - the watchdog (mpy_blox/watchdog.py), started once user_main is loaded,
#   before it starts; its resets of earlier boots are failures already seen
#   (`resets`): app.crash_limit of them in a row is safe mode at once.
# - user_main returning: logged; not restarted.
# - preload(): the app may import user_main early in boot, for the heap's sake;
#   it still starts only in run().
import asyncio
import gc
import sys
import time

from mpy_blox.log import get_logger

_MAX_DELAY_MS = const(60000)

log = get_logger("user_main")


class Supervisor:
    def __init__(self, config, node=None, module="user_main"):
        self.module = module
        self.limit = max(1, config.get_int("app.crash_limit", 5))
        self.window_ms = config.get_int("app.crash_window_s", 60) * 1000
        self.delay_ms = max(0, config.get_int("app.restart_delay_ms", 1000))
        self.node = node  # says so in info and status, once in safe mode
        self.safe_mode = None  # the reason, once in safe mode
        self.failures = []  # ticks_ms of recent failures, at most `limit`
        self._user = None  # the running user_main task
        self._crashed = None  # an exception of a user task, seen by the loop handler
        self.preloaded = None  # see preload(): (user_main or None,), or its exception
        # Called with the exception at each failure, after it is logged: the
        # trial of a new update rolls back at the first (mpy_blox/update/trial.py).
        self.on_failure = None
        self._since = None  # ticks_ms user_main started; None before, or -1: it is over
        self.config = config  # for the watchdog
        # Failures of the boots before this one: a user_main that blocks the
        # loop never fails in a boot, the watchdog resets it.
        self.resets = 0

    def _load(self):
        sys.modules.pop(self.module, None)  # after a MemoryError: its state goes too
        try:
            mod = __import__(self.module)
        except ImportError as e:
            if ("'%s'" % self.module) not in str(e):
                raise  # user_main.py exists but imports something missing
            log.warning("no %s.py: running without user code", self.module)
            return None
        fn = getattr(mod, self.module, None)
        if fn is None:
            raise AttributeError("%s.py has no %s()" % (self.module, self.module))
        return fn

    def preload(self, keep_free, drop_modules):
        """Import user_main now, early in boot; run() starts it later.

        Loading the framework's .mpy files leaves the heap in pieces too small
        for the parser, which wants KB-sized blocks (its rule stack alone is
        1 KB on the 64-bit unix port). But the device must stay reachable for
        a fix: a user_main that leaves less than `keep_free` bytes for the
        framework is unloaded again (`drop_modules(names)`), and run() imports
        it after the framework, where a MemoryError ends in safe mode on a
        device that is online. A failure is kept for run() to report.
        """
        before = list(sys.modules)
        try:
            self.preloaded = (self._load(),)
        except Exception as e:  # noqa: BLE001  (reported by run(), as a late import would be)
            self.preloaded = e
        gc.collect()
        if isinstance(self.preloaded, tuple):
            if gc.mem_free() >= keep_free:
                return
            self.preloaded = None
            log.info("imported after the framework: %d bytes free", gc.mem_free())
        drop_modules([m for m in sys.modules if m not in before])

    def _user_main_fn(self):
        early, self.preloaded = self.preloaded, None
        if early is None:
            return self._load()
        if isinstance(early, Exception):
            raise early
        return early[0]

    def handle_exception(self, loop, context):
        # The loop's handler: a task nobody awaits died. Framework tasks handle
        # their own errors, so this is user code: restart the user tasks.
        exc = context.get("exception")
        if isinstance(exc, Exception):
            self._crashed = exc
            if self._user is not None:
                self._user.cancel()  # run() reports it and restarts
            else:
                log.exception("a user task failed: %r", exc, exc)
                if self.on_failure is not None:
                    self.on_failure(exc)
        else:
            log.error("%s", context.get("message"))

    def healthy_ms(self):
        """How long user_main has run without failing, in ms; None before it
        started. One that returned, or that does not exist, ran well for good."""
        if self._since == -1:
            return 1 << 30
        if self._since is None:
            return None
        return time.ticks_diff(time.ticks_ms(), self._since)

    def _failed(self, now):
        self.failures.append(now)
        if len(self.failures) > self.limit:
            self.failures.pop(0)
        return (
            len(self.failures) >= self.limit
            and time.ticks_diff(now, self.failures[0]) <= self.window_ms
        )

    async def run(self):
        """Supervise user_main until it returns, is missing, or safe mode starts."""
        delay_ms = self.delay_ms
        started = time.ticks_ms()
        try:  # the first load, as preload() does it: run() reports a failure
            self.preloaded = (self._user_main_fn(),)
        except Exception as e:  # noqa: BLE001
            self.preloaded = e
        try:  # after user code took the heap's large blocks to compile
            from mpy_blox import watchdog

            watchdog.start(self)
        except MemoryError as e:  # a heap this full goes without
            log.error("no watchdog: %r", e)
        self.failures = [started] * self.resets
        if self.resets >= self.limit:
            await self._give_up("user_main blocked the loop: %d watchdog resets" % self.resets)
            return
        while True:
            self._crashed = None
            fn = None
            try:
                fn = self._user_main_fn()
                if fn is None:
                    self._since = -1
                    return
                log.info("starting")
                started = self._since = time.ticks_ms()
                self._user = asyncio.create_task(fn())
                await self._user
                log.info("returned; not restarted")
                self._since = -1
                return
            except asyncio.CancelledError:
                exc = self._crashed
                if exc is None:
                    raise  # we were cancelled ourselves
            except Exception as e:  # noqa: BLE001  (the supervisor is the catch-all)
                exc = e
            finally:
                self._user = None
            self._since = None
            self._report(exc)
            if fn is not None and not isinstance(exc, MemoryError):
                # The same function next time: importing user_main.py again
                # compiles it again, which wants KB-sized blocks that a heap
                # that has run a while may no longer have. After a MemoryError
                # it is imported afresh: its module's state may be what filled
                # the heap.
                self.preloaded = (fn,)
            if self.on_failure is not None:
                self.on_failure(exc)
            now = time.ticks_ms()
            if time.ticks_diff(now, started) > self.window_ms:
                delay_ms = self.delay_ms  # it ran well for a while: start backing off anew
            if self._failed(now):
                await self._give_up(
                    "user_main failed %d times in %d s" % (self.limit, self.window_ms // 1000)
                )
                return
            log.info("restarting in %d ms", delay_ms)
            await asyncio.sleep_ms(delay_ms)
            delay_ms = min(delay_ms * 2, _MAX_DELAY_MS)

    async def _give_up(self, reason):
        self.safe_mode = reason
        log.error("safe mode: %s; user code stays stopped until reset", reason)
        if self.node is not None:
            self.node.safe_mode = reason
            await self.node.publish_info()
            await self.node.publish_status("safe_mode")

    def _report(self, exc):
        if isinstance(exc, MemoryError):
            gc.collect()
            log.error("out of memory; free heap after collect: %d bytes", gc.mem_free())
            sys.print_exception(exc)
        else:
            log.exception("failed: %r", exc, exc)
