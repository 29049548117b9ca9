# ruff: noqa: UP031, SIM115  (MicroPython code: no f-string features, no context here)
# main.py of the update tests' boards: the boot recovery as the framework's
# main.py runs it, then an install of /todo.bin from packages in /pkgs, with
# what the board runs reported at each step (no MQTT: the install core alone).
import json

import mpypi_recover

print("RECOVER", mpypi_recover.recover())


def which_set():
    # "old" or "new" when every file of that set is there byte for byte
    # (null: must be absent), else "mixed".
    try:
        with open("/expect.json") as f:
            expect = json.load(f)
    except OSError:
        return "none"
    for name in ("old", "new"):
        if expect[name] and all(
            mpypi_recover.file_sha256(p) == h for p, h in expect[name].items()
        ):
            return name
    bad = [p for p, h in expect["new"].items() if mpypi_recover.file_sha256(p) != h]
    return "mixed (differ from new: %s)" % " ".join(bad)


print("SET", which_set())
try:
    import demo_pkg

    print("RUNS", demo_pkg.VERSION)
except ImportError:
    print("RUNS none")

from mpy_blox.update.install import install
from mpy_blox.update.manifest import InvalidUpdate, decode_list

try:
    with open("/todo.bin", "rb") as f:
        seq, entries = decode_list(f.read())
    done = install(entries, lambda e: open("/pkgs/" + e["pkg_sha256"], "rb"))
    print("INSTALLED", len(done))
except (InvalidUpdate, OSError) as e:
    print("ERROR", e)
print("FINAL", which_set(), mpypi_recover.state())
import micropython

print("PEAK", micropython.mem_peak() if hasattr(micropython, "mem_peak") else -1)
print("DONE")
