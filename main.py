# Mpy-BLOX app-managed mode: the framework runs the device and calls your
# `async def user_main()` from user_main.py. See docs/runtime.md.
#
# First, before anything imports from /lib, finish or undo an update that a
# reset interrupted, and count a boot of an update on trial. mpypi_recover.py
# sits at the flash root, which no update writes, so this step never depends on
# a file an update replaces (docs/protocol.md, "Boot recovery"). It is dropped
# afterwards: its heap goes back before the app starts.
import sys

try:
    import mpypi_recover

    mpypi_recover.recover()
except Exception as e:  # a failed recovery must not stop the agent that can fix it
    print("E main: update recovery failed:", repr(e))
    sys.print_exception(e)
sys.modules.pop("mpypi_recover", None)
mpypi_recover = None
try:
    import mpy_blox.app

    mpy_blox.app.main()
except Exception as e:
    # A framework on trial that cannot even start is rolled back at once: the
    # next boot's recovery restores the old set. Outside a trial nothing changes.
    import mpypi_recover

    if mpypi_recover.request_rollback("framework failed to import: " + repr(e)):
        import machine

        sys.print_exception(e)
        print("E main: the update on trial failed to start: rolling back")
        machine.reset()
    raise
