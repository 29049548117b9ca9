# Staging a wheel: read it through its central directory (zipwheel), check its
# name, tag and size, extract every file verified against RECORD into the
# installer's stage, and plan the removal of what an upgrade leaves behind.
#
# Memory: one table of the wheel's entries (name -> 4 numbers) and one of its
# RECORD (name -> hash, size); file contents only ever pass through zipwheel's
# one buffer.
import os

from mpy_blox.update import state
from mpy_blox.update.install import RESERVE_BLOCKS, hex_digest
from mpy_blox.update.manifest import InvalidUpdate
from mpy_blox.update.zipwheel import Wheel, read_record, record_hash


def stage_wheel(inst, entry, path):
    """Extract a downloaded wheel, verified, into inst's stage; add its operations."""
    w = Wheel(path, os.stat(path)[6])
    try:
        found = {}
        usize_total = 0
        for name, method, csize, usize, off in w.entries():
            found[name] = (method, csize, usize, off)
            usize_total += usize
        dist = w.dist_info
        want = "%s-%s.dist-info" % (state.normalize(entry["name"]), entry["version"])
        if dist is None or dist.lower() != want.lower():
            raise InvalidUpdate("wheel is %s, the list says %s" % (dist, want))
        free, block = state.fs_free(inst.root)
        if usize_total + (len(found) + RESERVE_BLOCKS) * block > free:
            raise InvalidUpdate("does not fit: wheel unpacks to %d bytes" % usize_total)
        _check_tag(inst, w, found.get(dist + "/WHEEL"))
        rec = found.get(dist + "/RECORD")
        if rec is None:
            raise InvalidUpdate("wheel without RECORD")
        i = len(inst.ops)
        with open(inst._stage(i), "wb") as out:
            w.copy_entry(rec[0], rec[1], rec[2], rec[3], out, rec[2])
        record = read_record(inst._stage(i))
        os.remove(inst._stage(i))
        if len(record) != len(found) - 1:
            raise InvalidUpdate("RECORD does not match the wheel's files")
        for name, (method, csize, usize, off) in found.items():
            if name == dist + "/RECORD":
                _add_record(inst, w, name, rec)
                continue
            want_hash, want_size = record.get(name, (None, 0))
            if want_hash is None:
                raise InvalidUpdate("file not in RECORD: " + name)
            staged = inst._stage(len(inst.ops))
            with open(staged, "wb") as out:
                digest, n = w.copy_entry(method, csize, usize, off, out, want_size)
            if n != want_size or record_hash(digest) != want_hash:
                raise InvalidUpdate("RECORD mismatch: " + name)
            inst._add("/lib/" + name, hex_digest(digest), staged)
        _stale(inst, entry, found)
    finally:
        w.close()


def _add_record(inst, w, name, rec):
    staged = inst._stage(len(inst.ops))
    with open(staged, "wb") as out:
        digest, _ = w.copy_entry(rec[0], rec[1], rec[2], rec[3], out, rec[2])
    inst._add("/lib/" + name, hex_digest(digest), staged)


def _check_tag(inst, w, wheel_file):
    if wheel_file is None:
        raise InvalidUpdate("wheel without WHEEL file")
    method, csize, usize, off = wheel_file
    if usize > 2048:
        raise InvalidUpdate("WHEEL file too large")
    import io

    out = io.BytesIO()
    w.copy_entry(method, csize, usize, off, out, usize)
    tags = [ln[4:].strip() for ln in out.getvalue().decode().split("\n")
            if ln.startswith("Tag:")]
    for tag in tags:
        if state.tag_matches(tag, inst.device):
            return
    raise InvalidUpdate("wheel tag %s does not run on this device" % ",".join(tags))


def _stale(inst, entry, found):
    # An upgrade removes the old version's files that the new one lacks,
    # and its whole .dist-info folder.
    have = state.installed_wheels(inst.root).get(state.normalize(entry["name"]))
    if have is None:
        return
    old_dist = "/lib/" + have[1]
    for name in read_record(inst.root + old_dist + "/RECORD"):
        if name not in found and not name.startswith(have[1] + "/"):
            inst._delete("/lib/" + name)
    for name in os.listdir(inst.root + old_dist):
        if have[1] + "/" + name not in found:
            inst._delete(old_dist + "/" + name)
