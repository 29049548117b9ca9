# A small logger for the device: MicroPython has no `logging` built in.
#
#   from mpy_blox.log import get_logger
#   log = get_logger("mqtt")
#   log.info("connected to %s:%d", host, port)
#   log.exception("handler failed", exc)
#
# Lines look like "I 12.345 mqtt: connected to ..." (level, seconds since boot,
# logger name). Formatting happens only when the level is enabled, so a debug
# call costs one comparison in production.
import sys
import time

DEBUG = const(10)
INFO = const(20)
WARNING = const(30)
ERROR = const(40)
CRITICAL = const(50)

_NAMES = {"DEBUG": DEBUG, "INFO": INFO, "WARNING": WARNING, "WARN": WARNING, "ERROR": ERROR}
LETTERS = {DEBUG: "D", INFO: "I", WARNING: "W", ERROR: "E", CRITICAL: "C"}

_level = INFO
_start_ms = time.ticks_ms()
_loggers = {}
# Called with (level, name, msg) after each line is printed: the remote log
# (mpy_blox/remotelog.py) when logging.remote is on.
sink = None


def set_level(level):
    """Set the global level from a number or a name ("DEBUG", "info", ...)."""
    global _level
    if isinstance(level, str):
        level = _NAMES.get(level.upper())
        if level is None:
            raise ValueError("unknown log level")
    _level = level


def level():
    """The global level (a number)."""
    return _level


def write(level, name, msg):
    """One formatted line, whatever the level (the `logging` module decides its own)."""
    t = time.ticks_diff(time.ticks_ms(), _start_ms)
    print("%s %d.%03d %s: %s" % (LETTERS.get(level, "?"), t // 1000, t % 1000, name, msg))
    if sink is not None:
        sink(level, t, name, msg)


class Logger:
    def __init__(self, name):
        self.name = name

    def log(self, level, msg, *args):
        if level < _level:
            return
        if args:
            try:
                msg = msg % args
            except (TypeError, ValueError):
                msg = "%s %r" % (msg, args)  # a bad format must not kill the caller
        write(level, self.name, msg)

    def debug(self, msg, *args):
        self.log(DEBUG, msg, *args)

    def info(self, msg, *args):
        self.log(INFO, msg, *args)

    def warning(self, msg, *args):
        self.log(WARNING, msg, *args)

    def error(self, msg, *args):
        self.log(ERROR, msg, *args)

    def exception(self, msg, exc, *args):
        """Log at ERROR with the exception's traceback."""
        self.log(ERROR, msg, *args)
        if ERROR >= _level:
            sys.print_exception(exc)


def get_logger(name):
    logger = _loggers.get(name)
    if logger is None:
        logger = _loggers[name] = Logger(name)
    return logger
