# A firmware image over the air (docs/protocol.md, "Firmware"): streamed into
# the next OTA app partition, verified, then made the boot partition. The
# bootloader boots it on trial (ESP-IDF's pending-verify); mpy_blox.update.trial
# confirms it (Partition.mark_app_valid_cancel_rollback) once the set is healthy,
# and a reset before that makes the bootloader boot the old image again.
#
# Loaded by the install boot for a list with a firmware entry only (one at most,
# manifest), before the install core, which a list of firmware alone never
# loads: nothing of the image is written to the filesystem but a chunked
# download's hash list (mpy_blox.update.chunks). Packages beside it are committed
# through a journal bound to the image's partition (mpypi_recover).
#
# Pre-flight, before a byte is downloaded, each with its reason: a device without
# OTA partitions, an image for another chip, an image larger than the partition.
# The device's chip is the part of os.uname().machine after its last " with ":
# the ESP32 port builds that string as MICROPY_HW_BOARD_NAME " with "
# MICROPY_HW_MCU_NAME ("Generic ESP32 module with ESP32", "... with ESP32S3"),
# lower-cased and without dashes it is the name ESP-IDF's chip ids have
# (esp32, esp32s3, esp32c3; the virtual board says "... with ESP32").
#
# Writes: each 4 KiB sector erased as the stream reaches it, the bytes programmed
# from the download's own buffer (esp32.Partition's ioctl BLOCK_ERASE and the
# offset form of writeblocks), hashed as they come. Then
# the partition is read back and hashed again: what set_boot will boot is what
# the list names. A power cut anywhere before set_boot leaves the boot partition
# as it was (the old firmware boots); set_boot's otadata write is the switch.
import hashlib

from mpy_blox.log import get_logger
from mpy_blox.update import chunks
from mpy_blox.update.paths import InvalidUpdate
from mpy_blox.update.state import hex_digest

_SECTOR = const(4096)  # the flash's erase unit, esp32.Partition's block size

log = get_logger("update")


def chip():
    """This device's chip, as list entries name it ("esp32", "esp32s3", ...)."""
    import os

    machine = os.uname().machine
    return machine[machine.rfind(" with ") + 6 :].lower().replace("-", "")


def next_partition():
    """The OTA partition an update goes to; InvalidUpdate on a device without one."""
    import esp32

    try:
        return esp32.Partition(esp32.Partition.RUNNING).get_next_update()
    except OSError:  # ENOENT: a factory app alone, no otadata
        raise InvalidUpdate("no OTA partitions: this device cannot take a firmware update")


def partition_sha256(part, size, buf):
    """SHA256 (hex) of the first `size` bytes of partition `part`, through buf."""
    h = hashlib.sha256()
    mv = memoryview(buf)
    at = 0
    while at < size:
        n = min(len(buf), size - at)
        part.readblocks(0, mv[:n], at)
        h.update(mv[:n])
        at += n
    return hex_digest(h.digest())


def running_is(entry, buf):
    """True if the running firmware is `entry`'s image (the same SHA256)."""
    import esp32

    part = esp32.Partition(esp32.Partition.RUNNING)
    try:
        if part.info()[3] < entry["size"]:
            return False
        return partition_sha256(part, entry["size"], buf) == entry["pkg_sha256"]
    except OSError:  # a partition with no bytes to read (the virtual board's factory)
        return False


def preflight(entry):
    """The partition `entry` goes to; InvalidUpdate, with the reason, if it cannot."""
    part = next_partition()
    have = chip()
    if entry["chip"] != have:
        raise InvalidUpdate("firmware for %s: this device is an %s" % (entry["chip"], have))
    room = part.info()[3]
    if entry["size"] > room:
        raise InvalidUpdate(
            "firmware of %d bytes: partition %s holds %d" % (entry["size"], part.info()[4], room)
        )
    return part


class Writer:
    """A file-like over a partition, from byte `at`: each sector is erased as the
    bytes reach it (ioctl BLOCK_ERASE), and the bytes programmed where they go
    (writeblocks' offset form, which does not erase), straight from the caller's
    buffer: no sector buffer (at the 32-bit install boot's 100K, a 4 KiB block
    was not to be had). Erased flash reads 0xFF: the last sector needs no padding.
    `at` is a sector boundary, or where this writer's bytes continue a sector
    already erased (see Download.have)."""

    def __init__(self, part, at):
        self.part = part
        self.at = at

    def write(self, data):
        n = len(data)
        mv = memoryview(data)
        i = 0
        while i < n:
            block, offset = divmod(self.at, _SECTOR)
            if not offset:
                self.part.ioctl(6, block)  # BLOCK_ERASE: the sector, to 0xFF
            take = min(_SECTOR - offset, n - i)
            self.part.writeblocks(block, mv[i : i + take], offset)
            self.at += take
            i += take
        return n

    def flush(self):
        pass  # every byte is programmed as it comes

    close = flush


class _Reader:
    # What chunks' resume reads a partition with: readinto from byte `at`.
    def __init__(self, part, at):
        self.part = part
        self.at = at

    def readinto(self, buf):
        n = len(buf)
        self.part.readblocks(0, buf, self.at)
        self.at += n
        return n

    def close(self):
        pass


class Sink:
    """A single-message image's bytes into the partition: bounded by the listed
    size, hashed as written (what fetch's transfer feeds, as a Download)."""

    def __init__(self, part, entry):
        self.entry = entry
        self.done = 0
        self._h = hashlib.sha256()
        self._w = Writer(part, 0)

    def write(self, data):
        self.done += len(data)
        if self.done > self.entry["size"]:
            raise InvalidUpdate("package larger than its declared size")
        self._h.update(data)
        self._w.write(data)

    def close(self):
        w, self._w = self._w, None
        if w is not None:
            w.close()

    def finish(self):
        self.close()
        size = self.entry["size"]
        if self.done != size:
            raise InvalidUpdate("truncated package: %d of %d bytes" % (self.done, size))
        if hex_digest(self._h.digest()) != self.entry["pkg_sha256"]:
            raise InvalidUpdate("SHA256 mismatch")


class Download(chunks.Download):
    # A chunked image: its chunks straight into the partition (a firmware image
    # is larger than a 4 MB ESP32's filesystem); the hash list on flash as usual.
    # A resume verifies the partition's chunks as chunks verifies a file's.
    def have(self):
        # Whatever the partition holds: hashed chunk by chunk, then trusted. A
        # resume starts where a chunk starts; only at a sector boundary can it
        # go on without erasing (and so losing) bytes before it in its sector:
        # with a chunk size that is not a multiple of 4 KiB, no resume.
        return 0 if self.cs % _SECTOR else self.entry["size"]

    def reader(self, at):
        return _Reader(self.inst.part, at)

    def writer(self, at):
        return Writer(self.inst.part, at)


class Target:
    """What the install boot's Fetcher downloads an image into, in place of an
    Installer: `download(entry)` for a single message, `downloaded()` for chunks."""

    def __init__(self, part):
        self.root = ""
        self.part = part
        self.buf = bytearray(1024)

    def download(self, entry):
        return Sink(self.part, entry)

    def downloaded(self, entry, path):
        chunks.forget(path)

    def verify(self, entry):
        """Read the partition back: the bytes set_boot will boot are the listed ones."""
        if partition_sha256(self.part, entry["size"], self.buf) != entry["pkg_sha256"]:
            raise InvalidUpdate("firmware written, but reads back wrong: flash fault?")

    def label(self):
        return self.part.info()[4]

    def set_boot(self):
        """The switch: the next reset boots the new image, on trial."""
        try:
            self.part.set_boot()
        except OSError as e:  # ESP_ERR_OTA_VALIDATE_FAILED: not an image this chip boots
            raise InvalidUpdate("firmware image refused by the bootloader: %s" % (e.args[-1],))


def running_label():
    import esp32

    return esp32.Partition(esp32.Partition.RUNNING).info()[4]


async def download(fetcher, entry):
    """Pre-flight `entry`, then stream it into the next OTA partition and read
    it back: the Target, whose set_boot() is the switch. None when the running
    firmware is that image already (a list published again, or an install boot
    cut after its set_boot: that image runs on trial, and the trial confirms it)."""
    import os

    buf = bytearray(1024)
    if running_is(entry, buf):
        log.info("firmware %s is running already", entry["version"])
        return None
    buf = None
    target = Target(preflight(entry))
    fetcher.current = "firmware " + entry["version"]
    fetcher.total = entry["size"]
    try:
        os.mkdir("/.mpypi")  # chunks keeps its hash list in /.mpypi/dl
    except OSError:
        pass  # it exists
    import gc

    gc.collect()
    log.info(
        "firmware %s into %s; free heap %d bytes", entry["version"], target.label(), gc.mem_free()
    )
    try:
        if "chunks" in entry:
            await chunks.download(fetcher, target, entry, Download)
        else:
            await fetcher.download_package(target, entry)
        await fetcher.status("verifying", package=fetcher.current)
        target.verify(entry)
    finally:
        chunks.forget(chunks.path("", entry))  # the hash list, if any
    return target


def switch(ib, journaled):
    """The install boot's commit for a firmware entry (ib: the InstallBoot).

    Every firmware update commits a journal bound to the image's partition (a
    list of firmware alone: one of no file operation), so the trial is the
    packages' one: boot recovery applies it once that partition runs, the app
    finds it applied (on trial), and boot recovery undoes it, with the reason,
    once another partition runs. Then last_update names the partition ("trial")
    and nothing is pending before set_boot, the switch: a cut before it boots
    the old image; after it, the new one."""
    import sys

    import mpypi_recover

    if not journaled:  # a journal of no file operation: an empty body
        empty = "/.mpypi/fw_ops"
        open(empty, "w").close()
        mpypi_recover.write_journal(empty, "", None, ib.firmware)
        mpypi_recover.remove(empty)
    ib.installed = True
    ib.finish_list(ib.listed, ib.digest)
    if ib.target is not None:
        try:
            ib.target.set_boot()
        except ValueError as e:  # refused: last_update says failed after all
            # The journal was never applied: nothing to undo; it goes.
            mpypi_recover.remove(mpypi_recover.JOURNAL)
            mpypi_recover.remove(mpypi_recover.FIRMWARE)
            mpypi_recover.clean_stage()
            ib.error = str(e)
            ib.installed = False
            ib.firmware = None
            ib.finish_list(ib.listed, ib.digest)
    sys.modules.pop("mpypi_recover", None)
