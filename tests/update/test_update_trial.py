"""The trial: every update boots on trial, proves itself healthy, or rolls back by itself.

Virtual boards with the compiled framework, through a real Mosquitto: a signed list is
installed by the install boot; the next boot is on trial (docs/protocol.md, "The trial").
"""

# ruff: noqa: F811  (pytest injects the fixtures imported from test_update_installboot)
from __future__ import annotations

import shutil
import time

from test_update_agent import Watcher
from test_update_installboot import HEAP, USER_V1, app_board, channel, publish_update  # noqa: F401
from update_kit import REPO, make_src, make_wheel

from mpy_blox_tools import build


def settings(broker, chan, **update):
    return {
        "mqtt": {"server": broker.host, "port": broker.port, "wait_s": 5},
        "update": {"channel": chan, "healthy_after_s": 2, "trial_s": 60, **update},
        "app": {"restart_delay_ms": 100},
    }


def user_main(body: str) -> bytes:
    lines = "".join("    " + line + "\n" for line in body.splitlines())
    return (
        "import asyncio\nasync def user_main():\n    print('USER v2 starts')\n" + lines
    ).encode()


def on_v1(app_board, boards, mqtt_client, broker, channel, lane=None, **update):
    """A board running USER v1; on `lane` at its board heap if given (32-bit: 100K)."""
    board = app_board(settings(broker, channel, **update))
    watch = Watcher(mqtt_client(broker), board.device_id)
    rb = boards.start(board, heap=lane.board_heap if lane else HEAP, lane=lane)
    rb.wait_for("USER v1", timeout=30)
    return board, watch, rb


def rolled_back(board, watch, rb, seq, error):
    """The board reported the rollback, runs the old set again, and keeps it."""
    st = watch.wait_status(state="rolled_back", timeout=60)
    assert st == {"state": "rolled_back", "seq": seq, "error": error}
    rb.wait_for("USER v1", count=2, timeout=30)
    last = wait_last(watch, "rolled_back")
    assert last["error"] == error and last["at"] == seq
    # The rolled-back list is still retained: never tried again.
    rb.wait_for(f"list seq {seq} seen again: already done", timeout=30)
    assert "USER v2" not in rb.console().split("USER v1")[-1]
    rb.stop()
    assert board.cat("user_main.py") == USER_V1
    assert no_trial_left(board)


def no_trial_left(board) -> bool:
    """No journal, no rollback marker, an empty stage."""
    left = [p for p in board.ls(".mpypi") if p.rstrip("/").rsplit("/", 1)[-1] in TRIAL_FILES]
    return not left and not [p for p in board.ls(".mpypi") if "/stage/" in p]


TRIAL_FILES = ("journal", "applied", "rollback")


def wait_last(watch, result, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = watch.info.get("last_update") or {}
        if last.get("result") == result:
            return last
        time.sleep(0.1)
    raise AssertionError(f"last_update never {result}: {watch.info.get('last_update')}")


def test_a_good_update_boots_on_trial_then_is_confirmed(
    app_board,
    boards,
    mqtt_client,
    broker,
    channel,
):
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    new = make_src("user_main.py", user_main("while True:\n    await asyncio.sleep(1)"))
    publish_update(mqtt_client(), channel, [new], seq=3)
    trial = watch.wait_status(state="trial", timeout=60)
    assert trial["seq"] == 3 and 0 < trial["left_s"] <= 60
    assert watch.wait_status(state="ok", timeout=30) == {"state": "ok", "seq": 3}
    last = wait_last(watch, "ok")
    assert last["at"] == 3
    assert watch.info["src"] == {"user_main.py": new.sha}
    rb.stop()
    assert board.cat("user_main.py") == new.data
    assert no_trial_left(board)


def test_a_user_main_that_raises_after_5_s_is_rolled_back(
    lane, app_board, boards, mqtt_client, broker, channel
):
    # On both lanes at their board heap: the rollback is requested from a busy
    # app (32-bit: 100K, an ESP32's).
    board, watch, rb = on_v1(
        app_board, boards, mqtt_client, broker, channel, lane, healthy_after_s=30
    )
    bad = make_src(
        "user_main.py", user_main("await asyncio.sleep(5)\nraise RuntimeError('sensor gone')")
    )
    publish_update(mqtt_client(), channel, [bad], seq=4)
    watch.wait_status(state="trial", timeout=60)
    rb.wait_for("USER v2 starts", timeout=30)
    rolled_back(board, watch, rb, 4, "user_main raised RuntimeError: sensor gone")


def test_a_health_check_that_says_no_is_rolled_back(
    app_board,
    boards,
    mqtt_client,
    broker,
    channel,
):
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    bad = make_src(
        "user_main.py",
        user_main("while True:\n    await asyncio.sleep(1)")
        + b"async def health():\n    return False\n",
    )
    publish_update(mqtt_client(), channel, [bad], seq=5)
    rolled_back(board, watch, rb, 5, "health() returned False")
    # The rolled-back list stays refused; a newer one is tried as usual.
    fixed = make_src(
        "user_main.py",
        user_main("while True:\n    await asyncio.sleep(1)")
        + b"async def health():\n    return True\n",
    )
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("list seq 5 seen again: already done", timeout=30)
    publish_update(mqtt_client(), channel, [fixed], seq=6)
    assert watch.wait_status(state="ok", seq=6, timeout=60)
    rb.stop()
    assert board.cat("user_main.py") == fixed.data


def test_a_user_main_that_blocks_the_loop_is_reset_by_the_watchdog_and_rolled_back(
    app_board,
    boards,
    mqtt_client,
    broker,
    channel,
):
    slow = settings(broker, channel, healthy_after_s=30)
    board = app_board({**slow, "watchdog": {"timeout_s": 2}})
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    bad = make_src("user_main.py", user_main("while True:\n    pass"))
    publish_update(mqtt_client(), channel, [bad], seq=6)
    rb.wait_for("USER v2 starts", timeout=60)
    rolled_back(board, watch, rb, 6, "watchdog reset")
    assert "watchdog reset" in rb.console()


def test_a_framework_that_fails_to_import_is_rolled_back_to_the_old_one(
    app_board,
    boards,
    mqtt_client,
    broker,
    channel,
    tmp_path,
    full_mpy,
):
    old_app = (full_mpy / "app.mpy").read_bytes()
    source = tmp_path / "mpy_blox"
    shutil.copytree(REPO / "mpy_blox", source)
    (source / "app.py").write_text("raise ImportError('app broken on purpose')\n")
    files = build.compile_tree(source, "0.9.0", build.PLATFORMS["unix"])
    broken = make_wheel("mpy-blox", "0.9.0", files, tag="mpy6-bytecode-esp32", declare_tag=True)
    board, watch, rb = on_v1(app_board, boards, mqtt_client, broker, channel)
    publish_update(mqtt_client(), channel, [broken], seq=7)
    st = watch.wait_status(state="rolled_back", timeout=90)
    assert st["error"].startswith("framework failed to import: ImportError")
    assert "app broken on purpose" in st["error"]
    rb.wait_for("USER v1", count=2, timeout=30)
    rb.stop()
    assert board.cat("lib/mpy_blox/app.mpy") == old_app
    assert not [p for p in board.ls("lib") if "0.9.0" in p]
    assert no_trial_left(board)


def test_a_broker_already_down_before_the_reset_does_not_roll_the_trial_back(
    app_board,
    boards,
    mqtt_client,
    broker_factory,
    channel,
):
    own = broker_factory()
    board, watch, rb = on_v1(app_board, boards, mqtt_client, own, channel)
    new = make_src("user_main.py", user_main("while True:\n    await asyncio.sleep(1)"))
    publish_update(mqtt_client(own), channel, [new], seq=8)
    watch.wait_status(state="verifying", timeout=60)  # downloaded: the rest is offline
    own.kill()  # gone before the install boot reports, and through the whole trial
    rb.wait_for("update confirmed", timeout=60)
    own.start()
    watch = Watcher(mqtt_client(own), board.device_id)
    assert wait_last(watch, "ok", timeout=40)["at"] == 8


def test_a_trial_without_the_broker_it_had_before_rolls_back_at_its_deadline(
    app_board,
    boards,
    mqtt_client,
    broker_factory,
    channel,
):
    own = broker_factory()
    board, watch, rb = on_v1(app_board, boards, mqtt_client, own, channel, trial_s=8)
    new = make_src("user_main.py", user_main("while True:\n    await asyncio.sleep(1)"))
    publish_update(mqtt_client(own), channel, [new], seq=9)
    rb.wait_for("update installed: resetting", timeout=60)  # the report found the broker
    own.kill()
    rb.wait_for("trial failed: no broker within 8 s", timeout=60)
    rb.wait_for("USER v1", count=2, timeout=30)
    own.start()
    watch = Watcher(mqtt_client(own), board.device_id)
    last = wait_last(watch, "rolled_back", timeout=40)
    assert last["error"] == "no broker within 8 s"
    rb.stop()
    assert board.cat("user_main.py") == USER_V1
