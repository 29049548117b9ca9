# Where an install's files go, checked once every operation is planned and
# before the journal is written: mpypi_recover.apply() must never stop
# half-way, because a journal it cannot finish stops every later install
# ("journal not applied"). It would stop on a file where a folder is needed
# (ENOTDIR), a folder where a file goes (EISDIR), and, after a power cut, on
# two operations on one file (the first one's staged file is gone when it is
# rerun).
#
# Loaded by Installer.commit(), after the staging: the wheel's decoder is done
# with the heap by then (loaded during the staging, this module cost the
# 32-bit install boot 3K of its edge). Memory: two maps of hash bits, 512
# bytes; an operation whose bits are already set is compared with the ones
# before it, read back from the file.
import os

from mpy_blox.update.paths import InvalidUpdate, fold

_BITS = const(2048)  # per map: the targets, and the folders above them


def check(root, path):
    """Refuse (InvalidUpdate) the operations in the file `path` (the journal's
    lines) if apply() could not finish them."""
    seen = bytearray(2 * _BITS // 8)
    at = 0
    with open(path) as f:
        while True:
            line = f.readline()
            if not line:
                return
            w = line.split()
            if w[0] == "P" and w[4] == "-":  # a new file
                _way(root, w[2])
            t = fold(w[2])  # as FAT compares names
            k = hash(t) % _BITS
            clash = seen[k >> 3] & (1 << (k & 7))
            i = t.find("/", 1)
            while i > 0:
                d = hash(t[:i]) % _BITS
                clash = clash or seen[d >> 3] & (1 << (d & 7))
                d += _BITS
                seen[d >> 3] |= 1 << (d & 7)
                i = t.find("/", i + 1)
            clash = clash or seen[(k + _BITS) >> 3] & (1 << (k & 7))
            seen[k >> 3] |= 1 << (k & 7)
            if clash:  # maybe: compare with each operation before it
                _before(path, at, t, w[2])
            at += len(line)


def _before(path, end, t, target):
    with open(path) as f:
        while end > 0:
            line = f.readline()
            end -= len(line)
            u = fold(line.split()[2])
            if u == t:
                raise InvalidUpdate("installed twice: %s" % target)
            if u.startswith(t + "/") or t.startswith(u + "/"):
                raise InvalidUpdate("a file is in the way of a folder: %s, %s" % (u, t))


def _way(root, target):
    # On flash: folders above the new file (or nothing yet: apply() makes
    # them), and no folder where it goes.
    i = target.find("/", 1)
    while True:
        path = target if i < 0 else target[:i]
        try:
            is_dir = os.stat(root + path)[0] & 0x4000
        except OSError:
            return
        if bool(is_dir) == (i < 0):
            raise InvalidUpdate("%s is in the way of %s" % (path, target))
        if i < 0:
            return
        i = target.find("/", i + 1)
