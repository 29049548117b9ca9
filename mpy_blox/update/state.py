# What is installed, and what this device can run: the facts the installer
# compares a list against.
#
# Wheels: /lib/*.dist-info/METADATA (Name, Version). src files: the truth is
# the file itself (its SHA256 is computed when a list is checked, so a file
# edited by hand is rewritten); /.mpypi/src.json indexes which paths came from
# src packages, for `info`.
import binascii
import hashlib
import json
import os
import sys

from mpy_blox.update.names import normalize

SRC_INDEX = "/.mpypi/src.json"
# Blocks kept free beyond an install's own files: LittleFS copy-on-write
# metadata, the journal.
RESERVE_BLOCKS = const(8)


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _metadata(path):
    name = version = None
    try:
        with open(path) as f:
            while True:
                line = f.readline()
                if not line or line == "\n":
                    break  # headers end at the first blank line
                if line.startswith("Name:"):
                    name = line[5:].strip()
                elif line.startswith("Version:"):
                    version = line[8:].strip()
    except OSError:
        pass
    return name, version


def installed_wheels(root=""):
    """{normalized name: (version, dist-info folder name)} of /lib."""
    out = {}
    for d in _listdir(root + "/lib"):
        if not d.endswith(".dist-info"):
            continue
        name, version = _metadata(root + "/lib/" + d + "/METADATA")
        if name and version:
            out[normalize(name)] = (version, d)
    return out


def src_index(root=""):
    """{path: sha256} of files installed from src packages."""
    try:
        with open(root + SRC_INDEX) as f:
            index = json.load(f)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path, buf=None):
    """Lower-case hex SHA256 of a file, or None if it cannot be read.

    As mpypi_recover.file_sha256: kept here so that an idle agent does not hold
    the recovery module in its heap. `buf`: the caller's buffer, if it has one.
    """
    buf = buf or bytearray(512)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(memoryview(buf)[:n])
    except OSError:
        return None
    return "%064x" % int.from_bytes(h.digest(), "big")


def hex_digest(digest):
    return binascii.hexlify(digest).decode()


def src_sha256(path, root="", buf=None):
    return file_sha256(root + "/" + path, buf)


def device_tag():
    """(mpy bytecode version, platform) of this device, e.g. (6, 'esp32')."""
    mpy = getattr(sys.implementation, "_mpy", None)
    if mpy is not None:
        mpy &= 0xFF
    try:
        platform = os.uname().sysname
    except AttributeError:
        platform = sys.platform
    return mpy, platform.lower()


def tag_matches(tag, device=None):
    """True if a wheel tag (py3-none-any, mpy6-bytecode-esp32) runs here."""
    mpy, platform = device or device_tag()
    parts = tag.split("-")
    if len(parts) != 3:
        return False
    for interp in parts[0].split("."):
        for abi in parts[1].split("."):
            for plat in parts[2].split("."):
                if interp in ("py3", "py2.py3") and abi == "none" and plat == "any":
                    return True
                if interp == "mpy%s" % mpy and abi == "bytecode" and plat in (platform, "any"):
                    return True
    return False


def fs_free(root=""):
    """(free bytes, block size) of the flash filesystem."""
    st = os.statvfs(root or "/")
    return st[0] * st[4], st[0]
