"""Power loss at every NVS write of an update: accepting a list, the install boot, confirm.

ESP-IDF makes each NVS write durable on its own (nvs_commit is a no-op), and the
virtual board does the same (docs/vboard.md): a cut can fall between any two writes
of a multi-key update. A template board has finished one signed list (seq 1) and
finds the next (seq 2) retained on its channel when it boots. A clean run is counted
in NVS writes (the boot counts, the agent accepting the list, the install boot's
start and finish, the next app boot); then, on a fresh copy of the template each
time, the power is cut before write n and comes back. Every run must end with the
list installed (its journal committed exactly once) and reported, never looking
finished without having been installed. Confirming the new set writes no NVS (the
journal is on flash, mpypi_recover's): the last cut point is the next app's boot_count.
"""

from __future__ import annotations

import json
import re

from test_update_installboot import HEAP, USER_V1, app_board, channel, publish_update
from update_kit import clone_board, make_src

__all__ = ["app_board", "channel"]  # fixtures, used by name

USER_V1B = b"async def user_main():\n    print('USER v1b')\n"
USER_V2 = b"async def user_main():\n    print('USER v2')\n"


def template(app_board, boards, mqtt_client, channel):
    """A board that finished list seq 1, stopped, with list seq 2 retained for it."""
    board = app_board(files={"user_main.py": USER_V1})
    rb = boards.start(board, heap=HEAP)
    rb.wait_for("USER v1\r?\n", timeout=30)
    publish_update(mqtt_client(), channel, [make_src("user_main.py", USER_V1B)], seq=1)
    rb.wait_for("USER v1b", timeout=60)
    rb.wait_for("list seq 1 seen again: already done", timeout=30)
    rb.stop()
    v2 = make_src("user_main.py", USER_V2)
    publish_update(mqtt_client(), channel, [v2], seq=2)
    return board


def run_to_end(boards, board, **start) -> str:
    """Boot until the app's agent has seen list seq 2 as done and user code runs."""
    rb = boards.start(board, heap=HEAP, **start)
    # User code runs, then (after its trial) the agent takes the retained list up.
    rb.wait_for(r"USER v\w+[\s\S]*list seq 2 seen again: already done", timeout=90)
    rb.stop()
    return rb.console()


def check_installed(board, out: str, n: int) -> None:
    runs = re.findall(r"USER (v\w+)[\s\S]*?list seq 2 seen again", out)[-1]
    assert runs == "v2", f"cut at NVS write {n}: looks finished, never installed\n{out}"
    mpypi = board.nvs()["mpypi"]
    assert mpypi["seq"] == ["i32", 2], (n, mpypi)
    ib = bytes.fromhex(mpypi["ib"][1])
    assert ib[0] == 0 and ib[2] == 1, (n, ib[:3])  # nothing pending, finished
    last = json.loads(board.cat(".mpypi/last.json"))
    assert last["result"] == "ok" and last["at"] == 2, (n, last)
    assert ib[3:35].hex() == last["list"], n  # the list it finished is the one installed
    assert ib[35:67].hex() == last["list"], n  # and the last one from the channel topic


def test_power_cut_at_every_nvs_write_of_an_update_ends_installed_and_reported(
    app_board, boards, mqtt_client, channel, tmp_path
):
    board = template(app_board, boards, mqtt_client, channel)
    clean = clone_board(board, tmp_path / "clean")
    out = run_to_end(boards, clean)
    check_installed(clean, out, 0)
    total = clean.nvs_writes()
    assert 4 <= total <= 12, out  # three boot counts, accept, install boot start and end
    installs = []
    for n in range(1, total + 1):
        b = clone_board(board, tmp_path / f"cut{n}")
        out = run_to_end(boards, b, cut_nvs_at=n)
        assert f"power-cut at NVS write {n}" in out, out
        check_installed(b, out, n)
        commits = len(re.findall(r"update: committing \d+ file operations", out))
        assert commits == 1, f"cut at NVS write {n}: committed {commits} times\n{out}"
        installs.append(len(re.findall("update installed: resetting", out)))
    print(f"{total} NVS writes, a cut at each: 'update installed' per run {installs}")
