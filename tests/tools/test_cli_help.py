"""A CLI that explains itself (issue 16): every command's --help says what it does,
explains every option with its default, and ends with an example."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from mpy_blox_tools.cli import build_parser
from mpy_blox_tools.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every subcommand, nested ones (vboard create, deploy app) too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"build", "publish", "status", "broker", "vboard create", "vboard run"} <= names
    assert {"deploy app", "deploy purge-lib", "vboard net", "keygen", "demo", "prune"} <= names
    assert {"rollout start", "rollout resume", "rollout abort"} <= names


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_says_what_it_does_explains_its_options_and_ends_with_an_example(
    path, parser
):
    text = parser.format_help()
    lines = text.rstrip().splitlines()
    # usage (one or more lines), a blank line, then what it does
    described = lines[lines.index("") + 1]
    assert described and described[0].isupper() and not described.startswith("usage"), text
    assert parser.epilog.startswith("example:\n") and text.rstrip().endswith(parser.epilog)
    example = parser.epilog.splitlines()[1]
    assert example.startswith(f"  mpy-blox {' '.join(path)}"), example
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{path} {name}: no help"
        shows_default = action.default not in (None, False, argparse.SUPPRESS)
        if shows_default and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, f"{path} {name}: default {action.default!r} not said"


def test_broker_help_shows_the_port_and_dir_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps option help to the terminal's width
    with pytest.raises(SystemExit) as exit:
        cli(["broker", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[lines.index("") + 1] == (
        "Run a local MQTT broker for your devices (Mosquitto, or the embedded amqtt)."
    )
    assert "  --port PORT  " in out and out.count("TCP port (default 1883)\n") == 1
    assert "where retained messages are kept (default .mpy-blox/broker)\n" in out
    assert out.rstrip().endswith(
        "example:\n  mpy-blox broker --bind 0.0.0.0 --password-file passwd"
    )


def test_the_publish_script_has_the_same_help():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "publish_ota_update.py"), "--help"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert proc.returncode == 0
    assert "--json" in proc.stdout and "example:\n  mpy-blox publish --channel" in proc.stdout
