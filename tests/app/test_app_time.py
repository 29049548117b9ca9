"""Device time on virtual boards: NTP (mpy_blox/ntp.py) from an SNTP responder the
test runs on loopback sets the board's clock (which starts at 2000-01-01, as an
ESP32's), and `info`/`status` carry `ts` from then on, through the real Mosquitto."""

from __future__ import annotations

import json
import time

import pytest
from sntp_server import Responder


def with_ts(w, timeout: float = 20) -> tuple[dict, dict]:
    """The latest info and status once both carry `ts` (or as they are at the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info, status = w.latest.get("info") or {}, w.latest.get("status") or {}
        if "ts" in info and "ts" in status:
            break
        time.sleep(0.1)
    return info, status


def ntp_settings(responder: Responder, **extra) -> dict:
    return {"ntp": {"server": "127.0.0.1", "port": responder.port, **extra}}


def test_ntp_from_a_local_server_sets_the_clock_and_info_and_status_carry_ts(
    app_board, boards, broker, settings_for, watch, sntp
):
    responder = sntp()
    settings = {**json.loads(settings_for(broker)), **ntp_settings(responder)}
    board = app_board(settings)
    w = watch(board)
    before = int(time.time())
    rb = boards.start(board)
    rb.wait_for(r"clock set from NTP 127\.0\.0\.1: (\d+)", timeout=30)
    rb.wait_for("USER up")
    info, status = with_ts(w)
    after = int(time.time())
    assert isinstance(info.get("ts"), int) and before - 2 <= info["ts"] <= after + 2, info
    assert isinstance(status.get("ts"), int) and before - 2 <= status["ts"] <= after + 2, status
    assert status["state"] == "online"
    # One sync at boot (more only if a round timed out on a busy host); the next a day later.
    asked = len(responder.requests)
    time.sleep(1.5)
    assert asked >= 1 and len(responder.requests) == asked


@pytest.mark.parametrize("mode", ["silent", "zero_transmit"])
def test_without_a_good_ntp_answer_the_boot_goes_on_without_ts_and_retries(
    app_board, boards, broker, settings_for, watch, sntp, mode
):
    responder = sntp(mode)
    settings = {**json.loads(settings_for(broker)), **ntp_settings(responder)}
    board = app_board(settings)
    w = watch(board)
    rb = boards.start(board)
    rb.wait_for("USER up", timeout=30)
    info = w.wait("info", timeout=20, device_id=board.device_id)
    status = w.wait("status", timeout=20, state="online")
    assert "ts" not in info and "ts" not in status
    why = "no NTP reply from 127.0.0.1 within 2000 ms" if mode == "silent" else "no transmit"
    rb.wait_for(f"NTP 127.0.0.1: .*{why}.*; again in 10 s", timeout=10)
    # Retried after 10 s, the clock still unset: no ts, no "clock set".
    rb.wait_for(f"NTP 127.0.0.1: .*{why}.*; again in 20 s", timeout=25)
    assert len(responder.requests) >= 2
    assert 9 <= responder.requests[1] - responder.requests[0] <= 15
    assert "clock set" not in rb.console()
    assert "ts" not in (w.latest.get("info") or {}) and "ts" not in w.latest["status"]


def test_ntp_enabled_false_asks_no_server_and_publishes_no_ts(
    app_board, boards, broker, settings_for, watch, sntp
):
    responder = sntp()
    settings = {**json.loads(settings_for(broker)), **ntp_settings(responder, enabled=False)}
    board = app_board(settings)
    w = watch(board)
    rb = boards.start(board)
    rb.wait_for("USER up", timeout=30)
    info = w.wait("info", timeout=20, device_id=board.device_id)
    status = w.wait("status", timeout=20, state="online")
    time.sleep(1)
    assert "ts" not in info and "ts" not in status
    assert responder.requests == [] and "NTP" not in rb.console()


# The device's NTP client on its own, on a board (its clock at 2000-01-01): each
# refused reply raises ValueError with its reason and leaves the clock as it was.
NTP_MAIN = """
import asyncio, time
from mpy_blox import ntp

async def main():
    for port in PORTS:
        try:
            unix = await ntp.sync("127.0.0.1", port, 1000)
            print("SET", unix, time.time() > 800000000)
        except ValueError as e:
            print("REFUSED", repr(e), "clock", time.time() < 100)
        except OSError as e:
            print("NO ANSWER", e, "clock", time.time() < 100)

asyncio.run(main())
print("DONE")
"""

REFUSALS = {
    "short": "NTP reply of 47 bytes",
    "wrong_mode": "NTP reply in mode 5, not 4 (server)",
    "zero_transmit": "NTP reply with no transmit time",
    "other_request": "NTP reply to another request",
    "kiss": "NTP stratum 0 (kiss-o'-death or unsynchronised)",
    "before_2025": "NTP time 1600000000 is before 2025",
}


def test_a_malformed_ntp_reply_is_refused_and_the_clock_stays_unset(boards, runtime_mpy, sntp):
    responders = {mode: sntp(mode) for mode in [*REFUSALS, "silent", "good"]}
    ports = [r.port for r in responders.values()]
    board = boards.create(files={"main.py": NTP_MAIN.replace("PORTS", repr(ports))})
    board.put_tree(runtime_mpy, "lib/mpy_blox")
    rb = boards.start(board)
    rb.wait_for("DONE", timeout=30)
    lines = [line for line in rb.console().splitlines() if line.startswith(("REF", "NO", "SET"))]
    expected = [f"REFUSED ValueError({why!r},) clock True" for why in REFUSALS.values()]
    expected.append("NO ANSWER no NTP reply from 127.0.0.1 within 1000 ms clock True")
    assert lines[:-1] == expected, rb.console()
    assert lines[-1].startswith("SET ") and lines[-1].endswith(" True"), lines[-1]
    assert abs(int(lines[-1].split()[1]) - time.time()) < 10


def test_status_shows_last_seen_of_an_offline_device_from_its_last_ts(
    app_board, boards, broker, settings_for, watch, sntp, capsys
):
    from mpy_blox_tools.cli import main as cli

    responder = sntp()
    board = app_board({**json.loads(settings_for(broker)), **ntp_settings(responder)})
    w = watch(board)
    rb = boards.start(board)
    info, status = with_ts(w)
    assert "ts" in info and "ts" in status
    rb.stop()  # the link dies: the broker publishes its will, {"state": "offline"}
    w.wait("status", state="offline")
    url = f"mqtt://{broker.host}:{broker.port}"
    assert cli(["status", "--broker", url, "--json", "--listen", "0"]) == 0
    row = next(d for d in json.loads(capsys.readouterr().out) if d["device_id"] == board.device_id)
    last = max(info["ts"], status["ts"])
    assert row["state"] == "offline" and row["last_ts"] == last
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last))
    assert row["last_seen"] == when
    assert cli(["status", "--broker", url, "--listen", "0"]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if board.device_id in r)
    assert line.split()[1] == "offline" and line.endswith(" " + when)
