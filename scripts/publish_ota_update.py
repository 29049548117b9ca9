"""Publish an over-the-air update to Mpy-BLOX devices (the seed's script, same flags).

    poetry run python scripts/publish_ota_update.py --device-ids esp32-840d8ed29760 --dev

Equivalent to `mpy-blox publish ...`; see `--help`.
"""

import sys

from mpy_blox_tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["publish", *sys.argv[1:]]))
