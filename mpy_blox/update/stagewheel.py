# Staging a wheel: read it through its central directory (zipwheel), check its
# name, tag and size, extract every file verified against RECORD into the
# installer's stage, and plan the removal of what an upgrade leaves behind.
#
# Memory: nothing is kept per file but 7 bytes of RECORD index. The directory
# is walked twice (once to check it, once to extract), and each file's RECORD
# line is read back from the staged RECORD when the file is extracted; file
# contents only ever pass through the installer's one buffer. A table of
# every entry and every RECORD line, built between short-lived buffers, is
# what fragmented a 100 KB heap (docs/protocol.md, "Memory").
import gc
import os
from array import array

from mpy_blox.update import state
from mpy_blox.update.names import normalize
from mpy_blox.update.paths import InvalidUpdate, check_wheel_path, fold
from mpy_blox.update.state import RESERVE_BLOCKS, hex_digest
from mpy_blox.update.zipwheel import Wheel, record_hash


def _parse(line, own):
    """(name, hash, size) of a RECORD line; name None for a blank line or RECORD's
    own (`own`, listed without a hash)."""
    line = line.strip()
    if not line:
        return None, None, 0
    try:
        parts = line.decode().rsplit(",", 2)
    except UnicodeError:
        raise InvalidUpdate("malformed RECORD line")
    if len(parts) != 3 or parts[0].startswith('"'):
        raise InvalidUpdate("malformed RECORD line")
    name, digest, size = parts
    if name == own and not digest:
        return None, None, 0
    if not digest.startswith("sha256=") or not size.isdigit():
        raise InvalidUpdate("RECORD entry without sha256 and size: " + name)
    return name, digest, int(size)


def _key(name):
    # Names compare as FAT compares them: a.py and A.py are one file there.
    return hash(fold(name)) & 0xFFFF


class Record:
    """A RECORD (`own`: its path in the wheel), looked up by name without holding
    the names: the offset of each line and a 16-bit hash of its name, in arrays
    sized once (`most` lines; None: counted first).

    Every name is checked as a wheel's file is (check_wheel_path, with the
    RECORD's .dist-info), and listed once, as FAT compares names; `size` is the
    sum of the sizes, the bound of what extracting its files writes."""

    def __init__(self, path, most, own):
        self.f = open(path, "rb")
        self.own = own
        if most is None:
            most = 0
            while self.f.readline():
                most += 1
            self.f.seek(0)
        self.off = array("I", bytes(4 * most))
        self.key = array("H", bytes(2 * most))
        self.used = bytearray(most)
        self.n = 0
        self.size = 0
        self.next = 0  # wheels list RECORD in directory order: try the next line first
        dist = own[: own.rfind("/")]
        pos = 0
        while True:
            line = self.f.readline()
            if not line:
                break
            at = pos
            pos += len(line)
            name, _, size = _parse(line, own)
            if name is None:
                continue
            if self.n >= most:
                raise InvalidUpdate("RECORD does not match the wheel's files")
            check_wheel_path(name, dist)
            key = _key(name)
            if self._find(name, key, 0, True) >= 0 or fold(name) == fold(own):
                raise InvalidUpdate("RECORD lists a file twice: " + name)
            self.off[self.n] = at
            self.key[self.n] = key
            self.size += size
            self.n += 1

    def close(self):
        self.f.close()

    def name(self, j):
        """The name on line j."""
        self.f.seek(self.off[j])
        return _parse(self.f.readline(), self.own)[0]

    def _find(self, name, key, j, folded):
        n = self.n
        if folded:
            name = fold(name)
        for _ in range(n):
            if j >= n:
                j = 0
            if self.key[j] == key:
                other = self.name(j)
                if (fold(other) if folded else other) == name:
                    return j
            j += 1
        return -1

    def has(self, name):
        """True if RECORD lists `name`, as FAT compares names."""
        return self._find(name, _key(name), self.next, True) >= 0

    def find(self, name):
        """(hash, size) of `name`'s line, or None; a line is claimed only once."""
        j = self._find(name, _key(name), self.next, False)
        if j < 0:
            return None
        self.next = j + 1
        if self.used[j]:
            raise InvalidUpdate("wheel lists a file twice: " + name)
        self.used[j] = 1
        self.f.seek(self.off[j])
        return _parse(self.f.readline(), self.own)[1:]


def stage_wheel(inst, entry, path):
    """Extract a downloaded wheel, verified, into inst's stage; add its operations."""
    gc.collect()  # what lives through the whole wheel goes low in the heap
    w = Wheel(path, os.stat(path)[6], inst.buf)
    record = None
    try:
        files = 0
        rec_entry = wheel_entry = None
        for name, method, csize, usize, off in w.entries():
            files += 1
            if name.endswith(".dist-info/RECORD") and name.count("/") == 1:
                if rec_entry is not None:  # the one not read would be installed unchecked
                    raise InvalidUpdate("wheel lists a file twice: " + name)
                rec_entry = (name, method, csize, usize, off)
            elif name.endswith(".dist-info/WHEEL") and name.count("/") == 1:
                wheel_entry = (method, csize, usize, off)
        dist = w.dist_info
        want = "%s-%s.dist-info" % (normalize(entry["name"]), entry["version"])
        if dist is None or dist.lower() != want.lower():
            raise InvalidUpdate("wheel is %s, the list says %s" % (dist, want))
        _check_tag(inst, w, wheel_entry)
        if rec_entry is None:
            raise InvalidUpdate("wheel without RECORD")
        rec_name, method, csize, usize, off = rec_entry
        # What fits is decided by the sizes extraction enforces: RECORD's own
        # entry is cut off at its directory size, every other file at its
        # RECORD size. The directory's sizes of the others bound nothing.
        free, block = state.fs_free(inst.root)
        need = usize + (files + RESERVE_BLOCKS) * block
        if need > free:
            raise InvalidUpdate("does not fit: the wheel's RECORD alone is %d bytes" % usize)
        ri = inst.next_index()
        digest, _ = w.copy_entry(method, csize, off, inst.stage_path(ri), usize)
        rec_hex = hex_digest(digest)
        record = Record(inst.stage_path(ri), files, rec_name)
        if record.n != files - 1:
            raise InvalidUpdate("RECORD does not match the wheel's files")
        if need + record.size > free:
            raise InvalidUpdate("does not fit: wheel unpacks to %d bytes" % (usize + record.size))
        for name, method, csize, _usize, off in w.entries():
            if name == rec_name:
                continue
            line = record.find(name)
            if line is None:
                raise InvalidUpdate("file not in RECORD: " + name)
            i = inst.next_index()
            digest, n = w.copy_entry(method, csize, off, inst.stage_path(i), line[1])
            if n != line[1] or record_hash(digest) != line[0]:
                raise InvalidUpdate("RECORD mismatch: " + name)
            inst.add("/lib/" + name, hex_digest(digest), i)
        _stale(inst, entry, record, rec_name)
        record.close()
        record = None
        inst.add("/lib/" + rec_name, rec_hex, ri)
    finally:
        if record is not None:
            record.close()
        w.close()


def _check_tag(inst, w, wheel_file):
    if wheel_file is None:
        raise InvalidUpdate("wheel without WHEEL file")
    method, csize, usize, off = wheel_file
    if usize > 2048:
        raise InvalidUpdate("WHEEL file too large")
    import io

    out = io.BytesIO()
    w.copy_entry(method, csize, off, out, usize)
    tags = [ln[4:].strip() for ln in out.getvalue().decode().split("\n") if ln.startswith("Tag:")]
    for tag in tags:
        if state.tag_matches(tag, inst.device):
            return
    raise InvalidUpdate("wheel tag %s does not run on this device" % ",".join(tags))


def _stale(inst, entry, record, rec_name):
    # An upgrade removes the old version's files that the new one lacks, and
    # its whole .dist-info folder. The installed RECORD names what is deleted:
    # its names pass the new wheel's checks first, or the update is refused (a
    # RECORD planted by an older installer or by hand could name /main.py).
    have = state.installed_wheels(inst.root).get(normalize(entry["name"]))
    if have is None:
        return
    old_dist = "/lib/" + have[1]
    prefix = have[1] + "/"
    try:
        old = Record(inst.root + old_dist + "/RECORD", None, prefix + "RECORD")
    except InvalidUpdate as e:
        raise InvalidUpdate("installed %sRECORD: %s" % (prefix, e))
    try:
        for j in range(old.n):
            name = old.name(j)
            if not name.startswith(prefix) and not record.has(name):
                inst.delete("/lib/" + name)
    finally:
        old.close()
    for name in os.listdir(inst.root + old_dist):
        name = prefix + name
        if name != rec_name and not record.has(name):
            inst.delete("/lib/" + name)
