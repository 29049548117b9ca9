# The firmware's side of the update state, asked rarely and loaded only then
# (mpy_blox.update.record drops it after each question): is a firmware image
# on trial, and what runs (info.firmware). The state itself is last_update's
# "firmware" field (record.save_last) and the bootloader's otadata.
import struct


def running():
    """The running app partition, or None where esp32.Partition has none."""
    try:
        import esp32

        return esp32.Partition(esp32.Partition.RUNNING)
    except (ImportError, AttributeError, OSError):
        return None


def on_trial(last):
    """True while a firmware image awaits its verdict: last_update is "trial"
    for the partition it names, and that partition runs (else the bootloader
    rolled it back, which trial.settle reports)."""
    label = (last or {}).get("firmware")
    if not label or last.get("result") != "trial":
        return False
    part = running()
    return part is not None and part.info()[4] == label


def info():
    """info.firmware: the running partition and its image's version, read from
    its first 80 bytes (an ESP32 app image's esp_app_desc_t, or a virtual
    board's header); None where the app partition cannot be read."""
    part = running()
    if part is None:
        return None
    head = bytearray(80)
    try:
        part.readblocks(0, head)
    except OSError:  # the virtual board's factory partition has no bytes
        return None
    if head[:4] == b"MPVB":
        version = head[12:44]  # mpy_blox_tools/vboard/image.py
    elif head[0] == 0xE9 and struct.unpack_from("<I", head, 32)[0] == 0xABCD5432:
        version = head[48:80]  # header 24 + segment header 8; the version at 16
    else:
        version = b""
    version = bytes(version)
    end = version.find(b"\0")
    version = version[: end if end >= 0 else len(version)].decode()
    return {"partition": part.info()[4], "version": version or None}
