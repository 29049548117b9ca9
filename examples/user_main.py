# Your application: the framework calls user_main() once WLAN and MQTT are up.
import asyncio


async def user_main():
    n = 0
    while True:
        n += 1
        print("user_main is alive", n)
        await asyncio.sleep(10)
