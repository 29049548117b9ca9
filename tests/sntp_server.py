"""An SNTP server on loopback for the device time tests (RFC 4330), with the
malformed replies a device must refuse."""

from __future__ import annotations

import socket
import struct
import threading
import time

# What the tests' settings.json helpers (settings_for) put in unless a test asks for
# NTP: a board must not ask pool.ntp.org from a test run.
NO_NTP = {"ntp": {"enabled": False}}

NTP_TO_UNIX = 2208988800


class Responder:
    """An SNTP server on 127.0.0.1 (RFC 4330): answers each request as `mode` says.

    good: a proper reply with the host's time; silent: no reply; short, wrong_mode,
    zero_transmit, other_request (its originate timestamp is not the request's),
    kiss (stratum 0), before_2025: malformed or refused replies."""

    def __init__(self, mode: str = "good") -> None:
        self.mode = mode
        self.requests: list[float] = []  # when each request came, time.time()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            self.requests.append(time.time())
            reply = self.reply(data)
            if reply is not None:
                self.sock.sendto(reply, addr)

    def reply(self, request: bytes) -> bytes | None:
        mode = self.mode
        if mode == "silent" or len(request) < 48:
            return None
        now = time.time()
        if mode == "before_2025":
            now = 1_600_000_000.0
        secs = int(now) + NTP_TO_UNIX
        frac = int((now % 1) * 2**32)
        first = (0 << 6) | (4 << 3) | (5 if mode == "wrong_mode" else 4)
        stratum = 0 if mode == "kiss" else 2
        originate = bytes(8) if mode == "other_request" else request[40:48]
        transmit = bytes(8) if mode == "zero_transmit" else struct.pack("!II", secs, frac)
        packet = (
            struct.pack("!BBbb", first, stratum, 6, -20)
            + bytes(8)  # root delay, root dispersion
            + b"TEST"  # reference id
            + struct.pack("!II", secs - 60, 0)  # reference timestamp
            + originate
            + struct.pack("!II", secs, frac)  # receive timestamp
            + transmit
        )
        return packet[:47] if mode == "short" else packet

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(1)
