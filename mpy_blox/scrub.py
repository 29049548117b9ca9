# Scrubbing provisioned secrets from the raw flash once /provision.json is ingested.
#
# Deleting a file frees its blocks but does not erase them, and LittleFS writes
# copy-on-write: the plain secrets would stay readable in a flash dump. On
# LittleFS a small file even lives inline in its folder's metadata log, which
# keeps superseded commits until the block is compacted. So, with the secrets
# safe in the store (provision.ingest), scrub(path, needles):
#   1. overwrites the file with zeros of its length: on FAT the same sectors (FAT
#      rewrites a file's clusters in place), on LittleFS a new copy. The zeroed
#      file stays as the marker of a scrub in progress;
#   2. reads the raw partition (esp32.Partition "vfs") for each secret; while one
#      is there: churns the root folder's metadata (a small file written and
#      removed; LittleFS compacts a metadata block when it fills and keeps only
#      what is current) and reads again; if that is not enough, fills the free
#      space once with a file of zeros (every free block erased and programmed)
#      and removes it;
#   3. removes the marker, last. A power cut anywhere leaves the marker (or the
#      plain file, if the zeroing did not land): the next boot removes a leftover
#      fill file and scrubs again, for every secret the store holds.
# Costs are in docs/configuration.md ("Provisioning"). A board whose flash
# cannot be read raw (the virtual board's posix mode) is only zeroed and churned.
import os

from mpy_blox.log import get_logger

_CHURN = const(8)  # metadata commits of one churn (each: create, write, remove)
_ROUNDS = const(6)  # churns before the fill, and after it
_MIN_NEEDLE = const(4)  # shorter values are not looked for: they match anything

log = get_logger("provision")


def needles(values, names=None):
    """The byte strings to look for: each string value (of `names`, if given),
    as written and JSON-escaped as a provision.json holds it."""
    import json

    found = []
    for key, value in values.items():
        if not isinstance(value, str) or (names is not None and key not in names):
            continue
        for form in (value.encode(), json.dumps(value)[1:-1].encode()):
            if len(form) >= _MIN_NEEDLE and form not in found:
                found.append(form)
    return found


def _partition():
    try:
        import esp32

        parts = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")
    except (ImportError, AttributeError, OSError):
        return None
    return parts[0] if parts else None


def _buffer(needles, dev):
    # One block, after the tail of the block before it (holding()).
    return bytearray(max(len(n) for n in needles) - 1 + dev.ioctl(5, 0))


def holding(needles, dev=None, buf=None):
    """How many blocks of the raw partition hold one of `needles`; None if unreadable.

    buf: a buffer from _buffer(), reused. A scrub checks again after each
    churn, and the file system's garbage in between leaves a block-sized
    buffer no room on a fragmented heap: the caller keeps it.
    """
    dev = dev or _partition()
    if dev is None or not needles:
        return None if dev is None else 0
    count, size = dev.ioctl(4, 0), dev.ioctl(5, 0)
    keep = max(len(n) for n in needles) - 1  # a needle across two blocks is seen too
    buf = buf or _buffer(needles, dev)
    mv = memoryview(buf)
    hits = 0
    for block in range(count):
        mv[:keep] = mv[size:]  # the last block's tail
        dev.readblocks(block, mv[keep:])
        for n in needles:
            if n in buf:
                hits += 1
                break
    return hits


def _zero(path):
    size = os.stat(path)[6]
    zeros = bytes(min(size, 512))
    with open(path, "r+b") as f:
        while size > 0:
            size -= f.write(zeros[:size])


def fill_path(path):
    """The fill (and churn) file: `.scrub` beside `path`; removed at the end, or next time."""
    return path[: path.rfind("/") + 1] + ".scrub"


def _churn(fill):
    for _ in range(_CHURN):
        with open(fill, "wb") as f:
            f.write(b"\0" * 64)
        os.remove(fill)


def _fill(fill):
    zeros = bytes(512)
    n = 0
    try:
        with open(fill, "wb") as f:
            while True:
                n += f.write(zeros)
    except OSError:
        pass  # ENOSPC: every free block holds zeros now
    _remove(fill)
    return n


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass  # not there


def scrub(path, needles):
    """Zero `path`, clear the raw flash of `needles`, remove `path`. True if clean."""
    fill = fill_path(path)
    _remove(fill)  # left by a scrub that a power cut interrupted
    _zero(path)
    dev = _partition()
    # One buffer for every check, allocated first (see holding()).
    buf = _buffer(needles, dev) if dev is not None and needles else None
    left = holding(needles, dev, buf)
    churns = filled = 0
    while left and churns < 2 * _ROUNDS:
        if churns == _ROUNDS and not filled:
            filled = _fill(fill)
        _churn(fill)
        churns += 1
        left = holding(needles, dev, buf)
    os.remove(path)
    if left is None:
        _churn(fill)  # no raw access to check: compact the folder's log at least
        log.warning("%s zeroed and removed; the raw flash cannot be read to check", path)
        return False
    if left:
        log.error("%s removed, but %d flash block(s) may still hold a secret", path, left)
        return False
    log.info(
        "%s scrubbed: %d metadata churn(s), %d bytes filled, no secret on the flash",
        path,
        churns,
        filled,
    )
    return True
