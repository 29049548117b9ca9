# mpypi boot recovery: finishes or undoes an interrupted update commit.
#
# main.py runs recover() before anything imports from /lib. This file lives at
# the flash root, outside /lib, and no update ever writes it (mpy_blox.update
# refuses its path), so recovery never depends on a file an update replaces.
# It imports only built-in modules and prints its own log lines for the same
# reason. The installer (mpy_blox.update.install) writes the journal through
# write_journal() and then calls apply() from here, so the journal's format,
# its commit and its recovery are one piece of code. Its files (the journal,
# /.mpypi/applied, the stage folder) are this module's: others name them
# through JOURNAL and STAGE, and change them only through these functions.
#
# The journal (/.mpypi/journal) is text, one operation a line, closed by a line
# with the SHA256 of everything before it, so a journal cut short by a power
# loss is recognised and means "nothing was moved yet":
#
#   mpypi-journal 1
#   P 0 /lib/pkg/a.mpy <new sha256> <old sha256 or ->    put staged n0 at the path
#   D 1 /lib/pkg-0.1.dist-info/RECORD <old sha256>       delete (kept as backup b1)
#   end <sha256 of the lines above>
#
# Operation i stages its new file at /.mpypi/stage/n<i> and keeps the replaced
# file at /.mpypi/stage/b<i> until the new set is confirmed. Every step is
# idempotent and decided by the state of the files, so apply() can be cut and
# rerun any number of times. A file moves by rename where renames are atomic
# (LittleFS, whose cross-folder renames are power-safe by design): the commit
# then writes no file data at all. On FAT a rename is not atomic (FatFs writes
# the new entry, then removes the old one: a cut between leaves two entries on
# one cluster chain), so there a file moves by verified copy: a copy is checked
# by SHA256 on every rerun, and its source (the staged file, or the target
# before its backup is verified) is never modified. Never is a file renamed
# onto an existing one. See docs/protocol.md, "The journal".
# After the last step /.mpypi/applied is written: the new set is on trial, kept
# with its backups until confirm() ends the journal, or rollback() runs it
# backwards once request_rollback() wrote /.mpypi/rollback (the reason; it stays
# after the rollback as its outcome, until forget_rollback()). recover() counts
# the boots of a trial in NVS (mpypi/trial_boots) and rolls back by itself after
# a watchdog reset or on the 4th boot. See docs/protocol.md, "The journal and boot
# recovery".
# A journal committed beside a firmware image (docs/protocol.md, "Firmware") is
# bound to the OTA partition that image boots from (/.mpypi/firmware, the label,
# written before the journal): recover() rolls it forward only while that
# partition runs; once the bootloader has booted another one (the image crashed,
# failed its trial, or any reset came before its confirm), the journal is run
# backwards, applied or not, so packages never stay on the old firmware.
import hashlib
import os
from micropython import const

VERSION = 1
_DIR = const("/.mpypi")
STAGE = "/.mpypi/stage"
JOURNAL = "/.mpypi/journal"
_APPLIED = const("/.mpypi/applied")
ROLLBACK = "/.mpypi/rollback"
FIRMWARE = "/.mpypi/firmware"
_NVS = const("mpypi")  # NVS namespace; this module's key: trial_boots
_BOOTS = const("trial_boots")
_MAX_BOOTS = const(3)  # the 4th boot of a trial rolls back
_REASON_MAX = const(200)
_HEAD = const(b"mpypi-journal 1\n")
_CHUNK = const(1024)  # one buffer for hashing and copying; small: the heap may be fragmented


def _log(msg):
    print("I mpypi_recover: " + msg)


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def remove(path):
    """os.remove, where a missing file is no error."""
    try:
        os.remove(path)
    except OSError:
        pass


def makedirs(path):
    """Make the folders above the file `path` that do not exist yet."""
    # os.mkdir raises when a folder exists.
    i = path.find("/", 1)
    while i > 0:
        if not _exists(path[:i]):
            os.mkdir(path[:i])
        i = path.find("/", i + 1)


def file_sha256(path, buf=None):
    """Lower-case hex SHA256 of a file, or None if it cannot be read."""
    buf = buf or bytearray(256)
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


def renames_atomic(root=""):
    """True where apply() moves files by rename: not on FAT.

    FAT is the one file system MicroPython mounts whose renames are not atomic,
    and the one that ignores case: it finds /.mpypi as /.MPYPI. Asking costs no
    write. (The journal's folder exists whenever there is a journal to apply.)
    """
    return not _exists(root + _DIR.upper())


def _move(src, dst, buf, rename):
    if not rename:
        _copy(src, dst, buf)
        return
    makedirs(dst)
    if _exists(dst) and _exists(src):
        # Not there after a clean stage; anything found there failed its hash
        # (a file put back by hand): never rename onto it.
        remove(dst)
    os.rename(src, dst)


def _copy(src, dst, buf):
    makedirs(dst)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            n = fi.readinto(buf)
            if not n:
                break
            fo.write(memoryview(buf)[:n])


def write_journal(body, root="", buf=None, firmware=None):
    """Write the journal from the file `body` (its operation lines) and close it
    with its checksum line. On OSError no journal is left: nothing happened.
    firmware: the OTA partition label the journal is bound to (FIRMWARE)."""
    buf = buf or bytearray(_CHUNK)
    mv = memoryview(buf)
    # A new trial: the outcome of an earlier rollback, if never reported, must
    # not mark this journal as rolling back.
    remove(root + ROLLBACK)
    # The binding before the journal: a complete journal is never unbound, and
    # never bound by a marker an earlier attempt left.
    remove(root + FIRMWARE)
    if firmware:
        with open(root + FIRMWARE, "w") as f:
            f.write(firmware)
    h = hashlib.sha256(_HEAD)
    try:
        with open(body, "rb") as fi, open(root + JOURNAL, "wb") as f:
            f.write(_HEAD)
            while True:
                n = fi.readinto(buf)
                if not n:
                    break
                h.update(mv[:n])
                f.write(mv[:n])
            f.write(b"end %064x\n" % int.from_bytes(h.digest(), "big"))
    except OSError:
        remove(root + JOURNAL)
        raise


def read_journal(root=""):
    """Yield the operations of a complete journal: (kind, i, target, new, old).

    Raises ValueError if the journal is missing or was cut short.
    """
    h = hashlib.sha256()
    with open(root + JOURNAL, "rb") as f:
        if f.readline() != _HEAD:
            raise ValueError("journal version")
        h.update(_HEAD)
        while True:
            line = f.readline()
            if line.startswith(b"end "):
                break
            if not line.endswith(b"\n"):
                raise ValueError("journal cut short")
            h.update(line)
    if line.strip()[4:].decode() != "%064x" % int.from_bytes(h.digest(), "big"):
        raise ValueError("journal checksum")
    with open(root + JOURNAL, "rb") as f:
        f.readline()
        while True:
            w = f.readline().decode().split()
            if w[0] == "end":
                return
            if w[0] == "P":
                yield "P", w[1], w[2], w[3], w[4]
            else:
                yield "D", w[1], w[2], None, w[3]


def apply(root="", buf=None):
    """Roll a complete journal forward, then mark it applied.

    `buf`: the installer's one buffer, so a commit allocates none.
    """
    buf = buf or bytearray(_CHUNK)
    rename = renames_atomic(root)
    for kind, i, target, new, old in read_journal(root):
        t = root + target
        n = root + STAGE + "/n" + i
        b = root + STAGE + "/b" + i
        # The target is still the old file until its backup is verified. With
        # renames, a missing file hashes to None at once: the first run reads
        # no file; only a rerun after a cut hashes what is already moved.
        if old != "-" and file_sha256(b, buf) != old:
            _move(t, b, buf, rename)
        if kind == "P":
            if file_sha256(t, buf) != new:
                _move(n, t, buf, rename)
        else:
            remove(t)
            _rmdir_empty(t)
    _mark_applied(root)
    # On trial only the backups are needed: not the journal's body, nor on FAT
    # the sources of the copies (each holds a cluster at least). A cut here
    # leaves the rest to confirm() or rollback().
    clean_stage(root, True)


def _mark_applied(root):
    with open(root + _APPLIED, "wb") as f:
        f.write(b"1")


def _rmdir_empty(path):
    # An upgrade leaves the old .dist-info (and maybe package folders) empty.
    while True:
        path = path[: path.rfind("/")]
        if not path or path.endswith("/lib") or path == "":
            return
        try:
            os.rmdir(path)
        except OSError:
            return


def _applied(root):
    try:
        with open(root + _APPLIED, "rb") as f:
            return f.read(2) == b"1"
    except OSError:
        return False


def clean_stage(root="", backups=False):
    """Remove every staged file (not the journal), or all but the backups b<i>."""
    try:
        names = os.listdir(root + STAGE)
    except OSError:
        return
    for name in names:
        if not (backups and name[0] == "b"):
            remove(root + STAGE + "/" + name)


def _reason(root):
    # The rollback marker's reason; None without one. An empty marker (a cut
    # while request_rollback() wrote it) counts as none: it is written again.
    try:
        with open(root + ROLLBACK, "rb") as f:
            return f.read(_REASON_MAX).decode() or None
    except (OSError, UnicodeError):
        return None


def state(root=""):
    """'none', 'pending' (journal to apply), 'applied' (on trial: awaiting confirm)
    or 'rolling_back' (applied, and a rollback requested)."""
    if not _exists(root + JOURNAL):
        return "none"
    if not _applied(root):
        return "pending"
    return "rolling_back" if _reason(root) else "applied"


def _boots(n=-1):
    # The trial's boot count in NVS: read it (n < 0), set it, or erase it (0).
    # Without NVS (the unix port) there is no count.
    try:
        import esp32

        nvs = esp32.NVS(_NVS)
        if n < 0:
            return nvs.get_i32(_BOOTS)
        if n:
            nvs.set_i32(_BOOTS, n)
        else:
            nvs.erase_key(_BOOTS)  # ESP_ERR_NVS_NOT_FOUND, and no write, if absent
    except (ImportError, OSError):
        pass
    return 0


def _settle(root):
    # LittleFS repairs a rename or a folder relocation that a power cut
    # interrupted only at the first write after power-up; until then a read can
    # miss a folder being moved (the exhaustive power-cut test found /.mpypi/stage
    # missing to stat() but there to mkdir()). An mkdir of the journal's folder
    # is such a write and changes nothing. Without that folder (it lives in the
    # root, which LittleFS never relocates) there is nothing to recover, and a
    # boot writes nothing.
    if _exists(root + _DIR):
        try:
            os.mkdir(root + _DIR)
        except OSError:
            pass


def recover(root=""):
    """Boot step: finish or undo an interrupted commit or rollback; count a trial's boots.

    Returns what it did: 'none', 'applied' (a boot on trial), 'rolled_forward',
    'discarded' or 'rolled_back'.
    """
    _settle(root)
    s = state(root)
    gone = s != "none" and _firmware_gone(root)
    if gone:
        _log("undoing an update whose firmware does not run")
        if s == "pending":  # applied in part, or not at all: each step says
            _mark_applied(root)
        if s != "rolling_back":  # else the trial's reason stays
            request_rollback(gone, root)
        rollback(root)
        return "rolled_back"
    if s == "none":
        if _exists(root + _APPLIED):  # a confirm was cut after its journal went
            remove(root + _APPLIED)
        clean_stage(root)
        if _boots():  # a confirm or a rollback was cut after its journal went
            _boots(0)
        return "none"
    if s == "applied":
        import machine

        n = _boots() + 1
        if machine.reset_cause() == machine.WDT_RESET:
            request_rollback("watchdog reset", root)
        elif n > _MAX_BOOTS:
            request_rollback("reset %d times during the trial" % _MAX_BOOTS, root)
        else:
            _boots(n)
            return "applied"
        s = state(root)
    if s == "rolling_back":
        _log("rolling back the update on trial: " + _reason(root))
        rollback(root)
        return "rolled_back"
    try:
        for _ in read_journal(root):
            pass
    except (OSError, ValueError, IndexError, UnicodeError) as e:
        # Cut while the journal was written: nothing had been moved yet.
        _log("discarding an incomplete update journal (%s)" % e)
        remove(root + JOURNAL)
        clean_stage(root)
        return "discarded"
    _log("finishing an interrupted update")
    apply(root)
    return "rolled_forward"


def _end(root):
    remove(root + JOURNAL)  # the point of no return
    remove(root + FIRMWARE)
    remove(root + _APPLIED)
    clean_stage(root)
    _boots(0)


def confirm(root=""):
    """End a trial: the new set stays, the backups go.

    Refuses (ValueError) a journal not applied yet, or rolling back."""
    s = state(root)
    if s == "pending":
        raise ValueError("journal not applied")
    if s == "rolling_back":
        raise ValueError("journal rolling back")
    _end(root)


def _firmware_gone(root):
    # The reason, if the journal is bound to a partition that is not the running
    # one (the bootloader went back to the old image); else None.
    try:
        with open(root + FIRMWARE, "rb") as f:
            label = f.read(16).decode()
        import esp32

        running = esp32.Partition(esp32.Partition.RUNNING).info()[4]
    except (OSError, UnicodeError, ImportError, AttributeError):
        return None
    if running == label:
        return None
    return "firmware in %s did not confirm: the bootloader booted %s again" % (label, running)


def request_rollback(reason, root=""):
    """Have the trial rolled back, for `reason`; True if a trial was running.

    Writes the marker: rollback(), or the next boot's recover(), runs the
    journal backwards. The reason is kept as one line of printable ASCII."""
    if state(root) != "applied":
        return False
    reason = "".join(c if " " <= c <= "~" else "?" for c in str(reason))
    with open(root + ROLLBACK, "wb") as f:
        f.write((reason[:_REASON_MAX] or "unknown").encode())
    return True


def rollback(root="", buf=None):
    """Run a rolling-back journal backwards: the old set comes back.

    Each step is idempotent and decided by the journal's SHA256s, and moves a
    file as apply() does (rename on LittleFS, verified copy on FAT): a target
    that was new is removed; one that is not the old file gets its backup back.
    Then the journal goes (the point of no return), with the applied marker,
    the stage and the boot count. The rollback marker stays: rolled_back().
    """
    if state(root) != "rolling_back":
        raise ValueError("no rollback requested")
    buf = buf or bytearray(_CHUNK)
    rename = renames_atomic(root)
    for _, i, target, _, old in read_journal(root):
        t = root + target
        if old == "-":
            remove(t)
            _rmdir_empty(t)
        elif file_sha256(t, buf) != old:
            _move(root + STAGE + "/b" + i, t, buf, rename)
    _end(root)


def rolled_back(root=""):
    """The reason of a finished rollback not reported yet, else None."""
    if _exists(root + JOURNAL):
        return None
    return _reason(root)


def forget_rollback(root=""):
    """Once the outcome of a rollback is reported: drop its marker."""
    remove(root + ROLLBACK)
