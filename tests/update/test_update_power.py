"""Power loss at every block write of an install: the old set or the new set, never a mix.

A template board runs 1.0 of a wheel and a src file and holds the 2.0 list. A clean
install of it is counted in block writes; then, on a fresh copy of the template
each time, the power is cut before write n, the board boots again, and must run
the complete old or the complete new set after its boot recovery, then converge
to the new one.
"""

from __future__ import annotations

import re

import pytest
from test_update_board import expected_sets, run_to_done, wheel_v1, wheel_v2
from update_kit import REPO, board_files, clone_board, make_src

from mpy_blox.update import manifest


def template(update_board, boards, fs):
    w1, s1 = wheel_v1(), make_src("user_main.py", b"print('v1')\n")
    w2, s2 = wheel_v2(), make_src("user_main.py", b"print('v2')\n")
    files = board_files([w1, s1], manifest.encode_list([w1.entry, s1.entry]), expected_sets())
    board = update_board(files, fs=fs)
    out = run_to_done(boards, board)
    assert "FINAL old applied" in out, out
    for path, data in board_files(
        [w2, s2], manifest.encode_list([w2.entry, s2.entry]), expected_sets()
    ).items():
        board.write(path, data)
    return board


def count_writes(boards, board, tmp_path):
    clean = clone_board(board, tmp_path / "clean")
    out = run_to_done(boards, clean)
    assert "SET old" in out and "INSTALLED 2" in out and "FINAL new applied" in out, out
    return clean.block_writes()


def cut_and_check(boards, board, tmp_path, n):
    b = clone_board(board, tmp_path / f"cut{n}")
    rb = boards.start(b, cut_at=n, once=True)
    rb.wait(timeout=60)
    cut_out = rb.console()
    # The cut fell where it was asked: at write n, with writes 1..n-1 on the flash.
    cut = re.search(r"board stopped: power-cut at block write (\d+)", cut_out)
    assert cut and int(cut.group(1)) == n, cut_out
    assert b.block_writes() == n - 1, f"cut at {n}: {b.block_writes()} writes reached the flash"
    assert "\nDONE" not in cut_out
    out = run_to_done(boards, b)
    after = re.search(r"SET (\w+)", out).group(1)
    runs = re.search(r"RUNS (\S+)", out).group(1)
    assert (after, runs) in (("old", "1.0"), ("new", "2.0")), f"cut at {n}:\n{cut_out}\n{out}"
    assert "FINAL new applied" in out, f"cut at {n} did not converge:\n{out}"
    return after


def sample(total, k):
    if total <= k:
        return list(range(1, total + 1))
    return sorted({1 + round(i * (total - 1) / (k - 1)) for i in range(k)})


@pytest.mark.parametrize("fs,k", [("littlefs", 12), ("fat", 25)])
def test_power_cut_sample_leaves_old_or_new_set_and_converges(
    boards, update_board, tmp_path, fs, k
):
    board = template(update_board, boards, fs)
    total = count_writes(boards, board, tmp_path)
    assert total > 5
    seen = {cut_and_check(boards, board, tmp_path, n) for n in sample(total, k)}
    assert seen == {"old", "new"}  # the cuts fell on both sides of the commit point


@pytest.mark.soak
@pytest.mark.parametrize("fs", ["littlefs", "fat"])
def test_power_cut_at_every_block_write_leaves_old_or_new_set(boards, update_board, tmp_path, fs):
    board = template(update_board, boards, fs)
    total = count_writes(boards, board, tmp_path)
    results = [cut_and_check(boards, board, tmp_path, n) for n in range(1, total + 1)]
    print(
        f"{fs}: {total} block writes, cut at each: "
        f"{results.count('old')} old, {results.count('new')} new, all converged"
    )


def test_real_main_py_finishes_an_interrupted_commit_before_the_app_imports(
    boards, update_board, tmp_path
):
    board = template(update_board, boards, "littlefs")
    total = count_writes(boards, board, tmp_path)
    # The applied marker is among the last writes of the install (then the stage
    # drops what the trial does not need): the latest cut that leaves a complete
    # journal whose files are all moved but not yet marked applied.
    for n in range(total, 0, -1):
        b = clone_board(board, tmp_path / f"cut{n}")
        rb = boards.start(b, cut_at=n, once=True)
        rb.wait(timeout=60)
        if "RECOVER rolled_forward" in run_to_done(boards, clone_board(b, tmp_path / f"p{n}")):
            break
    # Now boot with the framework's own main.py and an app that reports what it runs.
    b.write("main.py", (REPO / "main.py").read_bytes())
    b.write(
        "lib/mpy_blox/app.py",
        b"def main():\n    import demo_pkg, mpypi_recover\n"
        b"    print('APP runs demo_pkg', demo_pkg.VERSION, mpypi_recover.state())\n",
    )
    rb = boards.start(b)
    rb.wait_for(r"APP runs demo_pkg 2\.0 applied")
    out = rb.console()
    assert out.index("finishing an interrupted update") < out.index("APP runs")
