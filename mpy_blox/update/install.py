# The install core: plan -> pre-flight -> download -> stage -> commit.
#
# Nothing outside /.mpypi/stage is written before commit(); commit() writes the
# journal and hands it to mpypi_recover.apply(), the same code the boot path
# runs to finish an interrupted commit. Any InvalidUpdate (or OSError) before
# that leaves the device exactly as it was once abort() has cleaned the stage.
#
#   inst = Installer()
#   for entry in inst.plan(entries):   # only what differs from the device
#       ...                            # (inst.indexed: nothing to download, but
#                                      # the src index learns files in place)
#       ...                            # inst.preflight(needed) first
#       sink = inst.download(entry)    # sink.write(chunk) ..., sink.finish()
#       inst.stage(entry)              # verify and extract into the stage
#   inst.commit()                      # the atomic switch-over; then reset
# or every download first, then inst.finish() (stage all, commit): the
# install boot frees the MQTT client's heap in between.
# install(entries, open_package) runs all of it synchronously (tests, tools).
#
# Memory (docs/protocol.md): one buffer for the whole install; the journal's
# operations are written to a stage file as they are planned, not kept; what
# lives through the install is allocated before the downloads, after a
# collect, so the per-file garbage never strands it between free blocks.
import gc
import hashlib
import os

from mpy_blox.log import get_logger
from mpy_blox.update import state
from mpy_blox.update.names import normalize
from mpy_blox.update.paths import InvalidUpdate
from mpy_blox.update.state import RESERVE_BLOCKS, hex_digest

_OPS = "/ops"  # in the stage: the journal's body while the stage is built
# mpypi_recover.STAGE. A lean Installer loads the recovery module only to begin
# and to commit (_recover()): while the wheels are staged its 6 KB would cost the
# deflate decoder its two blocks (on the 32-bit lane the install boot's edge moved
# from 88K to over 96K while it stayed loaded).
_STAGE = "/.mpypi/stage"
# mpy_blox.update.chunks.DIR: chunked downloads, kept across the install boot's
# restarts (outside the stage, which begin() cleans) until staged or refused.
_DL = "/.mpypi/dl"
_CHUNK = const(1024)

log = get_logger("update")


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
    def __init__(self, root="", device=None, lean=False):
        self.root = root
        self.device = device  # (mpy, platform) for tests; None: this device
        # lean: mpypi_recover is loaded only to begin and to commit (the install
        # boot, whose staging wants its heap); else it stays loaded throughout
        # (install(): its first import, on a whole heap, is the only one).
        self.lean = lean
        self.buf = bytearray(_CHUNK)  # the one buffer of the whole install
        self.n = 0  # the next stage file index
        self.changes = 0  # operations written to the journal's body
        self.cost = 0  # flash that apply() needs for them
        self._ops = None
        self._src = None
        self._wheels = False
        self.indexed = False  # plan() found src files in place the index lacks
        self.downloads = []  # (entry, stage index): downloaded, not staged yet
        self.block = 4096
        self.rename = False  # apply() moves by rename (LittleFS), else by copy

    # The stager's side (stagewheel too): stage files by index, and the
    # journal's operations on them.

    def stage_path(self, i):
        return self.root + _STAGE + "/n%d" % i

    def next_index(self):
        self.n += 1
        return self.n - 1

    def plan(self, entries):
        """The entries whose package differs from what is installed."""
        wheels = state.installed_wheels(self.root)
        needed = []
        for e in entries:
            if e["type"] == "wheel":
                have = wheels.get(normalize(e["name"]))
                if have is None or have[0] != e["version"]:
                    needed.append(e)
            elif state.src_sha256(e["path"], self.root, self.buf) != e["pkg_sha256"]:
                needed.append(e)
            else:
                # In place: installed, but the src index must name it (a board
                # made with its user_main.py, then a list with the same one), or
                # info.src never shows it. Loaded only then: a list whose files
                # all differ (the usual one) plans with no index in the heap.
                src = self._src = self._src or state.src_index(self.root)
                if src.get(e["path"]) != e["pkg_sha256"]:
                    src[e["path"]] = e["pkg_sha256"]
                    self.indexed = True
        return needed

    def preflight(self, needed, wheel_code=True):
        """Refuse before downloading: wheel tags, and sizes against free flash.

        wheel_code: load the wheel stager now and keep a block for its decoder,
        for staging right after each download; False when staging comes after
        the caller has freed heap (the install boot drops the MQTT client).
        """
        free, block = state.fs_free(self.root)
        self.block = block
        need = RESERVE_BLOCKS * block
        for e in needed:
            tag = e.get("tag")
            if tag and not state.tag_matches(tag, self.device):
                raise InvalidUpdate("wheel tag %s does not run on this device" % tag)
            size = e["size"] or 0
            # Staged files plus the copies apply() writes (a wheel's download
            # goes before its files are copied): about twice the package; less
            # what a resumed download already holds.
            need += 2 * (size + block)
            if "chunks" in e:
                from mpy_blox.update import chunks

                need -= chunks.kept(self.root, e)
        if need > free:
            raise InvalidUpdate("does not fit: needs %d bytes, %d free" % (need, free))
        wheels = wheel_code and any(e["type"] == "wheel" for e in needed)
        if wheels:
            # Loaded now, before anything is written or downloaded (later the
            # heap holds download and MQTT garbage), and the decoder's block kept.
            gc.collect()
            from mpy_blox.update import (
                stagewheel,  # noqa: F401
                zipwheel,
            )
        self.begin()
        if wheels:
            self._wheels = True
            zipwheel.hold_reserve()

    def begin(self):
        """Start from a clean stage (an applied earlier set is confirmed)."""
        recover = _recover()
        recover.confirm(self.root)
        recover.makedirs(self.root + _STAGE + "/x")
        self.rename = recover.renames_atomic(self.root)
        recover = None
        if self.lean:
            _drop_recover()
        self._ops = open(self.root + _STAGE + _OPS, "w")

    def download(self, entry):
        """A Download sink for `entry`, written into the stage."""
        free, block = state.fs_free(self.root)
        limit = entry["size"]
        if limit is None:
            limit = free - RESERVE_BLOCKS * block
        i = self._take(entry)
        if isinstance(i, int):  # a retry: the broken download goes
            _remove(self.stage_path(i))
        i = self.next_index()
        self.downloads.append((entry, i))
        return Download(self.stage_path(i), entry, limit)

    def downloaded(self, entry, path):
        """Take a package downloaded outside the stage, verified (a chunked
        download, mpy_blox.update.chunks), to be staged from `path`."""
        self._take(entry)
        self.downloads.append((entry, path))

    def drop_downloads(self, keep=()):
        """Delete the chunked downloads (and hash lists) of packages not in `keep`."""
        try:
            names = os.listdir(self.root + _DL)
        except OSError:
            return
        for name in names:
            if name[:64] not in keep:
                _remove(self.root + _DL + "/" + name)

    def _take(self, entry):
        # The stage index of entry's download (or the path of a chunked
        # one), no longer listed; None if none.
        for k in range(len(self.downloads)):
            if self.downloads[k][0] is entry:
                return self.downloads.pop(k)[1]
        return None

    def stage(self, entry):
        """Verify a downloaded package and stage what it installs."""
        i = self._take(entry)
        if i is None:
            raise ValueError("not downloaded: " + (entry.get("name") or entry["path"]))
        if isinstance(i, str):
            # A chunked download moves into the stage: from here on it is the
            # stage's (a cut now downloads it again), and its hash list goes.
            path, i = i, self.next_index()
            os.rename(path, self.stage_path(i))
            _remove(path + ".h")
        if entry["type"] == "src":
            target = "/" + entry["path"]
            self.add(target, entry["pkg_sha256"], i)
            if self._src is None:
                self._src = state.src_index(self.root)
            self._src[entry["path"]] = entry["pkg_sha256"]
            return
        path = self.stage_path(i) + ".whl"
        os.rename(self.stage_path(i), path)
        from mpy_blox.update.stagewheel import stage_wheel

        try:
            stage_wheel(self, entry, path)
        finally:
            os.remove(path)

    def _old(self, target):
        return state.file_sha256(self.root + target, self.buf)

    def _cost(self, path):
        # Flash that a copy of this file takes during apply(), in whole blocks;
        # a rename takes none beyond the folder's metadata.
        if self.rename:
            return self.block
        try:
            size = os.stat(self.root + path)[6]
        except OSError:
            return 0
        return (size // self.block + 2) * self.block

    def add(self, target, new_hex, i):
        """Plan to put stage file i at target (nothing if it is already there)."""
        staged = self.stage_path(i)
        old = self._old(target)
        if old == new_hex:
            os.remove(staged)
            return
        # apply() writes the target and a backup of the old file.
        cost = self._cost(staged)
        if old is not None:
            cost += self._cost(target)
        self._op("P %d %s %s %s\n" % (i, target, new_hex, old or "-"), cost)

    def delete(self, target):
        old = self._old(target)
        if old is not None:
            self._op("D %d %s %s\n" % (self.next_index(), target, old), self._cost(target))

    def _op(self, line, cost):
        self._ops.write(line)
        self.changes += 1
        self.cost += cost

    def finish(self, firmware=None):
        """Stage every download, then commit(firmware); True if anything changed."""
        try:
            while self.downloads:
                self.stage(self.downloads[0][0])
                gc.collect()
        except BaseException:
            self.abort()
            raise
        return self.commit(firmware)

    def commit(self, firmware=None):
        """Write the journal and switch over; True if anything changed.

        firmware: the OTA partition a firmware image of the same list boots from:
        the journal is bound to it and not applied here; boot recovery applies it
        once that partition runs (mpypi_recover, docs/protocol.md "Firmware")."""
        self.drop_downloads()  # all staged by now
        try:
            self._stage_src_index()
        except OSError:
            self.abort()
            raise
        if not self.changes:
            self.abort()
            return False
        # apply() must never run out of flash half-way: refuse now if it could.
        need = self.cost + RESERVE_BLOCKS * self.block
        free = state.fs_free(self.root)[0]
        if need > free:
            self.abort()
            raise InvalidUpdate("does not fit: installing needs %d bytes, %d free" % (need, free))
        self._close()
        # apply() must never stop half-way either (mpy_blox.update.layout).
        gc.collect()
        try:
            from mpy_blox.update import layout

            layout.check(self.root, self.root + _STAGE + _OPS)
        except BaseException:  # refused, or no heap for it: nothing happened
            self.abort()
            raise
        try:
            recover = _recover()
            recover.write_journal(self.root + _STAGE + _OPS, self.root, self.buf, firmware)
        except OSError:  # no complete journal: nothing happened
            self.abort()
            raise
        if firmware:
            log.info("%d file operations, applied once %s boots", self.changes, firmware)
            return True
        log.info("committing %d file operations", self.changes)
        recover.apply(self.root, self.buf)
        return True

    def _close(self):
        if self._ops is not None:
            self._ops.close()
            self._ops = None
        if self._wheels:
            from mpy_blox.update import zipwheel

            zipwheel.drop_reserve()

    def _stage_src_index(self):
        if self._src is None:
            return
        import json

        i = self.next_index()
        with open(self.stage_path(i), "w") as f:
            json.dump(self._src, f)
        self.add(state.SRC_INDEX, state.file_sha256(self.stage_path(i), self.buf), i)

    def abort(self):
        """Forget everything staged: the device is as it was."""
        self._close()
        self.n = self.changes = self.cost = 0
        self._src = None
        self.indexed = False
        self.downloads = []
        _recover().clean_stage(self.root)
        self.drop_downloads()


def _recover():
    import mpypi_recover

    return mpypi_recover


def _drop_recover():
    import sys

    sys.modules.pop("mpypi_recover", None)
    gc.collect()


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def install(entries, open_package, root="", device=None):
    """Install a decoded list synchronously; open_package(entry) -> reader.

    Returns the entries it installed ([] when nothing was needed).
    """
    inst = Installer(root, device)
    needed = inst.plan(entries)
    if not needed and not inst.indexed:
        return []
    inst.preflight(needed)
    buf = inst.buf
    mv = memoryview(buf)
    try:
        for entry in needed:
            reader = open_package(entry)
            sink = inst.download(entry)
            try:
                size = getattr(reader, "size", None)
                if size is not None and entry["size"] is not None and size != entry["size"]:
                    raise InvalidUpdate(
                        "size mismatch: %d bytes published, %d listed" % (size, entry["size"])
                    )
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
