# Your application: the framework calls user_main() once WLAN and MQTT are up
# (or after wlan.wait_s / mqtt.wait_s without them). See docs/runtime.md.
#
# If it raises, it is logged and restarted with a growing delay; after
# app.crash_limit failures in app.crash_window_s seconds the device enters safe
# mode and stays reachable over MQTT so a fixed user_main.py can be pushed.
import asyncio

import mpy_blox.app as app


async def user_main():
    interval_s = app.config.get_int("user.interval_s", 10)
    topic = "home/%s/alive" % app.node.device_id
    n = 0
    while True:
        n += 1
        print("user_main is alive", n)
        if app.client is not None and app.client.is_connected:
            try:
                await app.client.publish(topic, str(n))
            except OSError:  # the link dropped meanwhile: the next beat retries
                pass
        await asyncio.sleep(interval_s)
