# Read a staged wheel from flash through its central directory, entry by
# entry, and inflate one entry at a time.
#
# Memory: nothing here grows with the number of entries. The caller's one
# buffer carries headers and data; a walk over the directory creates only
# short-lived objects, so a wheel of hundreds of files leaves the heap as it
# found it (a table of entries, built next to short-lived garbage, is what
# fragmented a 100 KB heap). The deflate decoder (about 1.3 KB of state plus
# the window) is the one big allocation: `reserve` keeps a block for it that
# is given back right before each inflate and taken again after.
# A wheel is a zip: we support stored (0) and deflated (8) entries, no zip64,
# no encryption, no symlinks, no `.data` folder, and refuse anything else
# before writing a byte.
#
# The deflate window: a raw deflate stream does not say how far back it refers,
# so the builder declares it in the zip's archive comment as "wbits=N" (9..15,
# see docs/protocol.md); a wheel without it is a standard wheel (wbits 15). The
# window must fit the free heap or the wheel is refused before allocating it.
import binascii
import gc
import hashlib
import struct

from mpy_blox.update.paths import HeapShort, InvalidUpdate, check_wheel_path, fold

_EOCD = const(22)
_MAX_COMMENT = const(256)
_CDH = const(46)
_LFH = const(30)
_MAX_NAME = const(255)
MAX_FILES = const(1000)
_WINDOW_MARGIN = const(4096)  # the decoder's own state (~1.3 KB), and some slack
# uzlib's decompressor state, one block (1.1 KB on 32-bit, more on 64-bit).
_DECODER_STATE = const(1344)
# The block kept for one inflate: a wbits-10 window, the decoder's state and
# the output file's cache (up to 1 KB on LittleFS), with headers.
RESERVE = const(4096)
_S_IFMT = const(0o170000)
_S_IFLNK = const(0o120000)

_reserve = None


def hold_reserve():
    """Keep a block for the decoder, taken where it fits now (after a collect)."""
    global _reserve
    _reserve = None
    gc.collect()
    try:
        _reserve = bytearray(RESERVE)
    except MemoryError:
        _reserve = None  # the window check still decides, later


def drop_reserve():
    global _reserve
    _reserve = None


def _wbits(comment):
    i = comment.find(b"wbits=")
    if i < 0:
        return 15
    try:
        w = int(comment[i + 6 : i + 8].strip())
    except ValueError:
        raise InvalidUpdate("bad wbits in wheel comment")
    if not 9 <= w <= 15:
        raise InvalidUpdate("bad wbits in wheel comment")
    return w


def window_fits(wbits):
    """True if the deflate decoder for 2**wbits can be allocated now; False if
    the heap is too small for it; None if it is large enough but has not the
    blocks at this moment (fragmented: a fresh heap may have them)."""
    gc.collect()
    if gc.mem_free() < (1 << wbits) + _WINDOW_MARGIN:
        return False
    # Enough in total is not enough: the heap may be fragmented. Probe for the
    # blocks the decoder takes (moddeflate: its state, then the window, two
    # allocations), then give them back for it.
    try:
        state = bytearray(_DECODER_STATE)
        window = bytearray(1 << wbits)
    except MemoryError:
        return None
    state = window = None  # noqa: F841  (the blocks go back before the collect)
    gc.collect()
    return True


class Wheel:
    """A staged wheel file; walk its directory, extract entries verified.

    `buf` (at least 512 bytes) is the caller's: used for headers and data.
    """

    def __init__(self, path, size, buf):
        self.f = open(path, "rb")
        self.buf = buf
        self.dist_info = None
        n = min(size, _EOCD + _MAX_COMMENT, len(buf))
        if n < _EOCD:
            raise InvalidUpdate("not a wheel (too short)")
        self.f.seek(size - n)
        tail = memoryview(buf)[:n]
        self.f.readinto(tail)
        i = bytes(tail).rfind(b"PK\x05\x06")
        if i < 0:
            raise InvalidUpdate("not a wheel (no zip directory)")
        disk, cd_disk, _, count, cd_size, cd_off, clen = struct.unpack_from("<HHHHIIH", buf, i + 4)
        if disk or cd_disk or count == 0xFFFF or cd_off == 0xFFFFFFFF:
            raise InvalidUpdate("zip64 or multi-disk wheels are not supported")
        if cd_off + cd_size > size - n + i or count > MAX_FILES:
            raise InvalidUpdate("corrupt wheel directory")
        self.wbits = _wbits(bytes(tail[i + _EOCD : i + _EOCD + clen]))
        self.count = count
        self.cd_off = cd_off

    def close(self):
        self.f.close()

    def entries(self):
        """Yield (name, method, csize, usize, local header offset), all checked.

        Only short-lived objects: call it once to check, again to extract.
        """
        pos = self.cd_off
        buf = self.buf
        for _ in range(self.count):
            self.f.seek(pos)
            if self.f.readinto(memoryview(buf)[:_CDH]) != _CDH or buf[:4] != b"PK\x01\x02":
                raise InvalidUpdate("corrupt wheel directory")
            (
                made_by,
                _,
                flags,
                method,
                _,
                _,
                _,
                csize,
                usize,
                nlen,
                xlen,
                clen,
                _,
                _,
                attrs,
                off,
            ) = struct.unpack_from("<HHHHHHIIIHHHHHII", buf, 4)
            if nlen > _MAX_NAME:
                raise InvalidUpdate("wheel entry name too long")
            self.f.readinto(memoryview(buf)[_CDH : _CDH + nlen])
            name = str(memoryview(buf)[_CDH : _CDH + nlen], "utf-8")
            pos += _CDH + nlen + xlen + clen
            if name.endswith("/"):
                continue  # a folder entry: folders follow from the files
            check_wheel_path(name)
            if flags & 1:
                raise InvalidUpdate("encrypted wheel entry: " + name)
            if method not in (0, 8):
                raise InvalidUpdate("unsupported compression in wheel: " + name)
            if 0xFFFFFFFF in (csize, usize, off):
                raise InvalidUpdate("zip64 wheel entry: " + name)
            if made_by >> 8 == 3 and (attrs >> 16) & _S_IFMT == _S_IFLNK:
                raise InvalidUpdate("symlink in wheel: " + name)
            top = name[: name.find("/")] if "/" in name else name
            # Folded as FAT folds it: "x.dist-info." and "X.DIST-INFO" are x.dist-info there.
            folded = fold(top)
            if folded.endswith(".data"):
                raise InvalidUpdate("wheel .data folders are not supported")
            if folded.endswith(".dist-info"):
                if self.dist_info is None:
                    self.dist_info = top
                elif self.dist_info != top:
                    raise InvalidUpdate("wheel has two .dist-info folders")
            yield name, method, csize, usize, off

    def _data_start(self, off):
        buf = self.buf
        self.f.seek(off)
        if self.f.readinto(memoryview(buf)[:_LFH]) != _LFH or buf[:4] != b"PK\x03\x04":
            raise InvalidUpdate("corrupt wheel entry header")
        nlen, xlen = struct.unpack_from("<HH", buf, 26)
        start = off + _LFH + nlen + xlen
        self.f.seek(start)
        return start

    def _window_error(self):
        # Also raised for a MemoryError while inflating: the window is allocated
        # at the first read, next to the filesystem's per-file caches.
        return "wheel needs a %d-byte deflate window (wbits %d): not enough free heap" % (
            1 << self.wbits,
            self.wbits,
        )

    def copy_entry(self, method, csize, off, out, limit):
        """Stream one entry into `out` (a path, a stream or None), never past
        `limit` bytes; return (sha256 digest, size)."""
        global _reserve
        kept = _reserve is not None
        _reserve = None  # the decoder and the output file's cache go there
        gc.collect()
        src = None
        f = None
        try:
            start = self._data_start(off)
            if method == 8:
                import deflate

                fits = window_fits(self.wbits)
                if fits is None:
                    raise HeapShort(self._window_error())
                if not fits:
                    raise InvalidUpdate(self._window_error())
                try:
                    src = deflate.DeflateIO(self.f, deflate.RAW, self.wbits)
                except MemoryError:
                    raise HeapShort(self._window_error())
            f = open(out, "wb") if isinstance(out, str) else out
            digest, total = self._copy(src, csize, f, limit)
            # Deflate reads its input a byte at a time, straight from the wheel
            # file: an entry whose data runs past its own size is corrupt.
            if self.f.tell() - start > csize:
                raise InvalidUpdate("corrupt compressed data in wheel")
            return digest, total
        finally:
            if f is not None and f is not out:
                f.close()
            src = f = None
            if kept:
                hold_reserve()

    def _copy(self, src, csize, out, limit):
        h = hashlib.sha256()
        buf = self.buf
        mv = memoryview(buf)
        total = 0
        left = csize  # a stored entry: exactly its compressed bytes
        while True:
            if src is None:
                n = self.f.readinto(mv[: min(len(buf), left)]) if left else 0
                left -= n
            else:
                try:
                    n = src.readinto(mv)
                except (OSError, ValueError, EOFError):
                    raise InvalidUpdate("corrupt compressed data in wheel")
                except MemoryError:  # the window is allocated at the first read
                    raise HeapShort(self._window_error())
            if not n:
                break
            total += n
            if total > limit:
                raise InvalidUpdate("wheel entry larger than its RECORD size")
            h.update(mv[:n])
            if out is not None:
                out.write(mv[:n])
        return h.digest(), total


def record_hash(digest):
    """RECORD's form of a digest: sha256=<urlsafe base64, no padding>."""
    b = binascii.b2a_base64(digest).strip().rstrip(b"=")
    return "sha256=" + b.decode().replace("+", "-").replace("/", "_")
