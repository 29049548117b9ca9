"""The device logger: levels, lazy formatting, tracebacks."""


def test_levels_formatting_and_tracebacks(run_mpy):
    out = run_mpy(
        """
from mpy_blox.log import get_logger, set_level
log = get_logger("demo")
log.debug("hidden %d", 1)
log.info("shown %d of %s", 2, "three")
log.info("bad format %d", "x")
set_level("debug")
log.debug("now visible")
set_level("ERROR")
log.warning("hidden again")
try:
    1 / 0
except ZeroDivisionError as e:
    log.exception("it failed in %s", e, "division")
try:
    set_level("LOUD")
except ValueError as e:
    print("refused", e)
""",
        heap="32K",
    )
    lines = out.splitlines()
    assert not any("hidden" in line for line in lines)
    assert any(line.startswith("I ") and line.endswith("demo: shown 2 of three") for line in lines)
    assert any("demo: bad format %d ('x',)" in line for line in lines)
    assert any(line.startswith("D ") and line.endswith("demo: now visible") for line in lines)
    assert any(
        line.startswith("E ") and line.endswith("demo: it failed in division") for line in lines
    )
    assert "ZeroDivisionError" in out
    assert "refused unknown log level" in out
