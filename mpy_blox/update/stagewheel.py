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
from mpy_blox.update.paths import InvalidUpdate
from mpy_blox.update.state import RESERVE_BLOCKS, hex_digest
from mpy_blox.update.zipwheel import Wheel, record_hash


def _parse(line):
    """(name, hash, size) of a RECORD line; name None for a blank line or RECORD's own."""
    line = line.strip()
    if not line:
        return None, None, 0
    parts = line.decode().rsplit(",", 2)
    if len(parts) != 3 or parts[0].startswith('"'):
        raise InvalidUpdate("malformed RECORD line")
    name, digest, size = parts
    if name.endswith("/RECORD") and not digest:
        return None, None, 0  # RECORD does not list its own hash
    if not digest.startswith("sha256=") or not size.isdigit():
        raise InvalidUpdate("RECORD entry without sha256 and size: " + name)
    return name, digest, int(size)


class Record:
    """A staged RECORD, looked up by name without holding the names: the offset
    of each line and a 16-bit hash of its name, in arrays sized once."""

    def __init__(self, path, most):
        self.f = open(path, "rb")
        self.off = array("I", bytes(4 * most))
        self.key = array("H", bytes(2 * most))
        self.used = bytearray(most)
        self.n = 0
        self.next = 0  # wheels list RECORD in directory order: try the next line first
        pos = 0
        while True:
            line = self.f.readline()
            if not line:
                break
            at = pos
            pos += len(line)
            name = _parse(line)[0]
            if name is None:
                continue
            if self.n >= most:
                raise InvalidUpdate("RECORD does not match the wheel's files")
            key = hash(name) & 0xFFFF
            if self._find(name, key, 0) >= 0:
                raise InvalidUpdate("malformed RECORD")  # a file listed twice
            self.off[self.n] = at
            self.key[self.n] = key
            self.n += 1

    def close(self):
        self.f.close()

    def _find(self, name, key, j):
        n = self.n
        for _ in range(n):
            if j >= n:
                j = 0
            if self.key[j] == key:
                self.f.seek(self.off[j])
                if _parse(self.f.readline())[0] == name:
                    return j
            j += 1
        return -1

    def find(self, name, claim=True):
        """(hash, size) of `name`'s line, or None; a line is claimed only once."""
        j = self._find(name, hash(name) & 0xFFFF, self.next)
        if j < 0:
            return None
        self.next = j + 1
        if claim:
            if self.used[j]:
                raise InvalidUpdate("wheel lists a file twice: " + name)
            self.used[j] = 1
        self.f.seek(self.off[j])
        return _parse(self.f.readline())[1:]


def stage_wheel(inst, entry, path):
    """Extract a downloaded wheel, verified, into inst's stage; add its operations."""
    gc.collect()  # what lives through the whole wheel goes low in the heap
    w = Wheel(path, os.stat(path)[6], inst.buf)
    record = None
    try:
        files = usize_total = 0
        rec_entry = wheel_entry = None
        for name, method, csize, usize, off in w.entries():
            files += 1
            usize_total += usize
            if name.endswith(".dist-info/RECORD") and name.count("/") == 1:
                rec_entry = (name, method, csize, usize, off)
            elif name.endswith(".dist-info/WHEEL") and name.count("/") == 1:
                wheel_entry = (method, csize, usize, off)
        dist = w.dist_info
        want = "%s-%s.dist-info" % (normalize(entry["name"]), entry["version"])
        if dist is None or dist.lower() != want.lower():
            raise InvalidUpdate("wheel is %s, the list says %s" % (dist, want))
        free, block = state.fs_free(inst.root)
        if usize_total + (files + RESERVE_BLOCKS) * block > free:
            raise InvalidUpdate("does not fit: wheel unpacks to %d bytes" % usize_total)
        _check_tag(inst, w, wheel_entry)
        if rec_entry is None:
            raise InvalidUpdate("wheel without RECORD")
        rec_name, method, csize, usize, off = rec_entry
        ri = inst.next_index()
        digest, _ = w.copy_entry(method, csize, off, inst.stage_path(ri), usize)
        rec_hex = hex_digest(digest)
        record = Record(inst.stage_path(ri), files)
        if record.n != files - 1:
            raise InvalidUpdate("RECORD does not match the wheel's files")
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
    # An upgrade removes the old version's files that the new one lacks,
    # and its whole .dist-info folder.
    have = state.installed_wheels(inst.root).get(normalize(entry["name"]))
    if have is None:
        return
    old_dist = "/lib/" + have[1]
    prefix = have[1] + "/"
    with open(inst.root + old_dist + "/RECORD", "rb") as f:
        while True:
            line = f.readline()
            if not line:
                break
            name = _parse(line)[0]
            if name and not name.startswith(prefix) and record.find(name, False) is None:
                inst.delete("/lib/" + name)
    for name in os.listdir(inst.root + old_dist):
        name = prefix + name
        if name != rec_name and record.find(name, False) is None:
            inst.delete("/lib/" + name)
