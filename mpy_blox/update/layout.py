# Where an install's files go, checked as each operation is planned:
# mpypi_recover.apply() must never stop half-way, because a journal it cannot
# finish stops every later install ("journal not applied"). It would stop on
# a file where a folder is needed (ENOTDIR), a folder where a file goes
# (EISDIR), and, after a power cut, on two operations on one file (the first
# one's staged file is gone when it is rerun).
#
# Loaded with the first operation, when staging, not with the install core:
# the install boot imports that with its MQTT client up, where 1 KB counts.
# Memory: two maps of hash bits, 512 bytes, allocated once; an operation whose
# bits are set is compared with the operations written so far (read back).
import os

from mpy_blox.update.paths import InvalidUpdate, fold

_BITS = const(2048)  # per map: the targets, and the folders above them


class Layout:
    """The targets of one install's operations, written to the open file `ops` at `path`."""

    def __init__(self, root, ops, path):
        self.root = root
        self.ops = ops
        self.path = path
        self.seen = bytearray(2 * _BITS // 8)

    def check(self, target, new):
        """Refuse an operation on `target` that apply() could not finish.

        new: no readable file is there yet. Call before the operation is written.
        """
        if new:
            self._way(target)
        seen = self.seen
        t = fold(target)  # as FAT compares names
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
        if clash:  # maybe: compare with each operation written
            self.ops.flush()
            with open(self.path) as f:
                for line in f:
                    u = fold(line.split()[2])
                    if u == t:
                        raise InvalidUpdate("installed twice: %s" % target)
                    if u.startswith(t + "/") or t.startswith(u + "/"):
                        raise InvalidUpdate("a file is in the way of a folder: %s, %s" % (u, t))

    def _way(self, target):
        # On flash: folders above the new file (or nothing yet: apply() makes
        # them), and no folder where it goes.
        i = target.find("/", 1)
        while True:
            path = target if i < 0 else target[:i]
            try:
                is_dir = os.stat(self.root + path)[0] & 0x4000
            except OSError:
                return
            if bool(is_dir) == (i < 0):
                raise InvalidUpdate("%s is in the way of %s" % (path, target))
            if i < 0:
                return
            i = target.find("/", i + 1)
