# Works on a stopped virtual board's flash from the workstation:
#   micropython _vb_tool.py BOARD_DIR format|ls|cat|put|putdir|rm|fill|df ARGS...
# The host filesystem stays at "/"; the flash is mounted at /_flash.
import json
import os
import sys

import _vb_flash

_FLASH = "/_flash"
_CHUNK = 4096


def _join(path):
    path = path.strip("/")
    return _FLASH + ("/" + path if path else "")


def _walk(path, rel, out):
    for entry in os.ilistdir(path):
        name, kind = entry[0], entry[1]
        child = rel + "/" + name if rel else name
        if kind == 0x4000:
            out.append(("d", child, 0))
            _walk(path + "/" + name, child, out)
        else:
            out.append(("f", child, entry[3] if len(entry) > 3 else os.stat(path + "/" + name)[6]))


def _makedirs(path):
    parts = path.split("/")
    for i in range(3, len(parts)):  # skip "", "_flash"
        d = "/".join(parts[:i])
        try:
            os.mkdir(d)
        except OSError:
            pass


def _copy(src, dst):
    buf = bytearray(_CHUNK)
    mv = memoryview(buf)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            n = fi.readinto(buf)
            if not n:
                break
            fo.write(mv[:n])


def _put_tree(src, dst):
    _makedirs(dst + "/x")
    for entry in os.ilistdir(src):
        name, kind = entry[0], entry[1]
        if name == "__pycache__":
            continue
        if kind == 0x4000:
            _put_tree(src + "/" + name, dst + "/" + name)
        else:
            _copy(src + "/" + name, dst + "/" + name)


def main(board_dir, op, args):
    with open(board_dir + "/board.json") as f:
        board = json.load(f)
    board["dir"] = board_dir
    if op == "format":
        _vb_flash.make_filesystem(board)
        return
    _vb_flash.mount(board, _vb_flash.open_image(board), _FLASH)
    if op == "ls":
        out = []
        _walk(_join(args[0] if args else ""), "", out)
        for kind, name, size in out:
            print("%s %10d %s" % (kind, size, name))
    elif op == "cat":
        with open(_join(args[0]), "rb") as f:
            buf = bytearray(_CHUNK)
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                sys.stdout.buffer.write(buf[:n])
    elif op == "put":
        dst = _join(args[1])
        _makedirs(dst)
        _copy(args[0], dst)
    elif op == "putdir":
        _put_tree(args[0], _join(args[1]))
    elif op == "rm":
        os.remove(_join(args[0]))
    elif op == "fill":
        # Fill the flash, leaving about `args[0]` bytes free, with one file.
        leave = int(args[0])
        st = os.statvfs(_FLASH)
        size = st[0] * st[3] - leave
        buf = bytearray(_CHUNK)
        written = 0
        with open(_join(".fill"), "wb") as f:
            try:
                while written < size:
                    written += f.write(buf[: min(_CHUNK, size - written)])
            except OSError:
                pass  # full before `size`: metadata took its share
        print(written)
    elif op == "df":
        st = os.statvfs(_FLASH)
        print(st[0] * st[2], st[0] * st[3])
    else:
        raise ValueError("unknown operation " + op)
    import vfs

    vfs.umount(_FLASH)


_ERRORS = {
    2: "no such file or directory",
    17: "already exists",
    20: "not a directory",
    21: "is a directory",
    28: "no space left on the flash",
    39: "directory not empty",
}

try:
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
except OSError as e:
    code = e.args[0] if e.args else 0
    print(_ERRORS.get(code, "OSError %s" % code), file=sys.stderr)
    sys.exit(2)
