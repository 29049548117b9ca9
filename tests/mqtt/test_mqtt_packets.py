"""Packet encoding and topic matching, on MicroPython, checked against exact bytes."""

from __future__ import annotations

import json


def test_remaining_length_encodes_and_decodes_at_every_boundary(run_mpy):
    out = run_mpy("""
import json
from mpy_blox.mqtt import packet
res = {}
for n in (0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455):
    h = packet.header(0x30, n)
    length, more, i = 0, True, 0
    while more:
        length, more = packet.length_byte(length, h[1 + i], i)
        i += 1
    res[n] = [bytes(h[1:]).hex(), length]
try:
    packet.header(0x30, 268435456)
except ValueError:
    res["too big"] = "refused"
print(json.dumps(res))
""")
    res = json.loads(out.strip().splitlines()[-1])
    assert res["127"] == ["7f", 127]
    assert res["128"] == ["8001", 128]
    assert res["16383"] == ["ff7f", 16383]
    assert res["16384"] == ["808001", 16384]
    assert res["2097152"] == ["80808001", 2097152]
    assert res["268435455"] == ["ffffff7f", 268435455]
    assert res["0"] == ["00", 0]
    assert res["too big"] == "refused"


def test_a_fifth_remaining_length_byte_is_a_protocol_error(run_mpy):
    out = run_mpy("""
from mpy_blox.mqtt import packet, ProtocolError
length = 0
try:
    for i, b in enumerate(b"\\xff\\xff\\xff\\xff\\x01"):
        length, more = packet.length_byte(length, b, i)
except ProtocolError as e:
    print("refused:", e)
""")
    assert "refused: remaining length longer than 4 bytes" in out


def test_connect_subscribe_publish_and_puback_bytes_are_exact(run_mpy):
    out = run_mpy("""
from mpy_blox.mqtt import packet, Will
print(packet.connect("dev", "u", "p", 60, True, None).hex())
print(packet.connect("d", None, None, 5, False, Will("s", "off", retain=True, qos=1)).hex())
print(packet.subscribe(1, "a/+", 1).hex())
print(packet.unsubscribe(258, "a/#").hex())
print(bytes(packet.publish_header("t", 3, 1, True, False, 7)).hex())
print(bytes(packet.publish_header("t", 0, 0, False, False, 0)).hex())
print(packet.puback(0x1234).hex())
""")
    lines = out.split()
    assert lines[0] == "101500044d51545404c2003c0003646576000175000170"
    assert lines[1] == "101500044d515454042c000500016400017300036f6666"
    assert lines[2] == "820800010003612f2b01"
    assert lines[3] == "a20701020003612f23"
    assert lines[4] == "33080001740007"
    assert lines[5] == "3003000174"
    assert lines[6] == "40021234"


def test_topic_filters_match_as_mqtt_3_1_1_says(run_mpy):
    cases = [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/b/c", True),
        ("+/+", "a/b", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/+", "a/", True),
        ("a/b", "a/bc", False),
        ("a/bc", "a/b", False),
        ("mpypi/packages/wheel/+", "mpypi/packages/wheel/" + "0" * 64, True),
    ]
    out = run_mpy(f"""
import json
from mpy_blox.mqtt.topic import matches, check_filter
print(json.dumps([matches(p, t) for p, t, _ in {cases!r}]))
bad = []
for f in ("a/b#", "a/#/b", "a+", "", "#/a"):
    try:
        check_filter(f)
    except ValueError:
        bad.append(f)
print(json.dumps(bad))
""")
    got, bad = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert got == [expected for _, _, expected in cases]
    assert bad == ["a/b#", "a/#/b", "a+", "", "#/a"]
