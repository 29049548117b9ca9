# The OTA half of the emulated esp32.Partition: ESP-IDF's app_update
# (components/app_update/esp_ota_ops.c) on the board's otadata partition, for a
# board with OTA partitions (the boot ROM loads it only there).
#
# otadata holds two esp_ota_select_entry_t, one per 4 KiB sector: ota_seq (u32),
# seq_label (20 bytes), ota_state (u32), crc (CRC32 of ota_seq). The valid entry
# with the higher seq names the boot slot, (seq - 1) % slots. set_boot writes
# the entry the bootloader does not boot now (state NEW); the supervisor's
# bootloader (bootloader.py) turns NEW into PENDING_VERIFY as it boots it, and a
# PENDING_VERIFY it finds at the next boot into ABORTED: that is the rollback.
# mark_app_valid_cancel_rollback turns the active entry VALID. Each rewrite
# erases the entry's sector, then programs it: two counted, cuttable block
# writes, as on the chip, so a cut between them leaves the sector erased and
# the other entry in charge.
import binascii
import esp32
import hashlib
import struct
from micropython import const

import _vb_host

_NEW = const(0)
_VALID = const(2)
_INVALID = const(3)
_ABORTED = const(4)
_SEQ_NONE = 0xFFFFFFFF
_MAGIC = b"MPVB"  # vboard/image.py: the header of a virtual-board firmware image
_HEADER = const(76)
# Reads of set_boot's image check: made at boot, inside the emulation's heap
# allowance, so a set_boot takes nothing from the board's code but a hasher.
_buf = bytearray(512)
_entry = bytearray(32)


def _otadata():
    return esp32.Partition("otadata")


def _read():
    # [[seq, state, crc], [seq, state, crc]]
    part = _otadata()
    out = []
    for i in (0, 1):
        part.readblocks(i, _entry)
        seq, _, state, crc = struct.unpack("<I20sII", _entry)
        out.append([seq, state, crc])
    return out


def _crc(seq):
    return binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF) & 0xFFFFFFFF


def _valid(e):
    return e[0] != _SEQ_NONE and e[1] not in (_INVALID, _ABORTED) and e[2] == _crc(e[0])


def _active(entries):
    # bootloader_common_get_active_otadata
    a, b = _valid(entries[0]), _valid(entries[1])
    if a and b:
        return 0 if entries[0][0] >= entries[1][0] else 1
    return 0 if a else 1 if b else -1


def _slots():
    return [r for r in esp32.Partition._table if r[1] == 0 and 0x10 <= r[2] < 0x20]


def _rewrite(index, seq, state):
    # rewrite_ota_seq: erase the entry's sector, then program the entry.
    part = _otadata()
    part.ioctl(6, index)
    struct.pack_into("<I20sII", _entry, 0, seq, b"\xff" * 20, state, _crc(seq))
    part.writeblocks(index, _entry, 0)


def boot_label():
    """esp_ota_get_boot_partition: the slot the next reset boots."""
    entries = _read()
    slots = _slots()
    i = _active(entries)
    if i == -1:
        return slots[0][0]  # no factory partition: the first OTA slot
    return slots[(entries[i][0] - 1) % len(slots)][0]


def _check_image(part):
    # esp_image_verify, for a virtual-board image: header, chip, length, SHA256.
    # An ESP32 app image (0xE9) fails here: the virtual board cannot run one.
    part.readblocks(0, _buf)
    if _buf[:4] != _MAGIC or _buf[4] != 1:
        return False
    if _buf[5] != _vb_host.board.get("chip_id", 0):
        return False
    length = struct.unpack_from("<I", _buf, 8)[0]
    size = part.info()[3]
    if length > size - _HEADER:
        return False
    digest = bytes(_buf[44:76])
    h = hashlib.sha256()
    mv = memoryview(_buf)
    n = len(_buf)
    done = min(length, n - _HEADER)
    h.update(mv[_HEADER : _HEADER + done])
    at = n
    while done < length:
        part.readblocks(0, _buf, at)
        take = min(n, length - done)
        h.update(mv[:take])
        done += take
        at += take
    return h.digest() == digest


def set_boot(part):
    """esp_ota_set_boot_partition: validate the image, then point otadata at it."""
    if not _check_image(part):
        raise OSError(-0x1503, "ESP_ERR_OTA_VALIDATE_FAILED")
    slots = _slots()
    slot = 0
    while slots[slot] is not part._row:
        slot += 1
    entries = _read()
    i = _active(entries)
    if i == -1:
        index, seq = 0, slot + 1
    else:
        current = entries[i][0]
        if (current - 1) % len(slots) == slot:
            index, seq = i, current  # already the boot slot: only its state changes
        else:
            # compute_ota_seq_for_target_slot: the least seq above this one that
            # maps to the slot, written to the other entry.
            index = 1 - i
            seq = (slot + 1) % len(slots)
            while seq < current:
                seq += len(slots)
    _rewrite(index, seq, _NEW)


def mark_valid():
    """esp_ota_mark_app_valid_cancel_rollback."""
    entries = _read()
    i = _active(entries)
    if i == -1:
        # "Running firmware is factory": no valid entry names the running slot.
        raise OSError(1, "ESP_FAIL")
    if entries[i][1] != _VALID:
        _rewrite(i, entries[i][0], _VALID)
