"""`mpy-blox rollout start|status|pause|resume|abort`: the command line of rollout.py.

`start` takes publish's release flags (publish.add_arguments) but --device-ids, --wait
and --json: a rollout picks its devices and follows them itself. Flags of publish that
match a keyword argument of publish.publish_update pass through to it by name.
"""

from __future__ import annotations

import argparse
import json
import time

from mpy_blox_tools import fit, keys, mqtt, publish
from mpy_blox_tools import rollout_state as rs
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.rollout import Options, control, resume, start, status

START_DROPS = ("device_ids", "wait", "json")  # publish's flags a rollout decides itself


def _duration(flag: str, text: str | None) -> int:
    if text is None:
        return 0
    try:
        return publish.parse_duration(text)
    except MpyBloxError:
        raise MpyBloxError(
            f"{flag} {text!r}: expected a number and a unit, s m h d or w (e.g. 10m)"
        ) from None


def _broker(args) -> mqtt.BrokerURL:
    broker = mqtt.BrokerURL.parse(args.broker) if args.broker else mqtt.BrokerURL.from_settings()
    return broker.with_tls(args.ca_file, args.client_cert, args.client_key)


def _publish_kwargs(args) -> dict:
    """publish_update's keyword arguments from the release flags, converted as
    `publish.release` converts them for `publish`."""
    out = {"force": args.force}
    if args.chunk_size is not None:
        out["chunk_size"] = fit.parse_chunk_size(args.chunk_size)
    if args.expire:
        out["package_expiry"] = publish.parse_expire(args.expire)
    if args.expires:
        out["expires"] = int(time.time()) + publish.parse_duration(args.expires)
    if args.next_pubkey:
        out["next_pubkey"] = keys.load_public_key(args.next_pubkey)
    return out


def _start_cli(args) -> int:
    channel = args.channel or publish.default_channel()
    rs.parse_stages(args.stages), rs.parse_max_failures(args.max_failures)
    bake_s, timeout_s = _duration("--bake", args.bake), _duration("--timeout", args.timeout)
    publish.check_targets(channel, ())
    key = publish.load_key(args.key_file)
    packages = publish.release_packages(
        args.firmware, args.wheel, args.dev, args.platform, args.extra_src_files or ()
    )
    opts = Options(key, _publish_kwargs(args), args.quiet)
    return start(
        _broker(args),
        packages,
        channel=channel,
        stages=args.stages,
        max_failures=args.max_failures,
        bake_s=bake_s,
        timeout_s=timeout_s,
        opts=opts,
    )


def _status_cli(args) -> int:
    doc = status(_broker(args), args.channel or publish.default_channel())
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(rs.summary(doc))
        if doc["status"] == "running":
            print(rs.stage_line(doc))
    return 0


def _resume_cli(args) -> int:
    opts = Options(publish.load_key(args.key_file), {}, args.quiet)
    return resume(_broker(args), args.channel or publish.default_channel(), opts)


def _pause_cli(args) -> int:
    return control(_broker(args), args.channel or publish.default_channel(), "paused")


def _abort_cli(args) -> int:
    key = publish.load_key(args.key_file) if args.revert else None
    return control(
        _broker(args), args.channel or publish.default_channel(), "aborted", args.revert, key
    )


def add_parser(sub, command) -> None:
    """`mpy-blox rollout start|status|pause|resume|abort`; `command` is cli._command."""
    p = command(
        sub,
        "rollout",
        "roll a release out to a channel in stages, halting on failures",
        "mpy-blox rollout start --channel stable --stages 1,10%,50%,100% \\\n"
        "    --max-failures 2 --bake 10m --key-file release.key --extra-src-files user_main.py",
        "The state is retained on mpypi/rollouts/CHANNEL: `status`, `pause`, `resume` and\n"
        "`abort` work from any workstation. Exit status 0 only when every device confirmed.",
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="ACTION")

    def common(q, key_help: str | None = None) -> None:
        q.add_argument(
            "--channel",
            help="the channel of the rollout (default: update.channel of ./settings.json)",
        )
        mqtt.add_connect_arguments(
            q, "mqtt[s]://[user[:password]@]host[:port] (default: mqtt of ./settings.json)"
        )
        if key_help:
            q.add_argument("--key-file", help=key_help)

    s = command(
        verbs,
        "start",
        "start a rollout of a release (publish's flags) and follow it to its end",
        "mpy-blox rollout start --channel stable --stages 1,10%,50%,100% \\\n"
        "    --max-failures 2 --bake 10m --key-file release.key --extra-src-files user_main.py",
        "The devices reporting on the channel are ordered by a hash of their id; each stage\n"
        "sends signed cmd lists to the devices it adds, waits until each confirmed (ok after\n"
        "its trial), failed or timed out, and bakes; failures over --max-failures halt it.\n"
        "The channel list goes out last.",
    )
    scratch = argparse.ArgumentParser(add_help=False)
    publish.add_arguments(scratch)
    for action in scratch._actions:
        if action.dest not in START_DROPS:
            s._add_action(action)
    s.add_argument(
        "--stages",
        required=True,
        help="devices per stage, cumulative: counts and percentages, the last 100%% "
        "(e.g. 1,10%%,50%%,100%%: a canary, then 10%% of the devices, ...)",
    )
    s.add_argument(
        "--max-failures",
        default="0",
        help="halt when more devices fail than this: a count or a percentage of the devices "
        "(default 0: the first failure halts)",
    )
    s.add_argument(
        "--bake", metavar="DURATION", help="wait this long after a stage confirmed, e.g. 10m"
    )
    s.add_argument(
        "--timeout",
        metavar="DURATION",
        default="10m",
        help="a device that has not confirmed this long after its list went out has failed "
        "(default 10m)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress; the summary if it fails")
    s.set_defaults(func=_start_cli)

    q = command(
        verbs,
        "status",
        "the rollout's state: each device's stage and outcome",
        "mpy-blox rollout status --channel stable",
    )
    common(q)
    q.add_argument("--json", action="store_true", help="the state document, as retained")
    q.set_defaults(func=_status_cli)

    q = command(
        verbs,
        "pause",
        "stop sending: the running rollout stops before its next step",
        "mpy-blox rollout pause --channel stable",
    )
    common(q)
    q.set_defaults(func=_pause_cli)

    q = command(
        verbs,
        "resume",
        "carry on a paused or interrupted rollout from the state on the broker",
        "mpy-blox rollout resume --channel stable --key-file release.key",
    )
    common(q, "the release key that signs the lists (as for start)")
    q.add_argument("--quiet", action="store_true", help="no progress; the summary if it fails")
    q.set_defaults(func=_resume_cli)

    q = command(
        verbs,
        "abort",
        "stop the rollout for good; --revert sends the previous release back",
        "mpy-blox rollout abort --channel stable --revert --key-file release.key",
    )
    common(q, "the release key that signs the revert lists")
    q.add_argument(
        "--revert",
        action="store_true",
        help="send the channel's list from before the rollout to every device sent one",
    )
    q.set_defaults(func=_abort_cli)
