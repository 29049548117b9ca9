# `import logging` for code written for CPython or for upstream Mpy-BLOX:
# the part of the standard module such code uses, routed to the device log
# (mpy_blox.log: "I 12.345 name: message" on the console).
#
#   import logging
#   logging.basicConfig(level=logging.DEBUG)
#   log = logging.getLogger("pump")
#   log.info("flow %d l/h", flow)
#   log.exception("sensor failed")        # inside an `except`: with the traceback
#
# Shipped at the top of /lib by the framework wheel (mpy_blox_tools/build.py maps
# mpy_blox/compat/ to the wheel's root), so it is only loaded by code that
# imports it. Levels: a logger's own (setLevel), else the root's (basicConfig),
# else the device's `logging.level` setting. Without handlers a record goes to
# the device log; handlers (StreamHandler, or your own Handler.emit) replace it.
import sys
import time

from mpy_blox import log as _log

CRITICAL = const(50)
ERROR = const(40)
WARNING = const(30)
WARN = const(30)
INFO = const(20)
DEBUG = const(10)
NOTSET = const(0)

_NAMES = {CRITICAL: "CRITICAL", ERROR: "ERROR", WARNING: "WARNING", INFO: "INFO", DEBUG: "DEBUG"}
_loggers = {}


def getLevelName(level):
    name = _NAMES.get(level)
    if name is not None:
        return name
    for k, v in _NAMES.items():
        if v == level:
            return k
    return "Level %s" % level


def _level_of(level):
    if isinstance(level, str):
        for k, v in _NAMES.items():
            if v == level.upper():
                return k
        raise ValueError("unknown level: %r" % level)
    return level


class LogRecord:
    def __init__(self, name, level, msg, args, exc=None):
        self.name = name
        self.levelno = level
        self.levelname = getLevelName(level)
        self.msg = msg
        self.args = args
        self.exc = exc

    def getMessage(self):
        if not self.args:
            return str(self.msg)
        try:
            return self.msg % self.args
        except (TypeError, ValueError):
            return "%s %r" % (self.msg, self.args)  # a bad format must not kill the caller


class Formatter:
    def __init__(self, fmt=None, datefmt=None):
        self.fmt = fmt or "%(levelname)s:%(name)s:%(message)s"

    def format(self, record):
        record.message = record.getMessage()
        return self.fmt % {
            "name": record.name,
            "levelname": record.levelname,
            "levelno": record.levelno,
            "message": record.message,
            "asctime": "%d" % time.time(),
        }


class Handler:
    def __init__(self, level=NOTSET):
        self.level = level
        self.formatter = None

    def setLevel(self, level):
        self.level = _level_of(level)

    def setFormatter(self, formatter):
        self.formatter = formatter

    def format(self, record):
        if self.formatter is None:
            return record.getMessage()
        return self.formatter.format(record)

    def handle(self, record):
        if record.levelno >= self.level:
            self.emit(record)

    def emit(self, record):
        pass

    def close(self):
        pass


class StreamHandler(Handler):
    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stderr
        self.terminator = "\n"

    def emit(self, record):
        self.stream.write(self.format(record) + self.terminator)
        if record.exc is not None:
            sys.print_exception(record.exc, self.stream)


class Logger:
    def __init__(self, name, level=NOTSET):
        self.name = name
        self.level = level
        self.handlers = []
        self.disabled = False

    def setLevel(self, level):
        self.level = _level_of(level)

    def getEffectiveLevel(self):
        if self.level:
            return self.level
        if root.level:
            return root.level
        return _log.level()

    def isEnabledFor(self, level):
        return level >= self.getEffectiveLevel()

    def addHandler(self, handler):
        if handler not in self.handlers:
            self.handlers.append(handler)

    def removeHandler(self, handler):
        if handler in self.handlers:
            self.handlers.remove(handler)

    def hasHandlers(self):
        return bool(self.handlers or root.handlers)

    def log(self, level, msg, *args, exc_info=None):
        if self.disabled or not self.isEnabledFor(level):
            return
        exc = None
        if exc_info:
            exc = exc_info if isinstance(exc_info, BaseException) else _current()
        record = LogRecord(self.name, level, msg, args, exc)
        handlers = self.handlers or root.handlers
        if not handlers:
            _log.write(level, self.name, record.getMessage())
            if exc is not None:
                sys.print_exception(exc)
            return
        for h in handlers:
            h.handle(record)

    def debug(self, msg, *args, **kw):
        self.log(DEBUG, msg, *args, **kw)

    def info(self, msg, *args, **kw):
        self.log(INFO, msg, *args, **kw)

    def warning(self, msg, *args, **kw):
        self.log(WARNING, msg, *args, **kw)

    warn = warning

    def error(self, msg, *args, **kw):
        self.log(ERROR, msg, *args, **kw)

    def critical(self, msg, *args, **kw):
        self.log(CRITICAL, msg, *args, **kw)

    def exception(self, msg, *args, exc_info=True):
        self.log(ERROR, msg, *args, exc_info=exc_info)


def _current():
    # The exception being handled. MicroPython has sys.exc_info() only on
    # builds with it enabled: without it, log.exception("...", exc_info=e).
    try:
        return sys.exc_info()[1]
    except AttributeError:
        return None


root = Logger("root")


def getLogger(name=None):
    if not name or name == "root":
        return root
    logger = _loggers.get(name)
    if logger is None:
        logger = _loggers[name] = Logger(name)
    return logger


def basicConfig(level=None, format=None, stream=None, force=False, **kw):
    """Set the root level; a format or stream gives the root a StreamHandler."""
    if level is not None:
        root.setLevel(level)
    if force:
        root.handlers = []
    if (format is not None or stream is not None) and not root.handlers:
        h = StreamHandler(stream)
        h.setFormatter(Formatter(format))
        root.addHandler(h)


def disable(level=CRITICAL):
    root.setLevel(level + 1)


def log(level, msg, *args, **kw):
    root.log(level, msg, *args, **kw)


def debug(msg, *args, **kw):
    root.log(DEBUG, msg, *args, **kw)


def info(msg, *args, **kw):
    root.log(INFO, msg, *args, **kw)


def warning(msg, *args, **kw):
    root.log(WARNING, msg, *args, **kw)


warn = warning


def error(msg, *args, **kw):
    root.log(ERROR, msg, *args, **kw)


def critical(msg, *args, **kw):
    root.log(CRITICAL, msg, *args, **kw)


def exception(msg, *args, exc_info=True):
    root.log(ERROR, msg, *args, exc_info=exc_info)
