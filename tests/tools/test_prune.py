"""`mpy-blox prune`: the retained packages and chunks no current list references,
listed with sizes, deleted with --yes; an unreadable list stops it (issue 15)."""

from __future__ import annotations

import os

import pytest

from mpy_blox import topics
from mpy_blox_tools import mqtt, prune, publish
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.cli import main as cli
from mpy_blox_tools.keys import generate

KEY = b"k" * 64


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fresh(tmp_path):
    """A Mosquitto of its own: prune looks at everything retained on it."""
    with Mosquitto(tmp_path / "broker") as b:
        yield b


def _url(b) -> mqtt.BrokerURL:
    return mqtt.BrokerURL(b.host, b.port)


def _release(b, tmp_path, files: dict[str, int], key=KEY, **targets) -> list[dict]:
    """Publish src files of the given sizes (16K chunks) and a list naming them."""
    packages = []
    for path, size in files.items():
        local = tmp_path / path.replace("/", "_")
        local.write_bytes(os.urandom(size))
        packages.append(publish.src_package(local, path))
    done = publish.publish_update(
        _url(b), packages, key=key, chunk_size=16384, log=lambda line: None, **targets
    )
    return done.entries


def _retained(b, *filters) -> dict[str, bytes]:
    c = mqtt.connect(_url(b))
    try:
        return mqtt.collect_retained(c, *filters)
    finally:
        mqtt.disconnect(c)


def _messages(entry: dict) -> set[str]:
    return prune.referenced([entry])


def test_prune_lists_what_no_list_references_and_deletes_it_with_yes(fresh, tmp_path, capsys):
    old = _release(fresh, tmp_path, {"app.py": 100, "data/big.bin": 40_000}, channel="stable")
    cmd = _release(fresh, tmp_path, {"fix.py": 200}, device_ids=("esp32-00000000000a",))
    new = _release(fresh, tmp_path, {"app.py": 120, "data/big.bin": 50_000}, channel="stable")
    # Signed with another kind of key, on another channel: read all the same.
    ed = _release(fresh, tmp_path, {"beta.py": 10}, key=generate(tmp_path / "k"), channel="beta")
    assert [e.get("chunks") for e in old] == [None, 3]
    before = _retained(fresh, "mpypi/#")
    url = f"mqtt://{fresh.host}:{fresh.port}"

    assert cli(["prune", "--broker", url]) == 0
    out = capsys.readouterr().out
    assert f"read 3 list(s) and {1 + 4 + 1 + 1 + 5 + 1} package message(s)" in out
    assert f"{100:>10}  {'package':<26}  {topics.package_topic(old[0])}" in out
    assert (
        f"{40_000 + 96:>10}  {'3 chunks + hash list':<26}  {topics.package_topic(old[1])}" in out
    )
    assert f"{40_196:>10}  total: 2 package(s), 5 retained message(s) no list references" in out
    assert "nothing deleted: run again with --yes" in out
    assert _retained(fresh, "mpypi/#") == before  # a listing changes nothing

    assert cli(["prune", "--broker", url, "--yes"]) == 0
    assert "deleted 5 retained message(s), 40196 bytes" in capsys.readouterr().out
    after = _retained(fresh, "mpypi/#")
    gone = _messages(old[0]) | _messages(old[1])
    assert set(before) - set(after) == gone
    for e in [*new, *cmd, *ed]:  # every package a list names, chunks and all
        assert _messages(e) <= set(after)
    assert cli(["prune", "--broker", url, "--yes"]) == 0
    assert "nothing to prune: every retained package is in a current list" in (
        capsys.readouterr().out
    )


def test_stray_chunks_of_a_listed_package_are_pruned_and_strangers_left_alone(
    fresh, tmp_path, capsys
):
    [e] = _release(fresh, tmp_path, {"big.bin": 40_000}, channel="stable")
    c = mqtt.connect(_url(fresh))
    for topic, payload in (
        (topics.chunk_topic(e, 3), b"x" * 10),  # past the list's count: no list names it
        (topics.package_topic(e), b"y" * 20),  # the whole, but the list names chunks
        ("mpypi/packages/wheel/not-a-sha256", b"z"),
        (topics.package_topic(e) + "/extra/1", b"z"),
    ):
        mqtt.publish_retained(c, topic, payload)
    mqtt.disconnect(c)
    assert cli(["prune", "--broker", f"mqtt://{fresh.host}:{fresh.port}", "--yes"]) == 0
    out = capsys.readouterr().out
    assert (
        "left alone (not a package, chunk or hash list): mpypi/packages/wheel/not-a-sha256" in out
    )
    assert f"{30:>10}  {'package + 1 chunk':<26}  {topics.package_topic(e)}" in out
    after = _retained(fresh, "mpypi/packages/#")
    assert set(after) == _messages(e) | {
        "mpypi/packages/wheel/not-a-sha256",
        topics.package_topic(e) + "/extra/1",
    }


@pytest.mark.parametrize(
    "junk",
    [b"not json", b'[{"type": "wheel"}]', b"mpypi-ed25519 00\n{}", b'{"v": 1}', b"\xff" * 20000],
)
def test_a_list_it_cannot_read_stops_prune_and_nothing_is_deleted(fresh, tmp_path, capsys, junk):
    _release(fresh, tmp_path, {"app.py": 100}, channel="stable")
    _release(fresh, tmp_path, {"app.py": 101}, channel="stable")  # the first: unreferenced
    c = mqtt.connect(_url(fresh))
    mqtt.publish_retained(c, topics.node_topic("esp32-00000000000b", "cmd"), junk)
    mqtt.disconnect(c)
    before = _retained(fresh, "mpypi/#")
    assert cli(["prune", "--broker", f"mqtt://{fresh.host}:{fresh.port}", "--yes"]) == 1
    err = capsys.readouterr().err
    assert "the retained list on mpypi/nodes/esp32-00000000000b/cmd cannot be read (" in err
    assert "nothing deleted" in err and "Traceback" not in err
    assert _retained(fresh, "mpypi/#") == before


def test_prune_refuses_to_delete_when_the_lists_change_while_it_reads(
    fresh, tmp_path, monkeypatch, capsys
):
    _release(fresh, tmp_path, {"app.py": 100}, channel="stable")
    _release(fresh, tmp_path, {"app.py": 101}, channel="stable")
    reads = []
    real = prune.read_lists

    def read_lists(client, limit=prune.READ_TIMEOUT):
        if reads:  # a publish lands between prune's survey and its deletion
            _release(fresh, tmp_path, {"app.py": 102}, channel="stable")
        reads.append(1)
        return real(client, limit)

    monkeypatch.setattr(prune, "read_lists", read_lists)
    before = _retained(fresh, "mpypi/packages/#")
    assert cli(["prune", "--broker", f"mqtt://{fresh.host}:{fresh.port}", "--yes"]) == 1
    err = capsys.readouterr().err
    assert "the lists changed while prune read them (mpypi/channels/stable)" in err
    assert set(before) <= set(_retained(fresh, "mpypi/packages/#"))


@pytest.mark.parametrize(
    "topic, owner",
    [
        ("mpypi/packages/wheel/" + "a" * 64, "mpypi/packages/wheel/" + "a" * 64),
        ("mpypi/packages/wheel/" + "a" * 64 + "/65536/12", "mpypi/packages/wheel/" + "a" * 64),
        ("mpypi/packages/src/" + "b" * 64 + "/x.py/" + "a" * 64 + "/1024/hashes",
         "mpypi/packages/src/" + "b" * 64 + "/x.py/" + "a" * 64),
        ("mpypi/packages/wheel/" + "a" * 64 + "/12", None),  # no chunk size
        ("mpypi/packages/wheel/" + "a" * 64 + "/hashes", None),
        ("mpypi/packages/src/" + "a" * 64, None),  # no path
        ("mpypi/packages/wheel/x/" + "a" * 64, None),
        ("mpypi/packages/wheel/" + "A" * 64, None),
        ("mpypi/packages/wheel/" + "a" * 64 + "/-1", None),
        ("mpypi/channels/" + "a" * 64, None),
    ],
)  # fmt: skip
def test_package_of_knows_packages_chunks_and_hash_lists_only(topic, owner):
    assert prune.package_of(topic) == owner
