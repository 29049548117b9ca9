"""A local Mosquitto broker: for the test suite, the benchmarks, the demo and `mpy-blox broker`.

Each instance gets its own folder with a generated `mosquitto.conf` (loopback
listener, persistence in the folder) that callers extend with extra lines:
authentication, ACLs, TLS listeners, keepalive limits.

`mpy-blox broker --password-file F` applies the recipe's ACL
(`examples/mosquitto/mpypi.acl`, the one file both engines read: `recipe_acl()`), lets
a client in under its user name as its client id, and refuses packets over
`--max-packet-size` (default `MAX_PACKET_SIZE`), on Mosquitto and amqtt alike.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mpy_blox_tools.child import end_process
from mpy_blox_tools.errors import MpyBloxError

INSTALL_HINT = (
    "Mosquitto is not installed: `sudo apt-get install mosquitto` (Debian, Ubuntu, WSL2) "
    "or `brew install mosquitto` (macOS)"
)


# The largest packet a broker takes: a package is one message today (docs/protocol.md),
# and the recipe's `max_packet_size` leaves room for a several-MiB wheel.
MAX_PACKET_SIZE = 16 * 2**20
# MQTT's largest packet: 1 byte of type, 4 of remaining length, 268435455 after them.
PACKET_SIZE_RANGE = (1024, 268435460)
ACL_NAME = "mpypi.acl"


def recipe_acl() -> Path:
    """examples/mosquitto/mpypi.acl: in the checkout, or the copy the tools' wheel carries."""
    package = Path(str(importlib.resources.files("mpy_blox_tools")))
    for candidate in (
        package / "device" / "examples" / "mosquitto" / ACL_NAME,
        package.parent / "examples" / "mosquitto" / ACL_NAME,
    ):
        if candidate.is_file():
            return candidate
    raise MpyBloxError(f"{ACL_NAME} is not installed with mpy_blox_tools: give --acl-file")


def find_mosquitto() -> str | None:
    """The mosquitto executable: on PATH, or where Debian and Homebrew put it off PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in (
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/opt/homebrew/sbin/mosquitto",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class LocalBroker:
    """A broker child process on `host`:`port`, its files in `directory`."""

    name = "broker"
    log_name = "broker.log"

    def __init__(self, directory: str | Path, port: int | None, host: str) -> None:
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port()
        self.log_file = self.dir / self.log_name
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 20) -> LocalBroker:
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise MpyBloxError(
                f"{self.name} did not start on port {self.port}: see {self.log_file}"
            )
        return self

    def stop(self) -> None:
        """Stop cleanly (SIGTERM: retained messages are saved)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Die at once, as a crashed broker does (SIGKILL: no save)."""
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.process:
            end_process(self.process, signum)
        self.process = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Mosquitto(LocalBroker):
    """Mosquitto on `host`:`port`, configured in `directory`."""

    name = "Mosquitto"
    log_name = "mosquitto.log"

    def __init__(
        self,
        directory: str | Path,
        *,
        port: int | None = None,
        extra_config: str = "",
        persistence: bool = True,
        allow_anonymous: bool = True,
        host: str = "127.0.0.1",
        log_to_stdout: bool = False,
    ) -> None:
        self.executable = find_mosquitto()
        if not self.executable:
            raise MpyBloxError(INSTALL_HINT)
        super().__init__(directory, port, host)
        self.config_file = self.dir / "mosquitto.conf"
        self.config_file.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    # Started as root, Mosquitto drops to user "mosquitto", who cannot
                    # write this folder; stay who we are instead.
                    "user root" if os.geteuid() == 0 else "",
                    f"allow_anonymous {'true' if allow_anonymous else 'false'}",
                    f"persistence {'true' if persistence else 'false'}",
                    f"persistence_location {self.dir}/",
                    "autosave_interval 1",
                    # Small packets (PUBACK, UNSUBACK) go out at once, not after
                    # the client's delayed ACK: 40 ms a publish otherwise.
                    "set_tcp_nodelay true",
                    "log_dest stdout" if log_to_stdout else f"log_dest file {self.log_file}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    "connection_messages true",
                    "log_timestamp true",
                    extra_config,
                    "",
                ]
            )
        )

    def exec_foreground(self) -> None:
        """Become the broker process (for `mpy-blox broker`): signals reach it directly."""
        os.execv(self.executable, [self.executable, "-c", str(self.config_file)])

    def command(self) -> list[str]:
        return [self.executable, "-c", str(self.config_file)]


ENGINES = ("auto", "mosquitto", "amqtt")
AMQTT_HINT = (
    "the embedded broker needs amqtt: `make setup`, `poetry install --extras broker` "
    "or `pip install 'mpy-blox-tools[broker]'`"
)


def amqtt_installed() -> bool:
    return importlib.util.find_spec("amqtt") is not None


class EmbeddedBroker(LocalBroker):
    """`mpy-blox broker --engine amqtt` as a child process, handled like Mosquitto."""

    name = "embedded amqtt"

    def __init__(
        self, directory: str | Path, *, port: int | None = None, max_packet_size: int | None = None
    ) -> None:
        super().__init__(directory, port, "127.0.0.1")
        self.max_packet_size = max_packet_size  # --max-packet-size; None: its default

    def command(self) -> list[str]:
        limit = ["--max-packet-size", str(self.max_packet_size)] if self.max_packet_size else []
        return [
            sys.executable, "-m", "mpy_blox_tools.cli", "broker", "--engine", "amqtt",
            "--port", str(self.port), "--bind", self.host, "--dir", str(self.dir), *limit,
        ]  # fmt: skip


def local_broker(directory: str | Path, engine: str = "auto") -> Mosquitto | EmbeddedBroker:
    """A loopback broker for the demo: Mosquitto, or the embedded one without it."""
    if choose_engine(engine) == "mosquitto":
        return Mosquitto(directory)
    return EmbeddedBroker(directory)


def choose_engine(engine: str) -> str:
    """`auto`: Mosquitto when it is installed, otherwise the embedded amqtt broker."""
    if engine == "mosquitto" and not find_mosquitto():
        raise MpyBloxError(INSTALL_HINT)
    if engine == "amqtt" and not amqtt_installed():
        raise MpyBloxError(AMQTT_HINT)
    if engine != "auto":
        return engine
    if find_mosquitto():
        return "mosquitto"
    if amqtt_installed():
        return "amqtt"
    raise MpyBloxError(f"no MQTT broker: {INSTALL_HINT}; or {AMQTT_HINT}")


def check_listen_address(bind: str, port: int) -> None:
    """Refuse, before anything starts, a port out of range or one something listens on."""
    if not 0 < port < 65536:
        raise MpyBloxError(f"--port {port}: a TCP port is 1 to 65535 (MQTT's is 1883)")
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise MpyBloxError(f"--bind {bind}: not an address here ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a broker binds
        try:
            probe.bind(address)
        except OSError as e:
            raise MpyBloxError(
                f"{bind}:{port} is taken ({e.strerror}): is a broker running there already? "
                "(another port: --port)"
            ) from None


def run_broker(
    directory: Path,
    port: int,
    bind: str,
    password_file: Path | None,
    engine: str = "auto",
    *,
    acl_file: Path | None = None,
    max_packet_size: int = MAX_PACKET_SIZE,
) -> int:
    """`mpy-blox broker`: a local broker in the foreground, retained messages kept in `directory`.

    Mosquitto when it is installed (or `engine="mosquitto"`), otherwise the embedded
    amqtt broker (`engine="amqtt"`); both read the same `mosquitto_passwd` file and,
    with it, the same ACL file (default: the recipe's, `recipe_acl()`).
    """
    from mpy_blox_tools import mosquitto_acl

    engine = choose_engine(engine)
    low, high = PACKET_SIZE_RANGE
    if not low <= max_packet_size <= high:
        raise MpyBloxError(
            f"--max-packet-size {max_packet_size}: from {low} to {high} bytes "
            f"(default {MAX_PACKET_SIZE})"
        )
    if acl_file and not password_file:
        raise MpyBloxError("--acl-file needs --password-file: an ACL is by user name")
    check_listen_address(bind, port)
    if password_file and not password_file.is_file():
        raise MpyBloxError(
            f"{password_file}: no such password file (make one with mosquitto_passwd -c FILE USER)"
        )
    if password_file:
        acl_file = (acl_file or recipe_acl()).resolve()
        mosquitto_acl.load(acl_file)  # a bad file is one line now, on either engine
    if bind not in ("127.0.0.1", "localhost", "::1") and password_file is None:
        print(
            "mpy-blox: warning: anyone on your network can publish code to your devices; "
            "use --password-file and see examples/mosquitto/",
            flush=True,
        )
    if engine == "amqtt":
        from mpy_blox_tools.embedded_broker import run_embedded_broker

        return run_embedded_broker(directory, port, bind, password_file, acl_file, max_packet_size)
    config = [f"max_packet_size {max_packet_size}"]
    if password_file:
        config += [
            f"password_file {password_file.resolve()}",
            f"acl_file {acl_file}",
            "use_username_as_clientid true",
        ]
    broker = Mosquitto(
        directory,
        port=port,
        host=bind,
        extra_config="\n".join(config),
        allow_anonymous=password_file is None,
        log_to_stdout=True,
    )
    print(
        f"mpy-blox: Mosquitto on {broker.url}, retained messages kept in {broker.dir}"
        + (f", ACL {acl_file}" if acl_file else ""),
        flush=True,
    )
    broker.exec_foreground()
    return 0  # not reached


RABBITMQ_HINT = (
    "RabbitMQ is not installed: `sudo apt-get install rabbitmq-server` (Debian, Ubuntu, "
    "WSL2; scripts/ensure-rabbitmq.sh) or `brew install rabbitmq` (macOS)"
)


def find_rabbitmq() -> str | None:
    """RabbitMQ's own start script (not Debian's wrapper in /usr/sbin, which runs the
    system node's files as user rabbitmq)."""
    for candidate in (
        "/usr/lib/rabbitmq/bin/rabbitmq-server",
        "/opt/homebrew/sbin/rabbitmq-server",
        "/usr/local/sbin/rabbitmq-server",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("rabbitmq-server")


class RabbitMQ(LocalBroker):
    """A single RabbitMQ node with its MQTT plugin on `host`:`port`, anonymous MQTT allowed.

    Everything the node writes (Mnesia, logs, the Erlang cookie, the enabled plugins
    file) is in `directory`; its node name is unique, its distribution port and its
    epmd (a private one, on a free port) are its own, so runs side by side, or a
    system RabbitMQ, do not clash. Started as root it runs as user `rabbitmq`, as
    Debian's wrapper would: its folder is made over to that user. The node takes
    seconds to start (measured in tests/tools/test_rabbitmq.py): share one.
    """

    name = "RabbitMQ"
    log_name = "rabbitmq.log"

    def __init__(
        self,
        directory: str | Path,
        *,
        port: int | None = None,
        epmd_port: int | None = None,
        cookie: str | None = None,
    ) -> None:
        """`epmd_port` and `cookie`: the same for nodes that are to be clustered (`join`)."""
        self.executable = find_rabbitmq()
        if not self.executable:
            raise MpyBloxError(RABBITMQ_HINT)
        super().__init__(directory, port, "127.0.0.1")
        self.epmd_port = epmd_port or free_port()
        self.dist_port = free_port()
        self.nodename = f"mpyblox-{os.getpid()}-{self.port}@localhost"
        self.user = "rabbitmq" if os.geteuid() == 0 else None
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "listeners.tcp = none",  # no AMQP: MQTT only
                    f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
                    "mqtt.allow_anonymous = true",  # as user guest, from loopback only
                    "log.file.level = info",
                    "log.console = false",
                    "",
                ]
            )
        )
        (self.dir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's
        for sub in ("mnesia", "log", "home"):
            (self.dir / sub).mkdir(exist_ok=True)
        if cookie:
            path = self.dir / "home" / ".erlang.cookie"
            path.write_text(cookie)
            path.chmod(0o400)  # Erlang refuses a cookie others can read
        if self.user:
            for path in [self.dir, *self.dir.rglob("*")]:
                shutil.chown(path, self.user, self.user)

    def environment(self) -> dict[str, str]:
        """The node's environment; `rabbitmqctl -n NODE` needs the same."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir / "home"),  # its .erlang.cookie
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
        }

    def command(self) -> list[str]:
        return [self.executable]

    def start(self, timeout: float = 60) -> RabbitMQ:
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.dir,
            env=self.environment(),
            user=self.user,
            group=self.user,
            extra_groups=[] if self.user else None,
        )
        log.close()
        # The MQTT listener opens last, once the plugin has started.
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise MpyBloxError(
                f"{self.name} did not start on port {self.port}: see {self.log_file} "
                f"and {self.dir / 'log'}"
            )
        return self

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """`rabbitmqctl -n NODE ARGS...` as the node's user; its output, or MpyBloxError."""
        ctl = Path(self.executable).with_name("rabbitmqctl")
        done = subprocess.run(
            [str(ctl), "-n", self.nodename, *args],
            env=self.environment(),
            cwd=self.dir,
            user=self.user,
            group=self.user,
            extra_groups=[] if self.user else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode:
            raise MpyBloxError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def join(self, other: RabbitMQ, timeout: float = 60) -> None:
        """Make this running node a member of `other`'s cluster (same epmd, same cookie)."""
        self.ctl("stop_app")
        self.ctl("join_cluster", other.nodename)
        self.ctl("start_app")
        if not wait_for_port(self.host, self.port, timeout):
            raise MpyBloxError(f"{self.name} {self.nodename}: no MQTT after joining a cluster")

    def _signal(self, signum: int) -> None:
        super()._signal(signum)
        # The node started a private epmd (its own port): end it too.
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run(
                [epmd, "-kill"],
                env={**self.environment(), "ERL_EPMD_PORT": str(self.epmd_port)},
                capture_output=True,
                timeout=10,
                check=False,
            )

    def log(self) -> str:
        logs = [self.log_file, *sorted((self.dir / "log").glob("*.log"))]
        return "".join(p.read_text(errors="replace") for p in logs if p.is_file())
