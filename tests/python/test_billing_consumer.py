"""End-to-end, distributed mode: a billing system in another language simply subscribes to the
ledger topic.

The module starts `fake-upstream ollama`, `nself claw projector` and `nself claw serve` on real
Kafka and PostgreSQL (a fresh topic `claw.test.<hex>` and a fresh database `claw_test_<hex>`),
sends chat completions (one streamed) and embeddings through OpenAI's official SDK, creates,
uses and revokes an extra key with the CLI. Then a `confluent_kafka.Consumer` in its own
consumer group (`billing-<uuid>`, not the projector's `<topic>.projector`) reads the topic from
the start, as a billing system would, and checks every record against the ledger's JSON Schemas
(`schemas/ledger/v1/`), the CloudEvents 1.0 Kafka binary-mode headers, the record key, the
request ids the client saw, the absence of secrets, and that its own per-key token sums equal
the gateway's `usage --json`.

Needs the services (`CLAW_KAFKA_BROKERS`, `CLAW_DATABASE_URL`); it fails without them:

    scripts/services.sh up
    eval "$(scripts/services.sh env)"
    cargo build -p nself -p claw-tests
    $(scripts/python-env.sh | tail -1) -m pytest -q tests/python/test_billing_consumer.py

Leaves its topic and database behind, like the Rust suites: `scripts/services.sh clean-tests`.
"""

import hashlib
import json
import re
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime
from types import SimpleNamespace

import openai
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from conftest import REPO, Gateway, Stack, distributed_env, poll, require_binaries, services

REPLY = "Hello from the fake Ollama, via the billing test."
HELLO = [{"role": "user", "content": "Hello"}]
SCHEMAS = REPO / "schemas" / "ledger" / "v1"
CONSUME_DEADLINE_S = 30.0
SECRET_PREFIX = "sk-nself-"
# A key's display prefix (`key_prefix`, the secret's first 12 characters) is the only place a
# `sk-nself-` may appear; anything longer would be (part of) a secret.
SECRET_LIKE = re.compile(rb"sk-nself-[A-Za-z0-9]{4,}")
CE_HEADERS = ("event_type", "schema_version", "ce_specversion", "ce_id", "ce_source", "ce_type",
              "ce_time", "ce_subject", "content-type")


# ---------------------------------------------------------------------------------------------
# the services and the stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    distributed = distributed_env()
    brokers = distributed["CLAW_KAFKA_BROKERS"]
    require_binaries()
    procs = Stack(tmp_path_factory.mktemp("billing"))
    try:
        ollama = procs.fake("ollama", "--reply", REPLY)
        # The projector first: the gateway's key creation waits for the projection.
        procs.projector("projector", distributed)
        gw = procs.gateway("gateway", {**distributed, "OLLAMA_BASE_URL": ollama.url}, "billing")
        yield SimpleNamespace(gw=gw, brokers=brokers, topic=distributed["CLAW_KAFKA_TOPIC"],
                              tmp=procs.tmp)
    finally:
        procs.close()


# ---------------------------------------------------------------------------------------------
# the traffic, as a client sees it


def billed_call(calls: list, key_id: str, raw, usage) -> None:
    """Records one successful call: its `x-request-id` and the usage the client was told."""
    request_id = raw.headers.get("x-request-id")
    assert request_id, dict(raw.headers)
    calls.append(SimpleNamespace(request_id=request_id, key_id=key_id,
                                 prompt_tokens=usage.prompt_tokens,
                                 total_tokens=usage.total_tokens))


def chat(client, calls: list, key_id: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=HELLO)
    r = raw.parse()
    assert r.choices[0].message.content == REPLY
    assert r.usage.total_tokens > 0
    billed_call(calls, key_id, raw, r.usage)


@pytest.fixture(scope="module")
def traffic(stack):
    """Chat completions (one streamed, with usage) and embeddings with the stack's key; an
    extra key created, used once and revoked with the CLI."""
    gw: Gateway = stack.gw
    calls = []
    client = gw.client(max_retries=0)  # one request id per call, never a silent retry
    for _ in range(3):
        chat(client, calls, gw.key_id)

    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    billed_call(calls, gw.key_id, raw, chunks[-1].usage)

    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["bill", "me"],
    )
    r = raw.parse()
    assert [d.index for d in r.data] == [0, 1]
    assert r.usage.total_tokens > 0
    billed_call(calls, gw.key_id, raw, r.usage)

    extra_name = f"billing-extra-{uuid.uuid4().hex[:8]}"
    extra = json.loads(gw.cli("keys", "create", "--name", extra_name, "--json"))
    assert extra["key"].startswith(SECRET_PREFIX)
    extra_client = Gateway(gw.url, extra["key"], extra["id"]).client(max_retries=0)
    chat(extra_client, calls, extra["id"])
    gw.cli("keys", "revoke", extra["id"], "--reason", "billing test")

    # Revoking waits for the projection: the key is refused at once, and billed no more.
    with pytest.raises(openai.AuthenticationError):
        extra_client.chat.completions.create(model="auto", messages=HELLO)
    return SimpleNamespace(calls=calls, extra=extra, extra_name=extra_name,
                           secrets=[gw.key, extra["key"]])


# ---------------------------------------------------------------------------------------------
# the billing system


def schema_validators() -> tuple[Draft202012Validator, dict[str, Draft202012Validator]]:
    """The envelope's validator and one per event type, from `schemas/ledger/v1/`. All files
    are in one registry under their file URIs (or their `$id`s), so a `$ref` from one file to
    another by name resolves."""
    schemas = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        schema.setdefault("$id", path.as_uri())
        schemas[path.stem] = schema
    registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
    )

    def validator(schema):
        return Draft202012Validator(schema, registry=registry, format_checker=FormatChecker())

    envelope = validator(schemas.pop("envelope"))
    return envelope, {name: validator(schema) for name, schema in schemas.items()}


def caught_up(consumer: Consumer, assignment: list[TopicPartition]) -> bool:
    """Whether this consumer has read every assigned partition to its high watermark."""
    if not assignment:
        return False
    for tp, pos in zip(assignment, consumer.position(assignment)):
        low, high = consumer.get_watermark_offsets(tp, timeout=5)
        if high > low and pos.offset < high:  # a negative offset: nothing read there yet
            return False
    return True


@pytest.fixture(scope="module")
def ledger(stack, traffic):
    """Every record of the topic, read by a consumer group of its own until every expected
    `RequestServed` and the extra key's `KeyRevoked` were seen, then to the high watermarks."""
    group = f"billing-{uuid.uuid4()}"
    assert group != f"{stack.topic}.projector"
    consumer = Consumer({
        "bootstrap.servers": stack.brokers,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,  # commit once billed, below
        "client.id": "claw-billing-test",
    })
    try:
        consumer.subscribe([stack.topic])
        expected = {c.request_id for c in traffic.calls}
        seen, revoked, records, errors = set(), False, [], []
        deadline = time.monotonic() + CONSUME_DEADLINE_S
        while True:
            done = expected <= seen and revoked
            if done and caught_up(consumer, consumer.assignment()):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"within {CONSUME_DEADLINE_S}s the billing consumer saw "
                            f"{len(records)} records: missing RequestServed "
                            f"{sorted(expected - seen)}, extra key revoked: {revoked}, "
                            f"errors {errors}")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    errors.append(str(msg.error()))
                continue
            records.append(msg)
            value = json.loads(msg.value())
            if value.get("event_type") == "RequestServed":
                seen.add(value["data"]["request_id"])
            elif (value.get("event_type") == "KeyRevoked"
                  and value.get("key_id") == traffic.extra["id"]):
                revoked = True

        # Billed: the group's offsets move past what it read, independently of the projector.
        consumer.commit(asynchronous=False)
        last = {}
        for msg in records:
            last[(msg.topic(), msg.partition())] = max(last.get((msg.topic(), msg.partition()),
                                                                -1), msg.offset())
        committed = consumer.committed([TopicPartition(t, p) for t, p in last], timeout=10)
        assert {(tp.topic, tp.partition): tp.offset for tp in committed} == \
               {tp: offset + 1 for tp, offset in last.items()}
        partitions = len(consumer.list_topics(stack.topic, timeout=10)
                         .topics[stack.topic].partitions)
        yield SimpleNamespace(group=group, records=records, partitions=partitions,
                              values=[json.loads(m.value()) for m in records])
    finally:
        consumer.close()


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's default partitioner's hash), as a signed 32-bit int."""
    m, r, mask = 0x5BD1E995, 24, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    tail = data[length - length % 4:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def served(ledger) -> list[dict]:
    """The `RequestServed` envelopes, once each by `event_id` (a retried append may repeat a
    record; consumers drop the duplicates by `event_id`)."""
    by_id = {}
    for value in ledger.values:
        if value["event_type"] == "RequestServed":
            by_id.setdefault(value["event_id"], value)
    return list(by_id.values())


# ---------------------------------------------------------------------------------------------
# what the billing system checks


def test_the_services_are_configured():
    """A plain failure (not only the fixtures' setup errors) when the services are missing."""
    services()


def test_every_record_validates_against_the_ledger_schemas(ledger):
    envelope, data_validators = schema_validators()
    assert set(data_validators) == {"KeyCreated", "KeyRevoked", "RequestServed", "TierFallback"}
    for value in ledger.values:
        errors = [e.message for e in envelope.iter_errors(value)]
        assert not errors, f"{value}: {errors}"
        event_type = value["event_type"]
        assert event_type in data_validators, value
        errors = [e.message for e in data_validators[event_type].iter_errors(value["data"])]
        assert not errors, f"{value}: {errors}"
        # The formats the validator may not check without extra packages.
        assert uuid.UUID(value["event_id"]).version == 7, value
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value["occurred_at"]), value
        datetime.fromisoformat(value["occurred_at"])
        assert value["schema_version"] == 1, value
    types = Counter(v["event_type"] for v in ledger.values)
    assert types["KeyCreated"] == 2 and types["KeyRevoked"] == 1, types


def test_headers_are_cloudevents_in_kafka_binary_mode(ledger):
    for msg, value in zip(ledger.records, ledger.values):
        pairs = [(k, v.decode() if v is not None else None) for k, v in (msg.headers() or [])]
        names = [k for k, _ in pairs]
        for name in CE_HEADERS:
            assert names.count(name) == 1, f"header {name!r} in {pairs}"
        h = dict(pairs)
        assert h["event_type"] == value["event_type"], pairs
        assert h["schema_version"] == str(value["schema_version"]), pairs
        assert h["ce_specversion"] == "1.0", pairs
        assert h["ce_id"] == value["event_id"], pairs
        assert h["ce_source"] == f"urn:nself:claw:{value['producer']}", pairs
        assert h["ce_type"] == \
            f"org.nself.claw.{value['event_type']}.v{value['schema_version']}", pairs
        assert h["ce_time"] == value["occurred_at"], pairs
        assert h["ce_subject"] == value["key_id"], pairs
        assert h["content-type"] == "application/json", pairs


def test_record_key_is_the_key_id(ledger):
    partitions = defaultdict(set)
    for msg, value in zip(ledger.records, ledger.values):
        assert msg.key() == value["key_id"].encode(), (msg.key(), value)
        partitions[value["key_id"]].add(msg.partition())
        # The Java client's partitioner, so producers in any language agree on the partition.
        assert msg.partition() == (murmur2(msg.key()) & 0x7FFFFFFF) % ledger.partitions, value
    # So one key's events share a partition, in order.
    assert all(len(p) == 1 for p in partitions.values()), dict(partitions)


def test_request_served_matches_what_the_client_saw(ledger, traffic):
    events = served(ledger)
    request_ids = Counter(e["data"]["request_id"] for e in events)
    assert request_ids == Counter(c.request_id for c in traffic.calls), request_ids
    assert max(request_ids.values()) == 1, request_ids
    by_request = {e["data"]["request_id"]: e for e in events}
    for call in traffic.calls:
        event = by_request[call.request_id]
        assert event["key_id"] == call.key_id, event
        assert event["data"]["status"] == 200, event
        # The client is billed for the tokens it was told about.
        assert event["data"]["total_tokens"] == call.total_tokens, (event, call)
        assert event["data"]["prompt_tokens"] == call.prompt_tokens, (event, call)
        assert event["data"]["total_tokens"] == \
            event["data"]["prompt_tokens"] + event["data"]["completion_tokens"], event
    kinds = Counter((e["data"]["endpoint"], e["data"]["stream"]) for e in events)
    assert kinds == {("chat.completions", False): 4, ("chat.completions", True): 1,
                     ("embeddings", False): 1}, kinds


def test_key_lifecycle_is_on_the_ledger_without_secrets(ledger, traffic, stack):
    extra = traffic.extra
    mine = [(msg, v) for msg, v in zip(ledger.records, ledger.values)
            if v["key_id"] == extra["id"]]
    order = [v["event_type"] for _, v in mine]
    assert order == ["KeyCreated", "RequestServed", "KeyRevoked"], order  # partition order
    created, revoked = mine[0][1]["data"], mine[-1][1]["data"]
    secret = extra["key"]
    assert created == {
        "name": traffic.extra_name,
        "key_prefix": secret[:12],
        "key_hash": "sha256:" + hashlib.sha256(secret.encode()).hexdigest(),
        "rpm_limit": 60,
        "admin_allowed": False,
    }, created
    assert revoked == {"reason": "billing test"}, revoked
    assert any(v["event_type"] == "KeyCreated" and v["key_id"] == stack.gw.key_id
               for v in ledger.values)

    for msg, value in zip(ledger.records, ledger.values):
        raw = b"".join([msg.key() or b"", msg.value() or b""] +
                       [k.encode() + (v or b"") for k, v in (msg.headers() or [])])
        for s in traffic.secrets:
            assert s.encode() not in raw, f"a secret in {value}"
        assert not SECRET_LIKE.search(raw), f"a secret in {value}"
        # `sk-nself-` only as a KeyCreated's 12-character display prefix.
        allowed = value["data"]["key_prefix"] if value["event_type"] == "KeyCreated" else None
        for k, v in (msg.headers() or []):
            assert SECRET_PREFIX.encode() not in k.encode() + (v or b""), (k, v)
        assert SECRET_PREFIX.encode() not in (msg.key() or b""), msg.key()
        assert raw.count(SECRET_PREFIX.encode()) == (1 if allowed else 0), value
        if allowed:
            assert len(allowed) == 12 and allowed.startswith(SECRET_PREFIX), value


def test_billing_sums_equal_the_gateways_usage(ledger, stack):
    gw = stack.gw
    bill = defaultdict(Counter)
    for e in served(ledger):
        bill[e["key_id"]].update({k: e["data"][k] for k in
                                  ("prompt_tokens", "completion_tokens", "total_tokens")})
        bill[e["key_id"]]["requests"] += 1
    assert len(bill) == 2, dict(bill)
    last = {}

    def usage_caught_up():
        doc = json.loads(gw.cli("usage", "--json"))
        last["doc"] = doc
        keys = {k["key_id"]: k for k in doc["keys"]}
        if all(keys.get(key_id, {}).get("requests") == b["requests"]
               for key_id, b in bill.items()):
            return keys
        return None

    try:
        keys = poll(usage_caught_up, "`usage --json` counting every RequestServed")
    except pytest.fail.Exception:
        pytest.fail(f"usage never caught up with the ledger: billed {dict(bill)}, "
                    f"usage {last.get('doc')}")
    for key_id, b in bill.items():
        for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            assert keys[key_id][field] == b[field], (key_id, field, keys[key_id], b)
    totals = last["doc"]["totals"]
    assert totals["total_tokens"] == sum(b["total_tokens"] for b in bill.values()), totals
    assert totals["requests"] == sum(b["requests"] for b in bill.values()), totals
