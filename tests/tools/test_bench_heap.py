"""`make heap`'s probe goes into main.py as valid code, wherever main.py imports the app."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import bench_heap  # noqa: E402  (bench/ is no package)


def _imports(source: str) -> list[str]:
    """The modules `source` imports, in order (and so parses)."""
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)]
    return [a.name for n in sorted(nodes, key=lambda n: n.lineno) for a in n.names]


def test_the_probe_is_imported_just_before_the_app_in_the_repositorys_main_py():
    main = (REPO / "main.py").read_text()
    probed = bench_heap._with_probe(main)
    ast.parse(probed)
    lines = probed.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == "import mpy_blox.app")
    assert lines[at - 1].strip() == "import heapprobe"
    indent = len(lines[at]) - len(lines[at].lstrip())
    assert lines[at - 1] == " " * indent + "import heapprobe"
    assert probed.replace(lines[at - 1] + "\n", "", 1) == main  # nothing else changed


@pytest.mark.parametrize(
    "main",
    [
        "import mpy_blox.app\nmpy_blox.app.main()\n",
        "try:\n    import mpy_blox.app\n\n    mpy_blox.app.main()\nexcept Exception:\n    raise\n",
        "if True:\n\tif True:\n\t\timport mpy_blox.app  # the app\n",
    ],
)
def test_the_probe_takes_the_app_imports_indentation(main):
    assert _imports(bench_heap._with_probe(main)) == ["heapprobe", "mpy_blox.app"]


@pytest.mark.parametrize(
    "main",
    [
        "import mpy_blox\nmpy_blox.app.main()\n",
        "# import mpy_blox.app\n",
        "x = 'import mpy_blox.app'\n",
    ],
)
def test_a_main_py_without_the_app_import_is_refused(main):
    with pytest.raises(RuntimeError, match=r"no 'import mpy_blox\.app' statement"):
        bench_heap._with_probe(main)
