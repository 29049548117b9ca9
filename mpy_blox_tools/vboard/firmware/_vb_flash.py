# The virtual board's SPI flash: a block device over an image file on the host.
#
# Implements the extended block protocol (readblocks/writeblocks with an offset,
# ioctl) that VfsLfs2 and VfsFat use on an ESP32. Every writeblocks() call and
# every sector erase is one "block write": it is counted, and the board can lose
# power at a chosen one so tests can cut an install at every write it makes.

_IOCTL_BLOCK_COUNT = 4
_IOCTL_BLOCK_SIZE = 5
_IOCTL_BLOCK_ERASE = 6
# A NOR flash programs 256-byte pages; littlefs then writes in units of that
# (the unix port's default of 32 would count many more, smaller, writes).
_LFS_PROG_SIZE = 256
# What an erased sector reads as, 256 bytes at a time. A constant of this module:
# it loads with the emulation, before the board's own code, and never moves.
_ERASED = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff" * 16


# The block-write count of this boot, shared by every partition of the chip (the
# filesystem's and the app partitions'): one knob, --cut-at, cuts at any of them.
_writes = 0
_cut_at = 0  # 0: never
_counter = None  # an open host file the count is mirrored to
_on_cut = None
# Allocated at boot, within the emulation's own heap allowance: counting must
# not take heap from the board's code at the moment it runs.
_digits = bytearray(b"         0\n")


def start(counter, cut_at, on_cut):
    """From the boot ROM: count block writes into `counter`; cut the power at `cut_at`."""
    global _counter, _cut_at, _on_cut
    _counter, _cut_at, _on_cut = counter, cut_at, on_cut


def count():
    # One flash operation (a program or a sector erase). Allocates nothing, or the
    # emulation would fragment the heap the board's code is measured against.
    global _writes
    _writes += 1
    if _writes == _cut_at:
        # Power fails before this operation reaches the flash: everything
        # written so far is on the image (posix writes are unbuffered).
        _on_cut(_writes)
    if _counter:
        n = _writes
        i = 9
        while i >= 0:
            _digits[i] = 0x30 + n % 10 if n or i == 9 else 0x20
            n //= 10
            i -= 1
        _counter.seek(0)
        _counter.write(_digits)


class Flash:
    def __init__(self, image, block_size, block_count):
        self._image = image  # an open 'r+b' file: stays usable after the host fs is unmounted
        self._block_size = block_size
        self._block_count = block_count
        self._erased = _ERASED

    def readblocks(self, block, buf, offset=0):
        self._image.seek(block * self._block_size + offset)
        n = self._image.readinto(buf)
        if n != len(buf):
            raise OSError(5)  # EIO: the image is shorter than the filesystem thinks

    def writeblocks(self, block, buf, offset=0):
        count()
        self._image.seek(block * self._block_size + offset)
        self._image.write(buf)

    def ioctl(self, op, arg):
        if op == _IOCTL_BLOCK_COUNT:
            return self._block_count
        if op == _IOCTL_BLOCK_SIZE:
            return self._block_size
        if op == _IOCTL_BLOCK_ERASE:
            # A NOR erase sets the sector to 0xFF, and littlefs relies on it: a
            # sector it erased but never programmed must not show its old data
            # (stale metadata could then pass for current after a power cut).
            # An erase is a flash operation like a write: counted, and cuttable.
            count()
            self._image.seek(arg * self._block_size)
            left = self._block_size
            while left > 0:
                left -= self._image.write(self._erased)
            return 0
        return 0  # init, deinit, sync: nothing to do for a file


def open_image(board):
    """Open the flash: the image file, or the folder's VFS in posix mode."""
    import vfs

    if board["fs"] == "posix":
        return vfs.VfsPosix(board["dir"] + "/flash")
    return open(board["dir"] + "/flash.img", "r+b")


def mount(board, image, root):
    """Mount the board's flash (from open_image) at `root`; return the Flash, if any."""
    import vfs

    fs = board["fs"]
    if fs == "posix":
        vfs.mount(image, root)
        return None
    flash = Flash(image, board["block_size"], board["flash_size"] // board["block_size"])
    if fs == "littlefs":
        vfs.mount(vfs.VfsLfs2(flash, progsize=_LFS_PROG_SIZE), root)
    else:
        vfs.mount(vfs.VfsFat(flash), root)
    return flash


def make_filesystem(board):
    """Make an empty filesystem on the board's image."""
    import vfs

    fs = board["fs"]
    if fs == "posix":
        return
    image = open(board["dir"] + "/flash.img", "r+b")
    flash = Flash(image, board["block_size"], board["flash_size"] // board["block_size"])
    if fs == "littlefs":
        vfs.VfsLfs2.mkfs(flash, progsize=_LFS_PROG_SIZE)
    else:
        vfs.VfsFat.mkfs(flash)
    image.close()
