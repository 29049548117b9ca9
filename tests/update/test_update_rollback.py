"""Rollback of an update on trial, on the virtual board (LittleFS and FAT).

A template board ran 1.0 of a wheel and a src file and then installed 2.0 (files
added, changed and removed, `/.mpypi/src.json` too): its journal is applied, the
new set is on trial, the old files are the stage's backups. Its main.py is then
ROLLBACK_DRIVER: boot recovery, then what /action says, reporting the set it sees.
"""

from __future__ import annotations

import re

import pytest
from test_update_power import sample, template
from update_kit import DRIVER, REPO, clone_board, nvs_key, set_nvs_key, snapshot

from mpy_blox_tools.vboard.board import Board

FILESYSTEMS = ["littlefs", "fat"]
ROLLBACK_DRIVER = r"""
import json
import machine
import mpypi_recover as r


def flag(name):
    try:
        with open("/" + name) as f:
            return f.read().strip()
    except OSError:
        return ""


def which_set():
    with open("/expect.json") as f:
        expect = json.load(f)
    for name in ("old", "new"):
        if all(r.file_sha256(p) == h for p, h in expect[name].items()):
            return name
    return "mixed"


if flag("wdt"):
    machine._start(machine.WDT_RESET, machine._wdt)  # as the boot after a watchdog reset
print("RECOVER", r.recover())
print("SET", which_set())
action = flag("action")
if action == "rollback":
    print("REQUEST", r.request_rollback("test reason"))
    if r.state() == "rolling_back":
        r.rollback()
elif action == "rollback-long":
    print("REQUEST", r.request_rollback("line 1\nline 2 \u00e9 " + "x" * 300))
    r.rollback()
elif action == "request":
    print("REQUEST", r.request_rollback("test reason"))
    try:
        r.confirm()  # as Installer.begin() does
        print("CONFIRMED")
    except ValueError as e:
        print("REFUSED", e)
elif action == "confirm":
    r.confirm()
elif action == "forget":
    r.forget_rollback()
print("FINAL", which_set(), r.state(), repr(r.rolled_back()))
print("DONE")
"""


def run(boards, board: Board, **kwargs) -> str:
    rb = boards.start(board, **kwargs)
    rb.wait_for(r"\nDONE", timeout=60)
    out = rb.console()
    rb.stop()
    return out


def final(out: str) -> tuple[str, str, str]:
    """(set, state, repr of rolled_back()) of the run's last FINAL line."""
    return re.findall(r"FINAL (\S+) (\S+) (.*?)\r?\n", out)[-1]


# Where a run doing each action ends: (set, state, repr of rolled_back()).
OUTCOME = {
    "rollback": ("old", "none", "'test reason'"),
    "confirm": ("new", "none", "None"),
}
_TEMPLATES: dict[str, Board] = {}


@pytest.fixture
def on_trial(boards, update_board, tmp_path_factory, tmp_path):
    """on_trial(fs, name) -> a fresh copy of the board with 2.0 on trial, and the
    old set's snapshot (every file and folder outside the journal's own)."""

    def make(fs: str, name: str = "b") -> tuple[Board, dict]:
        if fs not in _TEMPLATES:
            board = template(update_board, boards, fs)
            old = snapshot(board)
            rb = boards.start(board)
            rb.wait_for(r"\nDONE", timeout=60)
            out = rb.console()
            rb.stop()
            assert "INSTALLED 2" in out and "FINAL new applied" in out, out
            board.write("main.py", ROLLBACK_DRIVER.encode())
            keep = clone_board(board, tmp_path_factory.mktemp(f"trial-{fs}") / "board")
            _TEMPLATES[fs] = keep
            keep.old = old
        t = _TEMPLATES[fs]
        return clone_board(t, tmp_path / name), t.old

    return make


@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_rollback_leaves_exactly_the_old_set_byte_for_byte(boards, on_trial, fs):
    board, old = on_trial(fs)
    out = run(boards, board)  # a boot of the trial: counted in NVS
    assert "RECOVER applied" in out and "SET new" in out, out
    assert nvs_key(board, "trial_boots") == ["i32", 1]
    board.write("action", b"rollback")
    out = run(boards, board)
    assert "REQUEST True" in out, out
    assert final(out) == ("old", "none", "'test reason'"), out
    board.rm("action")
    assert snapshot(board) == old
    assert [p for p in board.ls(".mpypi/stage")] == []  # the stage is empty
    assert nvs_key(board, "trial_boots") is None
    assert board.cat(".mpypi/rollback") == b"test reason"
    # Reported: the agent forgets it, and a later boot changes nothing.
    board.write("action", b"forget")
    out = run(boards, board)
    assert "RECOVER none" in out and final(out) == ("old", "none", "None"), out


@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_a_rolling_back_journal_is_not_confirmed_and_the_next_boot_rolls_it_back(
    boards, on_trial, fs
):
    board, old = on_trial(fs)
    board.write("action", b"request")
    out = run(boards, board)
    assert "REQUEST True" in out and "REFUSED journal rolling back" in out, out
    assert final(out) == ("new", "rolling_back", "None"), out
    board.rm("action")
    out = run(boards, board)
    assert "RECOVER rolled_back" in out and final(out) == ("old", "none", "'test reason'"), out
    assert "rolling back the update on trial: test reason" in out, out
    assert snapshot(board) == old


def test_recover_rolls_back_after_a_watchdog_reset_during_a_trial(boards, on_trial):
    board, old = on_trial("littlefs")
    board.write("wdt", b"1")
    out = run(boards, board)
    assert "RECOVER rolled_back" in out, out
    assert final(out) == ("old", "none", "'watchdog reset'"), out
    board.rm("wdt")
    assert snapshot(board) == old
    assert nvs_key(board, "trial_boots") is None


def test_recover_rolls_back_on_the_fourth_boot_of_a_trial(boards, on_trial):
    board, old = on_trial("littlefs")
    for n in (1, 2, 3):
        out = run(boards, board)
        assert "RECOVER applied" in out and final(out)[:2] == ("new", "applied"), out
        assert nvs_key(board, "trial_boots") == ["i32", n]
    out = run(boards, board)
    assert "RECOVER rolled_back" in out, out
    assert final(out) == ("old", "none", "'reset 3 times during the trial'"), out
    assert snapshot(board) == old
    assert nvs_key(board, "trial_boots") is None


def test_a_confirm_ends_the_count_and_nothing_rolls_back_outside_a_trial(boards, on_trial):
    board, _ = on_trial("littlefs")
    run(boards, board)
    run(boards, board)
    assert nvs_key(board, "trial_boots") == ["i32", 2]
    board.write("action", b"confirm")
    out = run(boards, board)
    assert final(out) == ("new", "none", "None"), out
    assert nvs_key(board, "trial_boots") is None
    new = snapshot(board)
    # Outside a trial: boots, a watchdog reset, a rollback request change nothing.
    board.rm("action")
    for _ in range(4):
        out = run(boards, board)
        assert "RECOVER none" in out and final(out) == ("new", "none", "None"), out
    board.write("wdt", b"1")
    board.write("action", b"rollback")
    out = run(boards, board)
    assert "RECOVER none" in out and "REQUEST False" in out, out
    assert final(out) == ("new", "none", "None"), out
    assert nvs_key(board, "trial_boots") is None
    board.rm("wdt")
    board.rm("action")
    assert snapshot(board) == new


def test_a_stale_trial_count_outside_a_trial_is_erased(boards, on_trial):
    board, _ = on_trial("littlefs")
    board.write("action", b"confirm")
    run(boards, board)
    set_nvs_key(board, "trial_boots", ["i32", 3])  # a confirm cut before it erased it
    board.rm("action")
    out = run(boards, board)
    assert "RECOVER none" in out, out
    assert nvs_key(board, "trial_boots") is None


# -- power cuts ------------------------------------------------------------------


def cut_and_check(boards, board: Board, n: int, action: str) -> str:
    """Cut before block write n of a run doing `action`, boot again doing it again:
    the old or the new set after recovery, and the run's outcome at the end."""
    rb = boards.start(board, cut_at=n, once=True)
    rb.wait(timeout=60)
    cut_out = rb.console()
    cut = re.search(r"board stopped: power-cut at block write (\d+)", cut_out)
    assert cut and int(cut.group(1)) == n, cut_out
    assert "\nDONE" not in cut_out
    out = run(boards, board)
    after = re.search(r"SET (\w+)", out).group(1)
    assert after in ("old", "new"), f"cut at {n}:\n{cut_out}\n{out}"
    assert final(out) == OUTCOME[action], f"cut at {n} did not converge:\n{cut_out}\n{out}"
    assert nvs_key(board, "trial_boots") is None, n
    return after


def cut_board(on_trial, fs: str, action: str, name: str) -> Board:
    """A board on trial after one boot of the trial, about to do `action`."""
    board, _ = on_trial(fs, name)
    set_nvs_key(board, "trial_boots", ["i32", 1])
    board.write("action", action.encode())
    return board


def cut_points(boards, on_trial, fs: str, action: str) -> int:
    """The block writes of a clean run doing `action`."""
    board = cut_board(on_trial, fs, action, "clean")
    out = run(boards, board)
    assert "DONE" in out, out
    return board.block_writes()


@pytest.mark.parametrize("action", ["rollback", "confirm"])
@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_power_cut_sample_in_rollback_and_confirm_leaves_old_or_new_and_converges(
    boards, on_trial, fs, action
):
    total = cut_points(boards, on_trial, fs, action)
    assert total > 3, total
    seen = set()
    for n in sample(total, 5):
        seen.add(cut_and_check(boards, cut_board(on_trial, fs, action, f"cut{n}"), n, action))
    if action == "rollback":
        assert seen == {"old", "new"}, seen  # cut before and after the request took
    else:
        assert seen == {"new"}, seen


@pytest.mark.soak
@pytest.mark.parametrize("action", ["rollback", "confirm"])
@pytest.mark.parametrize("fs,k", [("littlefs", 0), ("fat", 40)])
def test_power_cut_at_every_block_write_of_rollback_and_confirm(boards, on_trial, fs, k, action):
    total = cut_points(boards, on_trial, fs, action)
    points = sample(total, k) if k else range(1, total + 1)
    results = [
        cut_and_check(boards, cut_board(on_trial, fs, action, f"cut{n}"), n, action)
        for n in points
    ]
    print(
        f"{fs} {action}: {total} block writes, cut at {len(results)}: "
        f"{results.count('old')} old, {results.count('new')} new, all converged"
    )


def nvs_cut_and_check(boards, board: Board, n: int, want: tuple) -> str:
    rb = boards.start(board, cut_nvs_at=n, once=True)
    rb.wait(timeout=60)
    cut_out = rb.console()
    assert f"power-cut at NVS write {n}" in cut_out, cut_out
    if "wdt" in board.ls():
        board.rm("wdt")  # the boot after a power cut is no watchdog reset
    out = run(boards, board)
    after = re.search(r"SET (\w+)", out).group(1)
    assert after in ("old", "new"), f"cut at NVS write {n}:\n{cut_out}\n{out}"
    assert final(out) == want, f"cut at NVS write {n} did not converge:\n{cut_out}\n{out}"
    assert nvs_key(board, "trial_boots") is None, n
    return after


@pytest.mark.parametrize(
    "how,want",
    [
        ("rollback", ("old", "none", "'test reason'")),
        ("confirm", ("new", "none", "None")),
        ("fourth boot", ("old", "none", "'reset 3 times during the trial'")),
        ("wdt", ("old", "none", "'watchdog reset'")),
    ],
)
@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_power_cut_at_every_nvs_write_of_rollback_and_confirm(boards, on_trial, fs, how, want):
    def prepare(name):
        board, _ = on_trial(fs, name)
        if how == "fourth boot":
            set_nvs_key(board, "trial_boots", ["i32", 3])
        else:
            set_nvs_key(board, "trial_boots", ["i32", 1])
        if how == "wdt":
            board.write("wdt", b"1")
        elif how in ("rollback", "confirm"):
            board.write("action", how.encode())
        return board

    clean = prepare("clean")
    out = run(boards, clean)
    assert final(out) == want, out
    total = clean.nvs_writes()
    assert total >= 1, out  # at least the count's erase
    for n in range(1, total + 1):
        nvs_cut_and_check(boards, prepare(f"cut{n}"), n, want)


# -- main.py ---------------------------------------------------------------------

# A framework that cannot start with 2.0 of the package it imports.
BROKEN_APP = b"""
import demo_pkg
if demo_pkg.VERSION == "2.0":
    raise ValueError("broken by 2.0")


def main():
    import mpypi_recover
    print("APP runs demo_pkg", demo_pkg.VERSION, "rolled back:", mpypi_recover.rolled_back())
"""


def with_real_main(board: Board) -> Board:
    board.write("main.py", (REPO / "main.py").read_bytes())
    board.write("lib/mpy_blox/app.py", BROKEN_APP)
    return board


@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_main_py_rolls_back_a_framework_that_fails_to_import_during_a_trial(boards, on_trial, fs):
    board, old = on_trial(fs)
    with_real_main(board)
    rb = boards.start(board)
    rb.wait_for(r"APP runs demo_pkg .*\n", timeout=60)
    rb.stop()
    out = rb.console()
    assert "the update on trial failed to start: rolling back" in out, out
    assert rb.boots() == 2, out  # the failed boot resets, the next one rolls back
    assert re.search(
        r"APP runs demo_pkg 1\.0 rolled back: framework failed to import: "
        r"ValueError\('broken by 2\.0'",
        out,
    ), out
    assert snapshot(board) == {**old, "lib/mpy_blox/app.py": BROKEN_APP}
    assert nvs_key(board, "trial_boots") is None


def test_main_py_changes_nothing_when_the_framework_fails_outside_a_trial(boards, on_trial):
    board, _ = on_trial("littlefs")
    board.write("action", b"confirm")
    run(boards, board)
    board.rm("action")
    new = snapshot(board)
    with_real_main(board)
    rb = boards.start(board)
    rb.wait_for(r"ValueError: broken by 2\.0", timeout=60)
    rb.wait_for(r">>> ")  # the REPL, as a failing main.py always left it: no reset
    rb.stop()
    out = rb.console()
    assert rb.boots() == 1 and "rolling back" not in out, out
    assert snapshot(board) == {**new, "lib/mpy_blox/app.py": BROKEN_APP}
    assert ".mpypi/rollback" not in board.ls()


@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_the_trial_keeps_only_the_replaced_files_as_backups(boards, on_trial, fs):
    board, old = on_trial(fs)
    trial = snapshot(board)
    replaced = [p for p, data in old.items() if data is not None and trial.get(p) != data]
    stage = {p: n for p, n in board.ls(".mpypi/stage").items() if n is not None}
    # The backups b<i> alone: on FAT too, where the commit copies, not its sources n<i>.
    assert all(p.split("/")[-1].startswith("b") for p in stage), stage
    kept = sum(stage.values())
    assert kept == sum(len(old[p]) for p in replaced), (stage, replaced)
    free_on_trial = board.df()[1]
    board.write("action", b"confirm")
    run(boards, board)
    freed = board.df()[1] - free_on_trial
    print(f"{fs}: the trial keeps {len(stage)} backups, {kept} bytes; confirm frees {freed}")


def test_an_unreported_rollback_does_not_mark_the_next_trial_and_its_reason_is_one_line(
    boards, on_trial
):
    board, _ = on_trial("littlefs")
    board.write("action", b"rollback-long")
    out = run(boards, board)
    assert "REQUEST True" in out, out
    reason = board.cat(".mpypi/rollback")
    assert reason == b"line 1?line 2 ? " + b"x" * 184, reason  # 200 bytes, one line
    # Never reported (no forget_rollback()): the same upgrade is installed again and
    # must go on trial, not roll back at once.
    board.write("main.py", DRIVER.encode())
    out = run(boards, board)
    assert "INSTALLED 2" in out and "FINAL new applied" in out, out
    assert ".mpypi/rollback" not in board.ls()
