# Mpy-BLOX app-managed mode: the framework runs the device and calls your
# `async def user_main()` from user_main.py. See docs/runtime.md.
import mpy_blox.app
mpy_blox.app.main()
