# info.firmware (docs/protocol.md, "Firmware"): the running app partition and the
# version of the image in it. Loaded by mpy_blox.update.record when it builds
# info, and unloaded again by put() itself: the app's busy heap keeps nothing of
# it (record stays small; every byte of it is resident in the app).
import struct


def running():
    """The running app partition, or None where esp32.Partition has none."""
    try:
        import esp32

        return esp32.Partition(esp32.Partition.RUNNING)
    except (ImportError, AttributeError, OSError):
        return None


def info():
    """{"partition", "version"} of the running image, read from its first 80
    bytes (an ESP32 app image's esp_app_desc_t, or a virtual board's header);
    None where the app partition cannot be read."""
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


def put(extra):
    """Set extra["firmware"] (when there is one), then unload this module."""
    import sys

    fw = info()
    if fw is not None:
        extra["firmware"] = fw
    sys.modules.pop("mpy_blox.update.fwstate", None)
    try:
        del sys.modules["mpy_blox.update"].fwstate
    except AttributeError:
        pass
