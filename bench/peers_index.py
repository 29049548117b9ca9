"""A mip package index generated from the benchmark's packages, and the HTTP server
that serves it (not a benchmark: bench/run.py runs bench_*).

The layout is micropython-lib's (tools/build.py there, read by mip's `_install_json`):

    package/6/{name}/latest.json   {"v": 1, "version": ..., "hashes": [[path, h8]],
                                    "urls": [[path, url]], "deps": [[name, version]]}
    file/{h8[:2]}/{h8}             a file's bytes, named by the first 8 hex digits
                                   of its SHA256

`6` is the .mpy version both lanes report (sys.implementation._mpy & 0xFF). mip
fetches a "hashes" file from the index's file/ folder and a relative "urls" entry
from beside its package json; it follows "deps" with the same index.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

MPY_VERSION = 6
HASH_LEN = 8  # micropython-lib's default --hash-prefix


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:HASH_LEN]


def write_package(
    root: Path,
    name: str,
    version: str,
    hashed: dict[str, bytes] | None = None,
    urls: dict[str, bytes] | None = None,
    deps: list[str] = (),
) -> None:
    """`name`'s latest.json under `root`: `hashed` files by hash in file/, `urls`
    files beside the json (relative urls), `deps` at their latest version."""
    folder = root / "package" / str(MPY_VERSION) / name
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"v": 1, "version": version, "hashes": [], "urls": [], "deps": []}
    for path, data in (hashed or {}).items():
        h = short_hash(data)
        out = root / "file" / h[:2] / h
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        doc["hashes"].append([path, h])
    for path, data in (urls or {}).items():
        (folder / path.replace("/", "_")).write_bytes(data)
        doc["urls"].append([path, path.replace("/", "_")])
    doc["deps"] = [[d, "latest"] for d in deps]
    (folder / "latest.json").write_text(json.dumps(doc))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class IndexServer:
    """Serves `root` over HTTP on 127.0.0.1 (a thread) while in its `with` block."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_Quiet, directory=str(root))
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> IndexServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
