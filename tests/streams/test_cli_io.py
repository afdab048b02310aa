"""``tapd produce`` / ``tapd consume`` on both transports: bad input ends up in
the dead-letter topic with a reason naming the field, good input all arrives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from daemon.cli import app
from daemon.config import TransportSettings
from streams.deadletter import original
from streams.factory import open_transport
from streams.schemas import MAX_MESSAGE_BYTES, DeadLetter, Trace, decode
from streams.transport import TopicPartition


def _tapd(args: list[str], env: dict[str, str]) -> Any:
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    return result


def _malformed(trace: dict[str, Any], i: int) -> tuple[bytes, str, str]:
    """The i-th bad message of a cycle of kinds: (raw, field, reason fragment)."""
    t = {**trace, "trace_id": f"bad-{i}", "attempts": [dict(a) for a in trace["attempts"]]}
    kind = i % 11
    if kind == 0:
        return json.dumps(t).encode()[:-7], "$", "not valid JSON"
    if kind == 1:
        t["ts"] = "noon"
        return json.dumps(t).encode(), "ts", "valid number"
    if kind == 2:
        t["attempts"][1]["n_tokens"] = "five"
        return json.dumps(t).encode(), "attempts[1].n_tokens", "valid integer"
    if kind == 3:
        del t["prompt"]
        return json.dumps(t).encode(), "prompt", "required"
    if kind == 4:
        del t["schema"]
        return json.dumps(t).encode(), "schema", "missing"
    if kind == 5:
        t["attempts"][0]["reward"] = 0.25
        return json.dumps(t).encode().replace(b"0.25", b"NaN"), "attempts[0].reward", "finite"
    if kind == 6:
        t["schema"] = "tapd.trace/7"
        return json.dumps(t).encode(), "schema", "unknown version '7'"
    if kind == 7:
        return json.dumps(t).encode().replace(b"What", b"Wh\xffat"), "$", "UTF-8"
    if kind == 8:
        t["tags"] = 3
        return json.dumps(t).encode(), "tags", "should be an object"
    if kind == 9 and i % 100 == 9:  # a few oversize ones (they are big)
        t["reference"] = "r" * MAX_MESSAGE_BYTES
        return json.dumps(t).encode(), "$", "-byte limit"
    t["attempts"][0]["reward"] = 0.25
    return json.dumps(t).encode().replace(b"0.25", b"-Infinity"), "attempts[0].reward", "finite"


def _read_all(settings: TransportSettings, topic: str, n: int) -> list[bytes]:
    transport = open_transport(settings)
    consumer = transport.consumer([topic], "checker")
    got: list[bytes] = []
    for _ in range(300):
        if len(got) >= n:
            break
        got += [r.value for r in consumer.poll(0.2, 1_000)]
    consumer.close()
    transport.close()
    return got


def test_a_thousand_malformed_messages_go_to_the_dlq_and_the_rest_arrives(
    transport_settings: TransportSettings,
    transport_env: dict[str, str],
    topic: str,
    trace_dict: dict[str, Any],
) -> None:
    bad: dict[bytes, tuple[str, str]] = {}
    good: list[bytes] = []
    transport = open_transport(transport_settings)
    producer = transport.producer()
    for i in range(1_000):
        raw, field, fragment = _malformed(trace_dict, i)
        bad[raw] = (field, fragment)
        producer.send(topic, raw)
        if i % 10 == 9:  # valid traces interleaved, the last one after the last bad one
            line = json.dumps({**trace_dict, "trace_id": f"good-{i}"}).encode()
            good.append(line)
            producer.send(topic, line)
    producer.flush()
    producer.close()
    transport.close()

    dlq = f"{topic}.dlq"
    env = {**transport_env, "TAPD_TOPICS__DLQ": dlq}
    result = _tapd(
        [
            "consume",
            topic,
            "--group",
            "scorer",
            "--from-beginning",
            "--validate",
            "trace",
            "--max",
            "1100",
            "--timeout",
            "20",
        ],
        env,
    )
    assert result.exit_code == 0, result.output
    # the consumer kept going: every valid trace came out, in full
    out = [line.encode() for line in result.stdout.splitlines()]
    assert sorted(out) == sorted(good)
    assert json.loads(result.stderr.splitlines()[-1]) == {
        "topic": topic,
        "consumed": 100,
        "rejected": 1_000,
    }

    letters = [decode(v, DeadLetter) for v in _read_all(transport_settings, dlq, 1_000)]
    assert len(letters) == 1_000
    seen = set()
    for letter in letters:
        raw = original(letter)
        if raw not in bad:  # oversize: the letter keeps the first bytes only
            [raw] = [b for b in bad if b.startswith(raw) and len(b) > MAX_MESSAGE_BYTES]
        field, fragment = bad[raw]
        assert letter.field == field, (raw[:80], letter.reason)
        assert fragment in letter.reason
        assert (letter.stage, letter.source_topic) == ("consume", topic)
        seen.add(raw)
    assert len(seen) == 1_000


def test_produce_validates_each_line(
    transport_settings: TransportSettings,
    transport_env: dict[str, str],
    topic: str,
    tmp_path: Path,
    trace_dict: dict[str, Any],
    dispatch_dict: dict[str, Any],
    lift_dict: dict[str, Any],
) -> None:
    no_subject = {k: v for k, v in trace_dict.items() if k != "subject"}
    lines = [
        json.dumps(trace_dict),
        json.dumps(dispatch_dict),
        "",
        json.dumps(no_subject),
        json.dumps(lift_dict),
        "{oops",
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    dlq = f"{topic}.dlq"
    env = {**transport_env, "TAPD_TOPICS__DLQ": dlq}

    result = _tapd(["produce", str(path), "--topic", topic], env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"topic": topic, "sent": 3, "rejected": 2, "dlq": dlq}
    assert "line 4: subject: Field required" in result.stderr
    assert "line 6: $: not valid JSON" in result.stderr

    sent = _read_all(transport_settings, topic, 3)
    assert sorted(sent) == sorted(lines[i].encode() for i in (0, 1, 4))
    letters = [decode(v, DeadLetter) for v in _read_all(transport_settings, dlq, 2)]
    assert sorted((x.offset, x.field, x.stage) for x in letters) == [
        (4, "subject", "produce"),
        (6, "$", "produce"),
    ]
    assert {original(x) for x in letters} == {lines[3].encode(), b"{oops"}


def _embedded_env(tmp_path: Path) -> dict[str, str]:
    return {
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(tmp_path / "log.sqlite"),
    }


def test_produce_no_validate_sends_raw(tmp_path: Path, topic: str) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b"{not json}\n\xff\xfe\n")
    env = _embedded_env(tmp_path)
    result = _tapd(["produce", str(path), "--topic", topic, "--no-validate"], env)
    assert json.loads(result.stdout)["sent"] == 2
    result = _tapd(["consume", topic, "--from-beginning", "--timeout", "0.5"], env)
    assert result.stdout_bytes == b"{not json}\n\xff\xfe\n"


def test_produce_keys_traces_by_slice_key(
    tmp_path: Path, topic: str, trace_dict: dict[str, Any]
) -> None:
    """The producer contract: every trace of a slice in one partition, whatever its id."""
    from daemon.config import CohortingSettings
    from daemon.core.cohorting import slice_key_of, validate_slice_key
    from streams.embedded import EmbeddedTransport

    ops = ["add", "sub", "mul", "div", "mod", "pow"]
    lines = [
        json.dumps({**trace_dict, "trace_id": f"t{i}", "tags": {"operation": ops[i % 6]}})
        for i in range(60)
    ]
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join(lines) + "\n")
    env = {**_embedded_env(tmp_path), "TAPD_TRANSPORT__EMBEDDED_PARTITIONS": "4"}
    result = _tapd(["produce", str(path), "--topic", topic], env)
    assert json.loads(result.stdout)["sent"] == 60
    transport = EmbeddedTransport(tmp_path / "log.sqlite", partitions=4)
    fields = validate_slice_key(CohortingSettings().slice_key)
    partitions_of: dict[str, set[int]] = {}
    for p in range(transport.partitions(topic)):
        for r in transport.read(TopicPartition(topic, p), 0, 1_000):
            key = slice_key_of(decode(r.value, Trace), fields)
            assert r.key == key.encode()
            partitions_of.setdefault(key, set()).add(p)
    transport.close()
    assert len(partitions_of) == 6 and all(len(ps) == 1 for ps in partitions_of.values())
    assert len(set().union(*partitions_of.values())) > 1  # slices spread over partitions


def test_consume_group_commits_and_resumes(
    tmp_path: Path, topic: str, trace_dict: dict[str, Any]
) -> None:
    env = _embedded_env(tmp_path)
    path = tmp_path / "traces.jsonl"
    path.write_text(
        "\n".join(json.dumps({**trace_dict, "trace_id": f"t{i}"}) for i in range(5)) + "\n"
    )
    assert _tapd(["produce", str(path), "--topic", topic], env).exit_code == 0
    first = _tapd(["consume", topic, "-g", "ops", "--from-beginning", "--max", "3"], env)
    rest = _tapd(["consume", topic, "-g", "ops", "--from-beginning", "--timeout", "0.5"], env)
    ids = [decode(line, Trace).trace_id for line in (first.stdout + rest.stdout).splitlines()]
    assert len(first.stdout.splitlines()) == 3
    assert sorted(ids) == [f"t{i}" for i in range(5)]  # each exactly once
    # without a group nothing is committed: reading again from the start sees all
    anon = _tapd(["consume", topic, "--from-beginning", "--timeout", "0.5"], env)
    assert len(anon.stdout.splitlines()) == 5


def test_config_file_and_env_override(tmp_path: Path, topic: str) -> None:
    cfg = tmp_path / "tapd.yaml"
    cfg.write_text(
        f"transport:\n  kind: embedded\n  embedded_path: {tmp_path / 'from-file.sqlite'}\n"
    )
    src = tmp_path / "one.jsonl"
    src.write_text('{"x": 1}\n')
    result = _tapd(["--config", str(cfg), "produce", str(src), "-t", topic, "--no-validate"], {})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-file.sqlite").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("transport:\n  kind: carrier-pigeon\n")
    result = _tapd(["--config", str(bad), "produce", str(src), "-t", topic], {})
    assert result.exit_code == 2
    assert "bad configuration" in result.stderr and "transport.kind" in result.stderr


def test_consume_rejects_an_unknown_schema_name(tmp_path: Path, topic: str) -> None:
    result = _tapd(["consume", topic, "--validate", "trcae"], _embedded_env(tmp_path))
    assert result.exit_code == 2
    assert "--validate must be one of ['dispatch', 'lift', 'trace']" in result.stderr
