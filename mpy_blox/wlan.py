# Wi-Fi station bring-up with retries, and a keeper that reconnects after a drop.
#
#   sta = await wlan.connect(ssid, psk)            # retries until connected
#   asyncio.create_task(wlan.keep(ssid, psk))      # or: keep it up forever
#
# Retries back off from 1 s to 30 s: an access point that is rebooting comes
# back within a minute, and a wrong password should not flood the log.
import asyncio
import network

from mpy_blox.log import get_logger

_POLL_MS = const(100)
_ATTEMPT_MS = const(15000)  # WPA2 association + DHCP rarely take more
_FIRST_RETRY_MS = const(1000)
_MAX_RETRY_MS = const(30000)
_CHECK_MS = const(5000)

log = get_logger("wlan")

# Why a connect attempt failed, by network.STAT_* value (ESP32 port numbering).
_REASONS = {
    200: "beacon timeout",
    201: "no access point found",
    202: "wrong password",
    203: "association failed",
    204: "handshake timeout",
}


def _reason(status):
    return _REASONS.get(status, "status %d" % status)


async def _attempt(sta, ssid, psk):
    try:
        sta.connect(ssid, psk)
    except OSError as e:  # "Wifi Internal Error" and the like: count it as a failed try
        log.warning("connect(%r) raised %r", ssid, e)
        return sta.status()
    waited = 0
    # The ESP32 reports CONNECTING (and briefly IDLE) until it has an address.
    while not sta.isconnected() and waited < _ATTEMPT_MS:
        status = sta.status()
        if status in _REASONS:
            return status
        await asyncio.sleep_ms(_POLL_MS)
        waited += _POLL_MS
    return network.STAT_GOT_IP if sta.isconnected() else sta.status()


async def connect(ssid, psk=None, hostname=None):
    """Bring the station up; retry with backoff until it has an address."""
    if hostname:
        try:
            network.hostname(hostname)
        except (AttributeError, ValueError, OSError) as e:  # older firmware, bad name
            log.warning("cannot set hostname %r: %s", hostname, e)
    sta = network.WLAN(network.STA_IF)
    sta.active(True)
    delay_ms = _FIRST_RETRY_MS
    while not sta.isconnected():
        status = await _attempt(sta, ssid, psk)
        if sta.isconnected():
            break
        log.warning(
            "cannot connect to %r: %s; retry in %d s", ssid, _reason(status), delay_ms // 1000
        )
        sta.disconnect()  # a clean state for the next attempt
        await asyncio.sleep_ms(delay_ms)
        delay_ms = min(delay_ms * 2, _MAX_RETRY_MS)
    log.info("connected to %r, address %s", ssid, sta.ifconfig()[0])
    return sta


async def keep(ssid, psk=None, hostname=None, connected=None):
    """Connect, then reconnect whenever the link drops. Sets the `connected` Event."""
    sta = await connect(ssid, psk, hostname)
    while True:
        if connected is not None:
            connected.set()
        while sta.isconnected():
            await asyncio.sleep_ms(_CHECK_MS)
        if connected is not None:
            connected.clear()
        log.warning("connection to %r lost", ssid)
        await connect(ssid, psk)
