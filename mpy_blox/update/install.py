# The install core: plan -> pre-flight -> download -> stage -> commit.
#
# Nothing outside /.mpypi/stage is written before commit(); commit() writes the
# journal and hands it to mpypi_recover.apply(), the same code the boot path
# runs to finish an interrupted commit. Any InvalidUpdate (or OSError) before
# that leaves the device exactly as it was once abort() has cleaned the stage.
#
#   inst = Installer()
#   for entry in inst.plan(entries):   # only what differs from the device
#       ...                            # inst.preflight(needed) first
#       sink = inst.download(entry)    # sink.write(chunk) ..., sink.finish()
#       inst.stage(entry)              # verify and extract into the stage
#   inst.commit(seq)                   # the atomic switch-over; then reset
# install(entries, open_package) runs all of it synchronously (tests, tools).
import os
import hashlib
import binascii

import mpypi_recover as recover
from mpy_blox.log import get_logger
from mpy_blox.update import state
from mpy_blox.update.manifest import InvalidUpdate

_STAGE = "/.mpypi/stage"
RESERVE_BLOCKS = const(8)  # LittleFS copy-on-write metadata, the journal
_CHUNK = const(1024)

log = get_logger("update")


def hex_digest(digest):
    return binascii.hexlify(digest).decode()


class Download:
    """A sink for one package's bytes: hashes, bounds and verifies them."""

    def __init__(self, path, entry, limit):
        self.entry = entry
        self.limit = limit
        self.done = 0
        self._h = hashlib.sha256()
        self._f = open(path, "wb")

    def write(self, chunk):
        self.done += len(chunk)
        if self.done > self.limit:
            raise InvalidUpdate("package larger than its declared size")
        self._h.update(chunk)
        self._f.write(chunk)

    def finish(self):
        self._f.close()
        size = self.entry["size"]
        if size is not None and self.done != size:
            raise InvalidUpdate("truncated package: %d of %d bytes" % (self.done, size))
        if hex_digest(self._h.digest()) != self.entry["pkg_sha256"]:
            raise InvalidUpdate("SHA256 mismatch")

    def close(self):
        self._f.close()


class Installer:
    def __init__(self, root="", device=None):
        self.root = root
        self.device = device  # (mpy, platform) for tests; None: this device
        self.ops = []  # (kind, target, new sha, old sha or None, flash it costs)
        self._src = None
        self.block = 4096

    def _stage(self, i):
        return self.root + _STAGE + "/n%d" % i

    def plan(self, entries):
        """The entries whose package differs from what is installed."""
        wheels = state.installed_wheels(self.root)
        needed = []
        for e in entries:
            if e["type"] == "wheel":
                have = wheels.get(state.normalize(e["name"]))
                if have is None or have[0] != e["version"]:
                    needed.append(e)
            elif state.src_sha256(e["path"], self.root) != e["pkg_sha256"]:
                needed.append(e)
        return needed

    def preflight(self, needed):
        """Refuse before downloading: wheel tags, and sizes against free flash."""
        free, block = state.fs_free(self.root)
        self.block = block
        need = RESERVE_BLOCKS * block
        for e in needed:
            tag = e.get("tag")
            if tag and not state.tag_matches(tag, self.device):
                raise InvalidUpdate("wheel tag %s does not run on this device" % tag)
            size = e["size"] or 0
            # Staged files plus the copies apply() writes (a wheel's download
            # goes before its files are copied): about twice the package.
            need += 2 * (size + block)
        if need > free:
            raise InvalidUpdate("does not fit: needs %d bytes, %d free" % (need, free))
        self.begin()

    def begin(self):
        """Start from a clean stage (an applied earlier set is confirmed)."""
        recover.confirm(self.root)
        recover._makedirs(self.root + _STAGE + "/x")

    def download(self, entry):
        """A Download sink for `entry`, written into the stage."""
        free, block = state.fs_free(self.root)
        limit = entry["size"]
        if limit is None:
            limit = free - RESERVE_BLOCKS * block
        return Download(self._stage(len(self.ops)), entry, limit)

    def stage(self, entry):
        """Verify a downloaded package and stage what it installs."""
        i = len(self.ops)
        if entry["type"] == "src":
            target = "/" + entry["path"]
            self._add(target, entry["pkg_sha256"], self._stage(i))
            if self._src is None:
                self._src = state.src_index(self.root)
            self._src[entry["path"]] = entry["pkg_sha256"]
            return
        path = self._stage(i) + ".whl"
        os.rename(self._stage(i), path)
        from mpy_blox.update.stagewheel import stage_wheel

        try:
            stage_wheel(self, entry, path)
        finally:
            os.remove(path)

    def _old(self, target):
        return recover.file_sha256(self.root + target)

    def _cost(self, path):
        # Flash that a copy of this file takes during apply(), in whole blocks.
        try:
            size = os.stat(self.root + path)[6]
        except OSError:
            return 0
        return (size // self.block + 2) * self.block

    def _add(self, target, new_hex, staged):
        # A file that is already there, byte for byte, needs no operation.
        old = self._old(target)
        if old == new_hex:
            os.remove(staged)
            self.ops.append(None)
            return
        # apply() writes the target and a backup of the old file.
        cost = (os.stat(staged)[6] // self.block + 2) * self.block
        if old is not None:
            cost += self._cost(target)
        self.ops.append(("P", target, new_hex, old, cost))

    def _delete(self, target):
        old = self._old(target)
        if old is not None:
            self.ops.append(("D", target, None, old, self._cost(target)))

    def commit(self):
        """Write the journal and switch over; True if anything changed."""
        try:
            self._stage_src_index()
        except OSError:
            self.abort()
            raise
        if not any(self.ops):
            self.abort()
            return False
        # apply() must never run out of flash half-way: refuse now if it could.
        need = sum(op[4] for op in self.ops if op) + RESERVE_BLOCKS * self.block
        free = state.fs_free(self.root)[0]
        if need > free:
            self.abort()
            raise InvalidUpdate("does not fit: installing needs %d bytes, %d free" % (need, free))
        h = hashlib.sha256()
        journal = self.root + recover._JOURNAL
        try:
            with open(journal, "wb") as f:
                for line in self._journal_lines():
                    h.update(line)
                    f.write(line)
                f.write(b"end %s\n" % hex_digest(h.digest()))
        except OSError:
            recover._remove(journal)  # no complete journal: nothing happened
            self.abort()
            raise
        log.info("committing %d file operations", sum(1 for op in self.ops if op))
        recover.apply(self.root)
        return True

    def _stage_src_index(self):
        if self._src is None:
            return
        import json

        staged = self._stage(len(self.ops))
        with open(staged, "w") as f:
            json.dump(self._src, f)
        self._add(state.SRC_INDEX, recover.file_sha256(staged), staged)

    def _journal_lines(self):
        yield recover._HEAD
        for i, op in enumerate(self.ops):
            if op is None:
                continue
            kind, target, new, old, _ = op
            if kind == "P":
                yield ("P %d %s %s %s\n" % (i, target, new, old or "-")).encode()
            else:
                yield ("D %d %s %s\n" % (i, target, old)).encode()

    def abort(self):
        """Forget everything staged: the device is as it was."""
        self.ops = []
        self._src = None
        recover._clean_stage(self.root)


def install(entries, open_package, root="", device=None):
    """Install a decoded list synchronously; open_package(entry) -> reader.

    Returns the entries it installed ([] when nothing was needed).
    """
    inst = Installer(root, device)
    needed = inst.plan(entries)
    if not needed:
        return []
    inst.preflight(needed)
    buf = bytearray(_CHUNK)
    mv = memoryview(buf)
    try:
        for entry in needed:
            reader = open_package(entry)
            sink = inst.download(entry)
            try:
                size = getattr(reader, "size", None)
                if size is not None and entry["size"] is not None and size != entry["size"]:
                    raise InvalidUpdate("size mismatch: %d bytes published, %d listed"
                                        % (size, entry["size"]))
                while True:
                    n = reader.readinto(buf)
                    if not n:
                        break
                    sink.write(mv[:n])
            finally:
                sink.close()
            sink.finish()
            inst.stage(entry)
    except BaseException:
        inst.abort()
        raise
    # Not under the abort above: once the journal exists, only the journal
    # decides (a failure in commit() is finished by the next boot's recovery).
    inst.commit()
    return needed
