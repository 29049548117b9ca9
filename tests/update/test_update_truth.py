"""What a device reports is true (issue 16): files in place count as installed, progress
reaches 100%, and a keyless device installs each retained list once.

Each test runs an app-managed virtual board against the real Mosquitto.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
from sntp_server import NO_NTP
from test_update_agent import Watcher, publish
from test_update_installboot import (
    HEAP,
    USER_V1,
    app_board,
    channel,
    publish_update,
    wait_info,
)
from update_kit import REPO, make_src, make_wheel, sha256

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import publish as publisher
from mpy_blox_tools.cli import main as cli
from mpy_blox_tools.vboard.board import Board

__all__ = ["app_board", "channel"]  # fixtures, used by name

USER_SAME = "async def user_main():\n    print('USER same')\n"


def test_publish_wait_of_a_src_file_already_on_the_board_says_ok_and_info_src_names_it(
    boards, broker, board_lane, mqtt_client, tmp_path, monkeypatch, capsys
):
    # As issue 16 did it, through the CLI: a board made with its user_main.py, then
    # a keyless list with the same user_main.py. Nothing needs downloading, but the
    # file counts as installed: the src index learns it (through the journal), so
    # info.src names it and `publish --wait` sees the list installed.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(publisher, "STATE_DIR", tmp_path / "state")
    channel = f"truth-{uuid.uuid4().hex[:8]}"
    settings = {
        "mqtt": {"server": broker.host, "port": broker.port},
        **NO_NTP,
        "update": {"channel": channel, "healthy_after_s": 1},
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "user_main.py").write_text(USER_SAME)
    assert cli(["vboard", "create", "b1", "--app", "--user-main", "user_main.py"]) == 0
    rb = boards.start(Board(tmp_path / "b1"), heap=board_lane.heap, lane=board_lane)
    rb.wait_for("USER same", timeout=30)
    capsys.readouterr()
    status = cli(["publish", "--extra-src-files", "user_main.py", "--wait", "120"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(rf"{rb.board.device_id}\s+ok", out), out
    # One install boot, no download, then the app; the retained list is done.
    rb.wait_for("list seen again: already done", timeout=30)
    console = rb.console()
    assert rb.boots() == 3, console
    assert "committing 1 file operations" in console, console  # src.json, nothing else
    rb.stop()
    index = json.loads(rb.board.cat(".mpypi/src.json"))
    assert index == {"user_main.py": sha256(USER_SAME.encode())}
    publish(mqtt_client(), f"mpypi/channels/{channel}", b"")


def test_a_src_file_in_place_is_indexed_once_and_then_a_list_needs_nothing(
    app_board, boards, mqtt_client, channel
):
    # Signed lists, at the install boot's level: the first list finds user_main.py
    # in place and only records it (no download, one commit of the index); a second
    # list with the same file then needs nothing at all (idle, no commit).
    board = app_board()
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    same = make_src("user_main.py", USER_V1)
    publish_update(mqtt_client(), channel, [same], seq=2)
    rb.wait_for("list seq 2 seen again: already done", timeout=60)
    info = wait_info(watch, seq=2, result="ok")  # after its trial
    assert info["src"] == {"user_main.py": same.sha}
    assert info["last_update"]["result"] == "ok"
    assert not any(s.get("state") == "downloading" for s in watch.statuses)
    watch.wait_status(state="rebooting", seq=2)
    assert rb.boots() == 3
    publish_update(mqtt_client(), channel, [same], seq=3)
    watch.wait_status(state="idle")
    rb.wait_for("list seq 3 seen again: already done", timeout=60)
    console = rb.console()
    assert rb.boots() == 5, console
    assert console.count("committing") == 1, console  # the index, once


def test_every_download_reports_its_end_wheel_and_src_alike(
    app_board, boards, mqtt_client, channel
):
    # Progress is throttled to one status a second per package: a package that
    # streams in faster showed only its 0%. Each package's last `downloading`
    # says done == total, for a src file (named by its path) as for a wheel.
    board = app_board()
    watch = Watcher(mqtt_client(), board.device_id)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1", timeout=30)
    w = make_wheel("demo-pkg", "1.0", {"demo_pkg/__init__.py": b"VERSION = '1.0'\n"})
    s = make_src("user_main.py", b"async def user_main():\n    print('USER v2')\n" + b"#" * 5000)
    publish_update(mqtt_client(), channel, [w, s], seq=4)
    rb.wait_for("USER v2", timeout=60)
    watch.wait_status(state="rebooting", seq=4)
    for label, pkg in (("demo-pkg", w), ("user_main.py", s)):
        mine = [st for st in watch.statuses if st.get("package") == label]
        seen = [(st["state"], st.get("done"), st.get("total")) for st in mine]
        size = len(pkg.data)
        assert ("downloading", 0, size) in seen, seen
        assert ("downloading", size, size) in seen, seen  # the end: 100%
        assert seen.index(("downloading", size, size)) < seen.index(("verifying", None, None))


@pytest.fixture
def keyless_board(boards, full_mpy, broker, channel):
    """An app board with no update key: it takes unsigned lists."""

    def make():
        settings = {
            "mqtt": {"server": broker.host, "port": broker.port},
            **NO_NTP,
            "update": {"channel": channel, "healthy_after_s": 1},
        }
        board = boards.create()
        board.put_tree(full_mpy, "lib/mpy_blox")
        for path, data in {
            "main.py": (REPO / "main.py").read_bytes(),
            "mpypi_recover.mpy": (full_mpy.parent / "mpypi_recover.mpy").read_bytes(),
            "settings.json": json.dumps(settings).encode(),
            "user_main.py": USER_V1,
        }.items():
            board.write(path, data)
        return board

    return make


def test_a_keyless_device_installs_a_retained_cmd_list_and_another_channel_list_once_each(
    keyless_board, boards, mqtt_client, channel
):
    # Unsigned lists have no seq. Each (re)connect delivers both retained lists;
    # with only the last finished list remembered, the other one looked new every
    # time and the device installed the two in turn forever. Now NVS ib keeps the
    # last list finished from each topic: two install boots, then both are done.
    board = keyless_board()
    pub = mqtt_client()
    a = make_src("user_main.py", b"async def user_main():\n    print('USER cmd')\n")
    b = make_src("user_main.py", b"async def user_main():\n    print('USER channel')\n")
    lists = {}
    for to, pkg in ((f"nodes/{board.device_id}/cmd", a), (f"channels/{channel}", b)):
        publish(pub, topics.package_topic(pkg.entry), pkg.data)
        lists[to] = manifest.encode_list([pkg.entry])
        publish(pub, "mpypi/" + to, lists[to])
    rb = boards.start(board, heap=HEAP)
    # The third app boot (after two install boots) sees both lists as done.
    not_a_boot = r"(?:(?!\[vboard\] boot )[\s\S])*?"
    rb.wait_for(
        r"\[vboard\] boot 5 "
        + not_a_boot
        + "list seen again: already done"
        + not_a_boot
        + "list seen again: already done",
        timeout=120,
    )
    console = rb.console()
    assert console.count("update accepted") == 2, console
    assert rb.boots() == 5, console
    rb.stop()
    ib = bytes.fromhex(board.nvs()["mpypi"]["ib"][1])
    assert ib[0] == 0 and ib[2] == 1  # nothing pending, the last list finished
    assert ib[35:67].hex() == sha256(lists[f"channels/{channel}"])  # the channel's
    assert ib[67:99].hex() == sha256(lists[f"nodes/{board.device_id}/cmd"])  # the cmd's
    for to in lists:
        publish(pub, "mpypi/" + to, b"")
