# Setting the clock from an NTP server: one SNTP exchange (RFC 4330) over UDP.
#
# An ESP32's clock starts at 2000-01-01 at power-on; until something sets it the
# device has no idea of the date: TLS refuses every certificate (MicroPython's
# ESP32 port checks their dates since 1.22) and `info`/`status` carry no `ts`.
# MicroPython's `ntptime` (micropython-lib) blocks in a socket read with a 1 s
# timeout and trusts any 48 bytes; this one waits without blocking the loop and
# refuses a reply that is not an answer to its own request.
#
# The runtime's clock keeper (mpy_blox/timekeeper.py) imports this module for each
# sync_round() and drops it after: between syncs (a day) it takes no heap, and
# with `ntp.enabled` false it is never loaded (mpy_blox/services.py).
#
# Settings: ntp.enabled (true), ntp.server ("pool.ntp.org"; upstream's ntp.host
# is read too), ntp.port (123), ntp.interval_s (86400: a sync a day), ntp.wait_s
# (10: how long a boot waits for it before a TLS broker, services.clock_for_tls()).
#
#   request  48 bytes: 0x23 (LI 0, version 4, mode 3: client), zeros, and our
#            transmit timestamp (8 random bytes) at 40..47
#   reply    >= 48 bytes: mode 4 (server), LI not 3 (unsynchronised), stratum
#            1..15 (0 is a kiss-o'-death), originate timestamp (24..31) equal to
#            our transmit timestamp, transmit timestamp (40..47) not zero and
#            after 2025: the time the clock is set to, plus half the round trip.
import asyncio
import os
import socket
import struct
import sys
import time
from micropython import const

from mpy_blox.log import get_logger

_NTP_TO_UNIX = const(2208988800)  # seconds from 1900-01-01 to 1970-01-01
_EPOCH_2000 = const(946684800)  # Unix time of 2000-01-01
_CLOCK_FLOOR = const(1735689600)  # 2025-01-01: a reply before it is no time of ours
_POLL_MS = const(20)
_RETRY_S = const(10)  # the first retry of a failed sync; doubles up to ntp.interval_s
_DAY_S = const(86400)

log = get_logger("ntp")


def request():
    """(the 48-byte request, its transmit timestamp)."""
    stamp = os.urandom(8)
    return b"\x23" + bytes(39) + stamp, stamp


def parse(reply, stamp):
    """Unix time (seconds, microseconds) of a reply to the request that sent
    `stamp`; ValueError for anything else."""
    if len(reply) < 48:
        raise ValueError("NTP reply of %d bytes" % len(reply))
    first, stratum = reply[0], reply[1]
    if first & 7 != 4:
        raise ValueError("NTP reply in mode %d, not 4 (server)" % (first & 7))
    if first >> 6 == 3:
        raise ValueError("NTP server not synchronised")
    if not 1 <= stratum <= 15:
        raise ValueError("NTP stratum %d (kiss-o'-death or unsynchronised)" % stratum)
    if reply[24:32] != stamp:
        raise ValueError("NTP reply to another request")
    secs, frac = struct.unpack("!II", reply[40:48])
    if not secs:
        raise ValueError("NTP reply with no transmit time")
    if not secs & 0x80000000:  # era 1: from 2036-02-07 the 32-bit count wraps
        secs += 0x100000000
    unix = secs - _NTP_TO_UNIX
    if unix < _CLOCK_FLOOR:
        raise ValueError("NTP time %d is before 2025" % unix)
    return unix, (frac * 1000000) >> 32


async def query(server, port=123, timeout_ms=2000):
    """Ask `server` once: its Unix time (seconds, microseconds), corrected by half
    the round trip. OSError when it does not answer within timeout_ms (or the
    name does not resolve), ValueError for a reply that is not one."""
    addr = socket.getaddrinfo(server, port, 0, socket.SOCK_DGRAM)[0][-1]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        req, stamp = request()
        sent = time.ticks_ms()
        s.sendto(req, addr)
        while True:
            try:
                reply = s.recv(64)
                break
            except OSError:  # EAGAIN: nothing yet
                if time.ticks_diff(time.ticks_ms(), sent) > timeout_ms:
                    raise OSError("no NTP reply from %s within %d ms" % (server, timeout_ms))
                await asyncio.sleep_ms(_POLL_MS)
        rtt_ms = time.ticks_diff(time.ticks_ms(), sent)
    finally:
        s.close()
    unix, us = parse(reply, stamp)
    us += rtt_ms * 500  # half the round trip, in microseconds
    return unix + us // 1000000, us % 1000000


def set_clock(unix, us=0):
    """Set the RTC (time.time(), time.gmtime()) to Unix time `unix`, as ntptime
    does: through machine.RTC, in the port's epoch (2000 on an ESP32, gmtime(0))."""
    import machine

    tm = time.gmtime(unix - _EPOCH_2000 if time.gmtime(0)[0] == 2000 else unix)
    machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5], us))


async def sync(server, port=123, timeout_ms=2000):
    """query() then set_clock(); returns the Unix time it set."""
    unix, us = await query(server, port, timeout_ms)
    set_clock(unix, us)
    return unix


async def sync_round(cfg, node, last_wait_s, tried=None):
    """One sync for the runtime's clock keeper (mpy_blox/timekeeper.py), which
    imports this module for it: it drops the module again and sets the Event
    `tried`, if any, whatever the outcome. On success `node` republishes (info
    and status now carry ts) and it returns ntp.interval_s; on failure it logs
    why and returns the backoff after `last_wait_s`."""
    try:
        return await _round(cfg, node, last_wait_s)
    finally:
        sys.modules.pop("mpy_blox.ntp", None)
        delattr(sys.modules["mpy_blox"], "ntp")
        if tried is not None:
            tried.set()


async def _round(cfg, node, last_wait_s):
    server = cfg.get_str("ntp.server") or cfg.get_str("ntp.host", "pool.ntp.org")
    interval_s = cfg.get_int("ntp.interval_s", _DAY_S)
    if not 60 <= interval_s <= 30 * _DAY_S:  # a typo must not make it spin, or stop it
        log.warning("ntp.interval_s %d outside 60-2592000: using 86400", interval_s)
        interval_s = _DAY_S
    try:
        unix = await sync(server, cfg.get_int("ntp.port", 123))
    except (OSError, ValueError) as e:  # no answer, or not one
        # The first failure after boot or after a sync waits _RETRY_S, each next twice that.
        first = last_wait_s < _RETRY_S or last_wait_s >= interval_s
        wait_s = min(_RETRY_S if first else last_wait_s * 2, interval_s)
        log.warning("NTP %s: %s; again in %d s", server, e, wait_s)
        return wait_s
    log.info("clock set from NTP %s: %d", server, unix)
    if node is not None:  # info and status again, now with ts
        await node.publish_info()
        await node.republish_status()
    return interval_s
