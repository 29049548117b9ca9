"""The device side of bench_peers: MicroPython sources the bench puts on its boards
(not a benchmark: bench/run.py runs bench_*).

- PROBE (compiled to /lib/peakprobe.mpy): wraps `open` so that every file opened for
  writing collects the garbage and records `gc.mem_free()` at its first write and
  after every 16 KiB written; it prints each new low (`PEAK free F of T`). The same
  probe for every method, so the figures compare: the least free heap at a file
  write, i.e. while the installer holds what it holds to write.
- MAIN: the main.py of the mip and upstream boards: if /todo names an installer
  module and a port, it times `install(port)` with ticks_ms.
- MIP: `mip.install` of the benchmark's set from the bench's index.
- UPSTREAM: the original mpy-blox's way (github.com/maruno/mpy-blox 0.6.0,
  mpy_blox/mqtt/update.py, wheel/__init__.py, wheel/wheelfile.py, zipfile.py),
  rewritten small: each package arrives as one retained MQTT message, read whole
  with asyncio's readexactly (a bytes object grown by concatenation), its payload
  copied out (`bytes(packet[offset:])`, as MQTTMessage.from_packed), a wheel opened
  as a zip over BytesIO, each member read and inflated whole, checked against its
  CRC32 and its RECORD hash, then written with one write (`rewrite_file`); an
  upgrade skips members whose RECORD line is unchanged and removes the old
  version's leftovers. One deviation: upstream's zip reader refused a zip with a
  comment, which our wheels carry ("wbits=10"); this one looks for the end record.
  Upstream spoke MQTT 5 through its own asyncio client; this speaks MQTT 3.1.1
  over a polled socket (a few bytes less per packet).
"""

PROBE = """
import gc, builtins
_open = builtins.open
_low = [1 << 30]
def probe():
    gc.collect()
    f = gc.mem_free()
    if f < _low[0]:
        _low[0] = f
        print("PEAK free", f, "of", f + gc.mem_alloc())
class _W:
    def __init__(self, f):
        self.f = f
        self.n = -1
    def write(self, b):
        if self.n < 0 or self.n >= 16384:
            self.n = 0
            probe()
        self.n += len(b)
        return self.f.write(b)
    def close(self):
        self.f.close()
    def __enter__(self):
        return self
    def __exit__(self, *a):
        self.f.close()
    def __getattr__(self, name):
        return getattr(self.f, name)
def _probing_open(path, mode="r", *a):
    f = _open(path, mode, *a)
    return _W(f) if ("w" in mode or "a" in mode or "+" in mode) else f
builtins.open = _probing_open
"""

MAIN = """
import gc, time
{probe}
try:
    with open("/todo") as f:
        todo = f.read().split()
except OSError:
    todo = None
if todo:
    gc.collect()
    print("PEERS start free", gc.mem_free())
    t0 = time.ticks_ms()
    try:
        __import__(todo[0]).install(int(todo[1]))
        print("PEERS done ms", time.ticks_diff(time.ticks_ms(), t0))
    except MemoryError as e:
        print("PEERS failed MemoryError", e)
    except Exception as e:
        print("PEERS failed", repr(e))
"""

MIP = """
import mip
def install(port):
    index = "http://127.0.0.1:%d" % port
    mip.install("bench-set", index=index, target="/lib")
    mip.install("benchdata", index=index, target="/data")
"""

UPSTREAM = """
import binascii, deflate, hashlib, io, os, select, socket, struct

def _readexactly(s, n):
    # MicroPython's asyncio StreamReader.readexactly: r += what each read returns
    r = b""
    p = select.poll()
    p.register(s, select.POLLIN)
    while n:
        p.poll()
        r2 = s.read(n)
        if r2 is not None:
            if not len(r2):
                raise EOFError
            r += r2
            n -= len(r2)
    return r

def _packet(s):
    header = _readexactly(s, 1)[0]
    n, shift = 0, 0
    while True:
        b = _readexactly(s, 1)[0]
        n |= (b & 127) << shift
        shift += 7
        if not b & 128:
            break
    return header, memoryview(_readexactly(s, n))

def _message(port, topic):
    s = socket.socket()
    s.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    cid = b"peers-upstream"
    body = b"\\x00\\x04MQTT\\x04\\x02\\x00\\x3c" + struct.pack("!H", len(cid)) + cid
    s.write(bytes([0x10, len(body)]) + body)
    s.setblocking(False)
    _packet(s)  # CONNACK
    t = topic.encode()
    body = b"\\x00\\x01" + struct.pack("!H", len(t)) + t + b"\\x00"
    s.setblocking(True)
    s.write(bytes([0x82, len(body)]) + body)
    s.setblocking(False)
    while True:
        header, packet = _packet(s)
        if header >> 4 == 3:  # PUBLISH, QoS 0
            break
    s.setblocking(True)
    s.write(b"\\xe0\\x00")
    s.close()
    tlen = struct.unpack("!H", packet[:2])[0]
    # MQTTMessage.from_packed: the payload copied out of the packet (both live)
    payload = bytes(packet[2 + tlen :])
    return packet, payload

def _makedirs(path):
    prefix = ""
    for part in path.split("/")[:-1]:
        prefix += part
        try:
            os.mkdir(prefix)
        except OSError:
            pass
        prefix += "/"

def _rewrite_file(path, data):
    try:
        if os.stat(path)[6] > len(data):
            os.remove(path)
    except OSError:
        pass
    with open(path, "wb") as f:
        f.write(data)

def _b64(digest):
    return binascii.b2a_base64(digest)[:-1].replace(b"+", b"-").replace(b"/", b"_").rstrip(b"=")

def _record(text):
    out = {}
    for line in text.split("\\n"):
        parts = line.split(",")
        if len(parts) == 3:
            out[parts[0]] = parts[1]
    return out

def _zip_entries(z, at):
    # upstream read the EOCD at -22 and refused a zip with a comment; our wheels
    # carry one ("wbits=10"), so the EOCD is searched for (one rfind on the bytes)
    z.seek(at)
    eocd = z.read(22)
    count, size, offset = struct.unpack("<HLL", eocd[10:20])
    z.seek(offset)
    entries = {}
    for _ in range(count):
        h = z.read(46)
        method, _, _, crc, csize, usize, nlen, elen, clen = struct.unpack("<HHHLLLHHH", h[10:34])
        local = struct.unpack("<L", h[42:46])[0]
        name = z.read(nlen).decode()
        z.seek(elen + clen, 1)
        entries[name] = (method, crc, csize, usize, local, nlen, elen)
    return entries

def _read_member(z, e):
    method, crc, csize, usize, local, nlen, elen = e
    z.seek(local + 30 + nlen + elen)
    comp = z.read(csize)
    data = deflate.DeflateIO(io.BytesIO(comp), deflate.RAW, 15).read() if method == 8 else comp
    if binascii.crc32(data) != crc:
        raise ValueError("bad CRC32")
    return data

def _install_wheel(payload):
    z = io.BytesIO(payload)
    entries = _zip_entries(z, payload.rfind(b"PK\\x05\\x06"))
    dist = [n for n in entries if n.endswith(".dist-info/RECORD")][0].split("/")[0]
    record = _record(_read_member(z, entries[dist + "/RECORD"]).decode())
    name = dist.split("-")[0]
    old_dist = None
    for d in os.listdir("/lib"):
        if d.startswith(name + "-") and d.endswith(".dist-info") and d != dist:
            old_dist = d
    old = {}
    if old_dist:
        with open("/lib/" + old_dist + "/RECORD") as f:
            old = _record(f.read())
    for member, digest in record.items():
        if old.get(member) == digest and digest:
            continue
        data = _read_member(z, entries[member])
        if digest and b"sha256=" + _b64(hashlib.sha256(data).digest()) != digest.encode():
            raise ValueError("bad hash: " + member)
        _makedirs("/lib/" + member)
        _rewrite_file("/lib/" + member, data)
        data = None
    for member in old:
        if member not in record:
            os.remove("/lib/" + member)
    if old_dist:
        os.rmdir("/lib/" + old_dist)

def install(port):
    with open("/upstream.list") as f:
        todo = [line.split() for line in f.read().split("\\n") if line]
    for kind, topic, path in todo:
        packet, payload = _message(port, topic)
        if kind == "wheel":
            _install_wheel(payload)
        else:
            _makedirs(path)
            _rewrite_file(path, payload)
        packet = payload = None
"""
