"""What a device reports is true (issue 16): files in place count as installed, progress
reaches 100%, and a keyless device installs each retained list once.

Each test runs an app-managed virtual board against the real Mosquitto.
"""

from __future__ import annotations

import json

import pytest
from test_update_agent import publish
from test_update_installboot import HEAP, USER_V1, app_board, channel
from update_kit import REPO, make_src, sha256

from mpy_blox import topics
from mpy_blox.update import manifest

__all__ = ["app_board", "channel"]  # fixtures, used by name


@pytest.fixture
def keyless_board(boards, full_mpy, broker, channel):
    """An app board with no update key: it takes unsigned lists."""

    def make():
        settings = {
            "mqtt": {"server": broker.host, "port": broker.port},
            "update": {"channel": channel},
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
