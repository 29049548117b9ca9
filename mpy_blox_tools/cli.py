"""`mpy-blox`: the workstation's command line. Thin: every command calls a library function."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from mpy_blox_tools import micropython
from mpy_blox_tools.broker import ENGINES, MAX_PACKET_SIZE
from mpy_blox_tools.build import PLATFORMS
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard.board import CLOCKS, DEFAULT_FLASH, FILESYSTEMS, Board


def _command(
    sub: argparse._SubParsersAction, name: str, does: str, example: str, more: str = ""
) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with what it does and ends with an example."""
    return sub.add_parser(
        name,
        help=does,
        description=does[0].upper() + does[1:] + "." + (f"\n\n{more}" if more else ""),
        epilog="example:\n  " + example.replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


DIR_HELP = "the board's folder"


def _vboard_create(args: argparse.Namespace) -> int:
    if args.seq_floor is not None and not args.app:
        raise MpyBloxError("--seq-floor goes with --app (it is set over the serial port)")
    if args.app:  # the files first: a failed create leaves nothing behind
        for given in (args.settings, args.provision, args.user_main):
            if given is not None and not Path(given).is_file():
                raise MpyBloxError(f"{given}: no such file")
    board = Board.create(
        args.dir, device_id=args.device_id, fs=args.fs, flash_size=args.flash, clock=args.clock
    )
    print(f"created {board.device_id} in {board.dir} ({args.fs}, {args.flash} flash)")
    if args.app:
        try:
            _deploy_app_to(board, args)
        except BaseException:
            shutil.rmtree(board.dir, ignore_errors=True)  # a new folder: ours to remove
            print(f"removed {board.dir}: the app did not deploy", file=sys.stderr)
            raise
    return 0


def _deploy_app_to(board: Board, args: argparse.Namespace) -> None:
    from mpy_blox_tools import deploy, resources
    from mpy_blox_tools.vboard.process import RunningBoard

    # Through the board's serial port, exactly as `make deploy-app` on hardware.
    with RunningBoard(board) as rb:
        rb.wait_for(r"\[vboard\] boot 1")
        deploy.deploy_app(
            rb.serial_port,
            resources.settings_or_default(args.settings),
            Path(args.provision) if args.provision else None,
            Path(args.user_main) if args.user_main else None,
            reset=False,
            seq_floor=args.seq_floor,
        )


def _power_arguments(p: argparse.ArgumentParser, whose: str) -> None:
    """The power-cut options of `vboard run` and `vboard fleet` (for each board)."""
    p.add_argument(
        "--cut-at",
        type=int,
        default=0,
        metavar="N",
        help=whose + "cut the power at the Nth flash block write of the first boot "
        "(default 0: never)",
    )
    p.add_argument(
        "--cut-nvs-at",
        type=int,
        default=0,
        metavar="N",
        help=whose + "cut the power at the Nth NVS write (set_*, erase_key) of the run, "
        "any boot (default 0: never)",
    )
    p.add_argument("--once", action="store_true", help=whose + "switch off instead of rebooting")


def _vboard_run(args: argparse.Namespace) -> int:
    from mpy_blox_tools.vboard.supervisor import run_board

    return run_board(
        args.dir,
        heap=args.heap,
        cut_at=args.cut_at,
        cut_nvs_at=args.cut_nvs_at,
        once=args.once,
        quiet=args.quiet,
    )


def _vboard_fleet(args: argparse.Namespace) -> int:
    from mpy_blox_tools.vboard.fleet import run_fleet

    return run_fleet(
        args.dirs,
        heap=args.heap,
        cut_at=args.cut_at,
        cut_nvs_at=args.cut_nvs_at,
        once=args.once,
    )


def _vboard_ls(args: argparse.Namespace) -> int:
    for name, size in Board(args.dir).ls(args.path).items():
        print(f"{'' if size is None else size:>10} {name}{'/' if size is None else ''}")
    return 0


def _vboard_cat(args: argparse.Namespace) -> int:
    sys.stdout.buffer.write(Board(args.dir).cat(args.path))
    return 0


def _vboard_put(args: argparse.Namespace) -> int:
    Board(args.dir).put(args.source, args.path)
    return 0


def _vboard_rm(args: argparse.Namespace) -> int:
    Board(args.dir).rm(args.path)
    return 0


def _vboard_fill(args: argparse.Namespace) -> int:
    written = Board(args.dir).fill(micropython.parse_size(args.leave) if args.leave else 0)
    print(f"wrote {written} bytes to /.fill")
    return 0


def _vboard_net(args: argparse.Namespace) -> int:
    Board(args.dir).set_network(args.state == "up")
    return 0


def _vboard_firmware(args: argparse.Namespace) -> int:
    from mpy_blox_tools.firmware import read_image
    from mpy_blox_tools.vboard.image import write_image

    out = write_image(args.binary, args.version, args.output, chip=args.chip)
    image = read_image(out)
    print(f"{out}: {image.chip} firmware {image.version}, {image.size} bytes, {image.sha256}")
    return 0


def _add_vboard(sub: argparse._SubParsersAction) -> None:
    vb = _command(
        sub,
        "vboard",
        "virtual ESP32 boards on the MicroPython unix port",
        "mpy-blox vboard create boards/b1 --app --user-main user_main.py\n"
        "mpy-blox vboard run boards/b1",
        "Each board is a folder: its flash image, NVS and id. `mpy-blox vboard COMMAND\n"
        "--help` for each command; docs/vboard.md for the whole story.",
    )
    vsub = vb.add_subparsers(dest="vboard_command", required=True, metavar="COMMAND")

    p = _command(
        vsub,
        "create",
        "make a virtual board in folder DIR",
        "mpy-blox vboard create boards/b1 --app --settings settings.json --user-main user_main.py",
    )
    p.add_argument("dir", metavar="DIR", help="a new or empty folder for the board")
    p.add_argument("--device-id", help="esp32-<12 hex digits> (default: random)")
    p.add_argument(
        "--fs",
        choices=FILESYSTEMS,
        default="littlefs",
        help="the flash's filesystem; posix maps a host folder (default littlefs)",
    )
    p.add_argument("--flash", default=DEFAULT_FLASH, help="flash size (default 2M)")
    p.add_argument(
        "--clock",
        choices=CLOCKS,
        default="unset",
        help="its RTC at power-on: unset (2000-01-01, until NTP sets it) or host (default unset)",
    )
    p.add_argument(
        "--app",
        action="store_true",
        help="deploy the framework and main.py (as make deploy-lib deploy-app)",
    )
    p.add_argument(
        "--settings",
        help="with --app (default ./settings.json, else the framework's defaults)",
    )
    p.add_argument(
        "--provision", help="with --app: a provision.json whose secrets go into its NVS"
    )
    p.add_argument(
        "--seq-floor",
        type=int,
        metavar="N",
        help="with --app: raise its update seq to N (the fleet's), so no older list replays",
    )
    p.add_argument("--user-main", help="with --app: a user_main.py")
    p.set_defaults(func=_vboard_create)

    p = _command(
        vsub,
        "run",
        "boot the board; prints its serial port; machine.reset() reboots it; stops on SIGTERM",
        "mpy-blox vboard run boards/b1 --heap 100K",
    )
    p.add_argument("dir", metavar="DIR", help=DIR_HELP)
    p.add_argument("--heap", default=micropython.DEFAULT_HEAP, help="heap size (default 100K)")
    _power_arguments(p, "")
    p.add_argument("--quiet", action="store_true", help="do not echo the console")
    p.set_defaults(func=_vboard_run)

    p = _command(
        vsub,
        "fleet",
        "boot many boards under one supervisor process; prints each serial port; stops on SIGTERM",
        "mpy-blox vboard fleet boards/b1 boards/b2 boards/b3 --heap 100K",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="board folders, one per board")
    p.add_argument(
        "--heap", default=micropython.DEFAULT_HEAP, help="each board's heap (default 100K)"
    )
    _power_arguments(p, "every board: ")
    p.set_defaults(func=_vboard_fleet)

    for name, helptext, example, func in (
        ("ls", "list files on the stopped board's flash", "ls boards/b1 lib", _vboard_ls),
        (
            "cat",
            "print a file from the stopped board's flash",
            "cat boards/b1 boot.py",
            _vboard_cat,
        ),
        ("rm", "remove a file from the stopped board's flash", "rm boards/b1 x.py", _vboard_rm),
    ):
        p = _command(vsub, name, helptext, f"mpy-blox vboard {example}")
        p.add_argument("dir", metavar="DIR", help=DIR_HELP)
        if name == "ls":
            p.add_argument(
                "path", metavar="PATH", nargs="?", default="", help="a folder (default: /)"
            )
        else:
            p.add_argument("path", metavar="PATH", help="a file on the board's flash")
        p.set_defaults(func=func)

    p = _command(
        vsub,
        "put",
        "copy a workstation file onto the stopped board's flash",
        "mpy-blox vboard put boards/b1 user_main.py user_main.py",
    )
    p.add_argument("dir", metavar="DIR", help=DIR_HELP)
    p.add_argument("source", metavar="FILE", help="the workstation file")
    p.add_argument("path", metavar="PATH", help="where on the board's flash")
    p.set_defaults(func=_vboard_put)

    p = _command(
        vsub,
        "fill",
        "fill the stopped board's flash (for disk-full tests)",
        "mpy-blox vboard fill boards/b1 --leave 4K",
    )
    p.add_argument("dir", metavar="DIR", help=DIR_HELP)
    p.add_argument("--leave", metavar="SIZE", help="bytes to leave free (default 0)")
    p.set_defaults(func=_vboard_fill)

    p = _command(
        vsub,
        "net",
        "take the board's Wi-Fi access point down or up (it may be running)",
        "mpy-blox vboard net boards/b1 down",
    )
    p.add_argument("dir", metavar="DIR", help=DIR_HELP)
    p.add_argument("state", choices=("up", "down"), help="up or down")
    p.set_defaults(func=_vboard_net)

    from mpy_blox_tools.firmware import CHIP_IDS

    p = _command(
        vsub,
        "firmware",
        "wrap a MicroPython executable as a virtual-board firmware image",
        "mpy-blox vboard firmware ../shared/tools/micropython32/micropython --version 1.28-32 "
        "-o mp32.vbfw",
        "A board from --flash 4M up boots the image in its active app partition;\n"
        "docs/vboard.md, 'Firmware and partitions'.",
    )
    p.add_argument("binary", metavar="BINARY", help="a micropython unix executable")
    p.add_argument("--version", required=True, help="the firmware's version (up to 31 bytes)")
    p.add_argument(
        "--chip",
        default="esp32",
        choices=list(CHIP_IDS),
        help="the chip it is for (default esp32)",
    )
    p.add_argument("-o", "--output", required=True, metavar="IMAGE", help="the image to write")
    p.set_defaults(func=_vboard_firmware)


def _build(args: argparse.Namespace) -> int:
    from mpy_blox_tools.build import build

    print(build(platform=args.platform, dev=args.dev))
    return 0


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "build",
        "build the device wheel into dist/ and print its path",
        "mpy-blox build --platform esp32 --dev",
    )
    p.add_argument(
        "--platform",
        choices=PLATFORMS,
        default="esp32",
        help="the native code mpy-cross targets (default esp32)",
    )
    p.add_argument("--dev", action="store_true", help="a dev version, unique to this build")
    p.set_defaults(func=_build)


def _publish(args: argparse.Namespace) -> int:
    import json

    from mpy_blox_tools.publish import release

    outcome = release(
        broker=args.broker,
        channel=args.channel,
        device_ids=args.device_ids or (),
        extra_src_files=args.extra_src_files or (),
        wheel=args.wheel,
        firmware=args.firmware,
        platform=args.platform,
        dev=args.dev,
        key_file=args.key_file,
        expires=args.expires,
        next_pubkey=args.next_pubkey,
        force=args.force,
        chunk_size=args.chunk_size,
        expire=args.expire,
        wait=args.wait,
        ca_file=args.ca_file,
        client_cert=args.client_cert,
        client_key=args.client_key,
        out=sys.stderr if args.json else sys.stdout,
    )
    if args.json:
        print(json.dumps(outcome.as_dict(), indent=2))
    return 0 if outcome.ok else 1


def _add_publish(sub: argparse._SubParsersAction) -> None:
    from mpy_blox_tools.publish import add_arguments

    p = _command(
        sub,
        "publish",
        "publish an update to a channel or to devices",
        "mpy-blox publish --channel stable --extra-src-files user_main.py \\\n"
        "    --key-file release.key --wait 300",
        "Builds the framework wheel (or takes --wheel), publishes it and the extra files\n"
        "retained by SHA256 (as chunks when larger than --chunk-size), then the signed list.\n"
        "A release the broker would refuse is refused whole, before anything is sent.\n"
        "With --wait, follows each device until it has confirmed the update (a device on\n"
        "trial is still in progress) or failed.",
    )
    add_arguments(p)
    p.set_defaults(func=_publish)


def _keygen(args: argparse.Namespace) -> int:
    from mpy_blox_tools import keys

    key = keys.generate(Path(args.path), force=args.force)
    print(f"wrote {args.path} (private, keep it secret) and {keys.pub_path(Path(args.path))}")
    print(f"update.pubkey: {key.public_hex}")
    return 0


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "keygen",
        "make an Ed25519 release key: PATH (private, 0600) and PATH.pub",
        "mpy-blox keygen ~/.mpy-blox/release.key",
    )
    p.add_argument("path", metavar="PATH", help="the private key file to create")
    p.add_argument("--force", action="store_true", help="replace PATH and PATH.pub if they exist")
    p.set_defaults(func=_keygen)


def _status(args: argparse.Namespace) -> int:
    from mpy_blox_tools import fleet
    from mpy_blox_tools.mqtt import BrokerURL

    broker = BrokerURL.parse(args.broker) if args.broker else BrokerURL.from_settings()
    broker = broker.with_tls(args.ca_file, args.client_cert, args.client_key)
    if args.watch:
        if args.json:
            raise MpyBloxError("--watch and --json do not go together: --json is one snapshot")
        try:
            fleet.watch(broker)
        except KeyboardInterrupt:  # how a watch ends
            pass
        return 0
    if not 0 <= args.listen <= 3600:
        raise MpyBloxError(f"--listen {args.listen:g}: from 0 (retained reports only) to 3600 s")
    devices = fleet.fetch(broker, listen=args.listen)
    print(fleet.as_json(devices) if args.json else fleet.format_table(devices))
    return 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    from mpy_blox_tools.mqtt import add_connect_arguments

    p = _command(
        sub,
        "status",
        "table of the fleet from the retained info/status topics",
        "mpy-blox status --broker mqtt://broker.lan --watch",
        "STATE says why a device needs a look: trial (time left), rolled_back, failed or\n"
        "safe_mode with the reason.",
    )
    add_connect_arguments(
        p, "mqtt[s]://[user[:password]@]host[:port] (default: from ./settings.json)"
    )
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.add_argument(
        "--watch",
        action="store_true",
        help="follow the fleet live: a table redrawn in a terminal, one line per change "
        "in a log; Ctrl-C stops it",
    )
    p.add_argument(
        "--listen",
        type=float,
        default=2.5,  # fleet.ANSWER_WINDOW (not imported here: paho is slow to import)
        metavar="SECONDS",
        help="ask live devices to announce themselves and wait up to SECONDS for their "
        "answers (default %(default)s; 0: retained reports only)",
    )
    p.set_defaults(func=_status)


def _prune(args: argparse.Namespace) -> int:
    from mpy_blox_tools import prune
    from mpy_blox_tools.mqtt import BrokerURL

    broker = BrokerURL.parse(args.broker) if args.broker else BrokerURL.from_settings()
    broker = broker.with_tls(args.ca_file, args.client_cert, args.client_key)
    prune.prune(broker, yes=args.yes)
    return 0


def _add_prune(sub: argparse._SubParsersAction) -> None:
    from mpy_blox_tools.mqtt import add_connect_arguments

    p = _command(
        sub,
        "prune",
        "list the retained packages and chunks that no current list references; "
        "--yes deletes them",
        "mpy-blox prune --broker mqtt://broker.lan\n"
        "mpy-blox prune --broker mqtt://broker.lan --yes",
        "Reads every retained list (channels and devices' cmd, signed or not: no key is\n"
        "needed) and every retained package, chunk and hash list under mpypi/packages/.\n"
        "A list it cannot read stops it: nothing is deleted. Do not run --yes while a\n"
        "publish is under way (it refuses if it sees the lists change).",
    )
    add_connect_arguments(
        p, "mqtt[s]://[user[:password]@]host[:port] (default: from ./settings.json)"
    )
    p.add_argument(
        "--yes", action="store_true", help="delete them (an empty retained message on each)"
    )
    p.set_defaults(func=_prune)


def _logs(args: argparse.Namespace) -> int:
    from mpy_blox_tools import logs
    from mpy_blox_tools.mqtt import BrokerURL

    broker = BrokerURL.parse(args.broker) if args.broker else BrokerURL.from_settings()
    broker = broker.with_tls(args.ca_file, args.client_cert, args.client_key)
    try:
        logs.follow(broker, args.device, args.level, args.follow, args.wait)
    except KeyboardInterrupt:  # how --follow ends
        pass
    return 0


def _add_logs(sub: argparse._SubParsersAction) -> None:
    from mpy_blox_tools.mqtt import add_connect_arguments

    p = _command(
        sub,
        "logs",
        "print a device's remote log (devices with logging.remote)",
        "mpy-blox logs esp32-840d8ed29760 --follow --level WARNING",
        "A device sends its last records again at every (re)connect (docs/homeassistant.md,\n"
        "'Remote log').",
    )
    add_connect_arguments(
        p, "mqtt[s]://[user[:password]@]host[:port] (default: from ./settings.json)"
    )
    p.add_argument("device", metavar="DEVICE", help="the device id, e.g. esp32-840d8ed29760")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing; Ctrl-C stops it")
    p.add_argument(
        "--level",
        default="DEBUG",
        help="show DEBUG, INFO, WARNING, ERROR or CRITICAL and above (default: DEBUG)",
    )
    p.add_argument(
        "--wait", type=float, default=3.0, help="without --follow: seconds to listen (default: 3)"
    )
    p.set_defaults(func=_logs)


def _add_rollout(sub: argparse._SubParsersAction) -> None:
    from mpy_blox_tools import rollout_cli

    rollout_cli.add_parser(sub, _command)


def _broker(args: argparse.Namespace) -> int:
    from mpy_blox_tools.broker import run_broker

    return run_broker(
        Path(args.dir),
        args.port,
        args.bind,
        Path(args.password_file) if args.password_file else None,
        args.engine,
        acl_file=Path(args.acl_file) if args.acl_file else None,
        max_packet_size=micropython.parse_size(args.max_packet_size),
    )


def _add_broker(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "broker",
        "run a local MQTT broker for your devices (Mosquitto, or the embedded amqtt)",
        "mpy-blox broker --bind 0.0.0.0 --password-file passwd",
    )
    p.add_argument("--port", type=int, default=1883, help="TCP port (default 1883)")
    p.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address to listen on, 0.0.0.0 for devices on your network (default 127.0.0.1)",
    )
    p.add_argument(
        "--dir",
        default=".mpy-blox/broker",
        help="where retained messages are kept (default .mpy-blox/broker)",
    )
    p.add_argument("--password-file", help="a mosquitto_passwd file: no anonymous access")
    p.add_argument(
        "--acl-file",
        help="with --password-file: who may read and write what "
        "(default: examples/mosquitto/mpypi.acl)",
    )
    p.add_argument(
        "--max-packet-size",
        default=str(MAX_PACKET_SIZE),
        metavar="SIZE",
        help="larger packets end the connection (default 16M: a package is one message)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="auto (default): Mosquitto when installed, otherwise the embedded amqtt broker",
    )
    p.set_defaults(func=_broker)


def _demo(args: argparse.Namespace) -> int:
    from mpy_blox_tools.demo import run_demo

    return run_demo(engine=args.engine)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "demo",
        "the end-to-end demonstration on the embedded defaults",
        "mpy-blox demo --engine amqtt",
        "A local broker, three virtual boards, a signed fleet update, then a broken\n"
        "user_main.py on one board that rolls back by itself.",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="the local broker: Mosquitto when installed, else the embedded amqtt (default auto)",
    )
    p.set_defaults(func=_demo)


def _deploy(args: argparse.Namespace) -> int:
    from mpy_blox_tools import deploy, resources

    port = args.device
    deploy.check_port(port)  # a wrong port is reported before anything is built
    wheel = Path(args.wheel) if getattr(args, "wheel", None) else None
    if args.action == "lib":
        deploy.deploy_lib(port, wheel)
    elif args.action == "app":
        user_main = Path(args.user_main)
        deploy.deploy_app(
            port,
            resources.settings_or_default(args.settings),
            Path(args.provision),
            user_main if user_main.exists() else None,
            wheel,
            seq_floor=args.seq_floor,
        )
    elif args.action == "user":
        deploy.deploy_user(port, Path(args.user_main))
    elif args.action == "provision":
        deploy.provision(port, Path(args.provision), args.seq_floor)
    elif args.action == "unprovision":
        deploy.unprovision(port)
    else:
        deploy.purge_lib(port)
    return 0


# `mpy-blox deploy ACTION`: the Makefile's device targets and their variables.
_DEPLOY_OPTIONS = {
    "wheel": ("--wheel", {"help": "install this wheel instead of building the framework"}),
    "settings": (
        "--settings",
        {"help": "copied as /settings.json (default ./settings.json, else the defaults)"},
    ),
    "provision": (
        "--provision",
        {"default": "provision.json", "help": "secrets for NVS (default provision.json)"},
    ),
    "seq_floor": (
        "--seq-floor",
        {
            "type": int,
            "metavar": "N",
            "help": "raise the device's update seq to N (the fleet's): no older list replays",
        },
    ),
    "user_main": (
        "--user-main",
        {"default": "user_main.py", "help": "your app (default user_main.py)"},
    ),
}
_DEPLOY_ACTIONS = {
    "lib": ("build the framework wheel and install it into /lib", ("wheel",)),
    "app": (
        "lib, then main.py, settings, user_main.py, provision.json's secrets if present; reset",
        ("settings", "provision", "user_main", "wheel", "seq_floor"),
    ),
    "user": ("copy user_main.py to the device", ("user_main",)),
    "provision": (
        "put provision.json's secrets into NVS over the REPL (no file on the device)",
        ("provision", "seq_floor"),
    ),
    "unprovision": ("clear the secure store in NVS", ()),
    "purge-lib": ("remove everything under /lib", ()),
}


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "deploy",
        "install Mpy-BLOX on a device over its serial port (the Makefile's targets)",
        "mpy-blox deploy app --device /dev/ttyUSB0 --user-main user_main.py",
        "With mpremote ($MPY_BLOX_MPREMOTE names another, e.g. the Windows mpremote.exe "
        "under WSL2).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, (helptext, options) in _DEPLOY_ACTIONS.items():
        a = _command(actions, action, helptext, f"mpy-blox deploy {action} --device /dev/ttyUSB0")
        a.add_argument(
            "--device",
            default=os.environ.get("DEVICE") or None,
            metavar="PORT",
            help="serial port (default: $DEVICE, else the first device mpremote finds)",
        )
        for name in options:
            flag, kwargs = _DEPLOY_OPTIONS[name]
            a.add_argument(flag, **kwargs)
    p.set_defaults(func=_deploy)


PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_build,
    _add_publish,
    _add_keygen,
    _add_status,
    _add_prune,
    _add_rollout,
    _add_logs,
    _add_broker,
    _add_vboard,
    _add_demo,
    _add_deploy,
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mpy-blox-tools")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpy-blox",
        description="Mpy-BLOX workstation tools: boards, builds and updates.\n\n"
        "`mpy-blox COMMAND --help` says what each command does, with an example.",
        epilog="example:\n  mpy-blox demo\n  mpy-blox publish --channel stable --wait 300",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mpy-blox {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSER_BUILDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MpyBloxError as e:
        print(f"mpy-blox: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
