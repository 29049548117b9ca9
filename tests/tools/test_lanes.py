"""The two lanes: which `micropython` each runs, and their heap figures."""

from __future__ import annotations

import pytest

from mpy_blox_tools import micropython


def test_without_the_variable_there_is_no_32bit_lane_and_boards_use_the_64bit_one(monkeypatch):
    monkeypatch.delenv(micropython.ENV_VAR_32, raising=False)
    assert micropython.lane32() is None
    lane = micropython.board_lane()
    assert lane.name == "64-bit" and lane.board_heap == micropython.BOARD_HEAP_64


def test_a_32bit_lane_naming_a_missing_file_is_no_lane(monkeypatch, tmp_path):
    monkeypatch.setenv(micropython.ENV_VAR_32, str(tmp_path / "no-such-micropython"))
    assert micropython.lane32() is None


def test_the_64bit_board_heap_leaves_the_install_boot_the_32bit_lanes_share_free():
    # Derived, not chosen: the same share of the heap free before the first download
    # on both lanes (rounded up to 4 KiB), and each lane's margin heap between its
    # measured edge and its board heap.
    m = micropython
    share32 = 1 - m.INSTALL_USE_32 / m.BOARD_HEAP_32
    share64 = 1 - m.INSTALL_USE_64 / m.BOARD_HEAP_64
    assert 1 - m.INSTALL_USE_64 / (m.BOARD_HEAP_64 - 4096) < share32 <= share64
    assert m.INSTALL_EDGE_32 < m.MARGIN_HEAP_32 < m.BOARD_HEAP_32
    assert m.INSTALL_EDGE_64 < m.MARGIN_HEAP_64 < m.BOARD_HEAP_64


@pytest.mark.parametrize("size", [4096, 100 * 1024, 132 * 1024, 1000])
def test_sizes_format_as_heap_takes_them(size):
    assert micropython.parse_size(micropython.format_size(size)) == size


def test_each_lane_runs_the_word_size_it_names(lane):
    bits = micropython.word_bits(lane.executable)
    assert f"{bits}-bit" == lane.name
    out = micropython.run_snippet("import sys; print(sys.maxsize)", executable=lane.executable)
    assert int(out.stdout) == 2 ** (bits - 1) - 1
