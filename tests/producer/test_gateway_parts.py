"""The gateway's pure parts: its configuration, request parsing, the reaper's topic names, and its
readiness while the reply reader is down (a fake consumer)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aiokafka.errors import KafkaConnectionError

from producer.cache import ModelContract
from producer.client import Client
from producer.config import ClientConfig
from producer.gateway import errors
from producer.gateway.app import api_error, create_app
from producer.gateway.config import GatewayConfig
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.openai_api import (
    TOKENS_READ_HEADER,
    TRUNCATED_HEADER,
    ApiError,
    Input,
    decode_embeddings_request,
    decode_seed_request,
    embedding_payload,
    input_texts,
    long_inputs,
    read_headers,
)
from producer.gateway.reaper import gateway_client_id, parse_gateway_topic
from producer.gateway.service import EmbeddingService
from producer.kafka import ServiceUnavailable
from producer.replies import ReplyRouter
from schemas import (
    Chunk,
    EmbedResult,
    decode_request,
    encode_result,
    encode_success_result,
    encode_vector_b64,
    result_headers,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_gateway_setting_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    for field in dataclasses.fields(GatewayConfig):
        assert f"`{field.metadata['env']}`" in readme, field.metadata["env"]


def test_config_from_environment_and_flags_keys_never_shown() -> None:
    parser = argparse.ArgumentParser()
    GatewayConfig.add_cli_arguments(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert "--api-keys" not in flags  # secrets come from the environment only
    env = {"EMBEDFLEET_GATEWAY_PORT": "9000", "EMBEDFLEET_GATEWAY_API_KEYS": "sk-a, sk-b ,"}
    config = GatewayConfig.from_args(parser.parse_args(["--port", "9001"]), env)
    assert config.port == 9001 and config.keys == ("sk-a", "sk-b")
    assert "sk-a" not in json.dumps(config.describe())
    with pytest.raises(ValueError, match="EMBEDFLEET_GATEWAY_PORT"):
        GatewayConfig.from_env({"EMBEDFLEET_GATEWAY_PORT": "0"})
    assert GatewayConfig().origins == () and GatewayConfig().host == "127.0.0.1"
    assert GatewayConfig().read_timeout_s == 10.0
    with pytest.raises(ValueError, match="READ_TIMEOUT_S"):
        GatewayConfig.from_env({"EMBEDFLEET_GATEWAY_READ_TIMEOUT_S": "0"})


def test_input_forms() -> None:
    assert input_texts("one", 2048) == ["one"]
    assert input_texts(["a", "b"], 2048) == ["a", "b"]
    cases: list[tuple[Input, str | None]] = [
        ([], None),
        ([[1, 2]], "unsupported_input"),
        ([1, 2], "unsupported_input"),
        (["a", 3], None),
    ]
    for bad, code in cases:
        with pytest.raises(ApiError) as raised:
            input_texts(bad, 2048)
        assert raised.value.status == 400 and (code is None or raised.value.code == code)
    with pytest.raises(ApiError, match="at most 2"):
        input_texts(["a", "b", "c"], 2)


def test_request_decoding_errors_name_the_field() -> None:
    request = decode_embeddings_request(b'{"model": "m", "input": "x", "user": "u", "extra": 1}')
    assert request.encoding_format == "float" and request.dimensions is None
    with pytest.raises(ApiError) as raised:
        decode_embeddings_request(b'{"model": "m", "input": "x", "dimensions": "wide"}')
    assert raised.value.param == "dimensions"
    with pytest.raises(ApiError) as raised:
        decode_embeddings_request(b"{nope")
    assert raised.value.code == "invalid_json"
    body = json.loads(raised.value.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_base64_is_little_endian_float32_as_openai_sends_it() -> None:
    vector = np.asarray([0.1, -0.25, 0.5, 1.0], dtype=np.float32)
    encoded = embedding_payload(vector, "base64")
    assert isinstance(encoded, str)
    assert np.array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), vector)
    assert embedding_payload(vector, "float") == [float(v) for v in vector]


def test_dimensions_only_the_declared_widths() -> None:
    contract = ModelContract(fingerprint="f", dim=384, dimensions=frozenset({128, 256}))
    assert EmbeddingService.width(contract, None) is None
    assert EmbeddingService.width(contract, 384) is None  # the model's own: the plain cache key
    assert EmbeddingService.width(contract, 128) == 128
    # The service reports; the edge answers (one mapping for every route).
    with pytest.raises(errors.UnsupportedDimensions) as reported:
        EmbeddingService.width(contract, 100)
    answer = api_error(reported.value)
    assert answer.status == 400 and "[128, 256, 384]" in answer.message


@pytest.mark.parametrize(
    ("error", "status", "kind", "code", "param", "retry_after"),
    [
        (errors.NoFleet("no fleet"), 503, "server_error", "service_unavailable", None, "2"),
        (errors.Overloaded("busy"), 429, "rate_limit_error", "rate_limit_exceeded", None, "1"),
        (errors.UnknownModel("which?"), 404, "invalid_request_error", "model_not_found", "model", None),
        (
            errors.UnsupportedDimensions("no"),
            400,
            "invalid_request_error",
            "invalid_value",
            "dimensions",
            None,
        ),
        (errors.DeadlineExceeded("late"), 504, "server_error", "timeout", None, None),
        (
            errors.RejectedText(0, "empty_text", "empty", 1),
            400,
            "invalid_request_error",
            "empty_text",
            "input",
            None,
        ),
        (
            errors.RejectedText(2, "inference_failed", "boom", 3),
            500,
            "server_error",
            "inference_failed",
            None,
            None,
        ),
        (errors.FleetFailed("the gateway failed: x"), 500, "server_error", None, None, None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, errors.GatewayError) else None,
)
def test_every_domain_error_has_one_http_answer(
    error: errors.GatewayError,
    status: int,
    kind: str,
    code: str | None,
    param: str | None,
    retry_after: str | None,
) -> None:
    answer = api_error(error)
    body = json.loads(answer.body())["error"]
    assert (answer.status, body["type"], body["code"], body["param"]) == (status, kind, code, param)
    assert body["message"] == str(error)
    assert answer.headers.get("Retry-After") == retry_after


def test_a_rejected_text_names_its_place_and_whose_fault() -> None:
    assert str(errors.RejectedText(0, "empty_text", "the text is empty", 1)) == "'input': the text is empty"
    failed = errors.RejectedText(2, "inference_failed", "boom", 3)
    assert not failed.by_request
    assert str(failed) == "'input[2]': the fleet failed on this text: inference_failed: boom"


def test_reaper_topic_names_carry_start_and_lease() -> None:
    client_id = gateway_client_id(2.5, now=1_700_000_000)
    prefix = "embed.results.gw-"
    topic = f"embed.results.{client_id}"
    assert parse_gateway_topic(topic, prefix) == (1_700_000_000.0, 3.0)
    assert parse_gateway_topic("embed.results.py-abc", prefix) is None
    assert parse_gateway_topic("embed.results.gw-12-x", prefix) is None
    assert parse_gateway_topic("embed.results", prefix) is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "m", "input": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
        b'{"model": "m", "input": "caf\xc3 \xff\xfe"}',
        b'{"model": "m", "input": ["fine", "a\xc3\x28b"]}',
        b'{"texts": ["a\xed\xa0\x80b"]}',  # a UTF-8-encoded surrogate
    ],
    ids=["deep-arrays", "deep-objects", "bad-utf8", "bad-utf8-in-list", "encoded-surrogate"],
)
def test_bodies_that_cannot_be_decoded_are_400_invalid_json(body: bytes) -> None:
    """msgspec raises RecursionError and UnicodeDecodeError past its own DecodeError: each was a
    500 with a traceback."""
    for decode in (decode_embeddings_request, decode_seed_request):
        try:
            decode(body)
        except ApiError as exc:
            assert exc.status == 400, exc.message
            if exc.code == "invalid_value":  # refused before decoding: more values than inputs
                assert "JSON values" in exc.message
            elif exc.code != "invalid_type":  # a body that decodes, with a wrong shape
                assert exc.code == "invalid_json" and "cannot be decoded" in exc.message
            error = json.loads(exc.body())["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
        else:
            pytest.fail(f"{decode.__name__} accepted {body[:40]!r}")


# --- readiness follows the reply reader ----------------------------------------------------------


class _Record:
    def __init__(self, value: bytes) -> None:
        self.value = value
        self.headers = result_headers()


class _FlakyConsumer:
    """getmany() fails (like a broker error, not a record) while ``broken``; else serves ``queue``."""

    def __init__(self) -> None:
        self.broken = False
        self.queue: asyncio.Queue[list[_Record]] = asyncio.Queue()
        self.calls = 0

    async def getmany(self, *partitions: Any, timeout_ms: int, max_records: int) -> dict[str, list[_Record]]:
        self.calls += 1
        if self.broken:
            await asyncio.sleep(0.01)
            raise KafkaConnectionError("the broker went away")
        try:
            return {"tp": await asyncio.wait_for(self.queue.get(), timeout_ms / 1000)}
        except TimeoutError:
            return {}

    def seek(self, tp: Any, offset: int) -> None:
        pass


def _service(
    consumer: _FlakyConsumer, config: GatewayConfig | None = None
) -> tuple[EmbeddingService, ReplyRouter, GatewayMetrics]:
    client_config = ClientConfig.from_env({}, model_fingerprint="f", model_dim=2, redis_url="")
    client = Client(client_config)
    router = ReplyRouter(consumer)
    client._router = router
    metrics = GatewayMetrics()
    service = EmbeddingService(client, config or GatewayConfig(), metrics)
    service._started = True  # connected: only the reply reader decides
    return service, router, metrics


async def _eventually(check: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def _result(request_id: str) -> _Record:
    return _Record(
        encode_result(EmbedResult.success(request_id=request_id, key="k", model="m", vector=[1.0, 2.0]))
    )


async def test_readiness_is_503_while_the_reply_reader_is_down_and_it_restarts() -> None:
    consumer = _FlakyConsumer()
    service, router, metrics = _service(consumer)
    router.start()
    try:
        assert await service.readiness() is None
        waiting = router.expect("before")
        consumer.broken = True
        # The waiting request fails at once (a 503 at the gateway), not at its deadline.
        with pytest.raises(ServiceUnavailable, match="the broker went away"):
            await asyncio.wait_for(waiting, 2)
        problem = await service.readiness()
        assert problem is not None and "reply reader" in problem
        with pytest.raises(ServiceUnavailable):
            router.expect("while-down")
        consumer.broken = False
        await _eventually(lambda: router.problem is None)
        assert await service.readiness() is None
        after = router.expect("after")
        await consumer.queue.put([_result("after")])
        assert (await asyncio.wait_for(after, 2)).vector_array().tolist() == [1.0, 2.0]
        assert router.restarts >= 1
        restarts = metrics.registry.get_sample_value("embedfleet_gateway_reply_reader_restarts_total")
        assert restarts is not None and restarts >= 1
    finally:
        await router.stop()


async def test_a_reply_reader_task_that_died_is_reported_once_and_restarted() -> None:
    consumer = _FlakyConsumer()
    service, router, _ = _service(consumer)
    router.start()
    try:
        await _eventually(lambda: consumer.calls > 0)
        assert router._task is not None
        task = router._task
        task.cancel()  # the task is gone, whatever killed it
        with contextlib.suppress(asyncio.CancelledError):
            await task
        problem = await service.readiness()
        assert problem is not None and "reply reader" in problem
        assert await service.readiness() is None  # started again
        mine = router.expect("mine")
        await consumer.queue.put([_result("mine")])
        assert (await asyncio.wait_for(mine, 2)).id == "mine"
    finally:
        await router.stop()
    assert router.problem is None and router.check() is None  # stopped on purpose: no restart


async def test_records_that_trip_the_reader_are_counted_not_fatal() -> None:
    consumer = _FlakyConsumer()
    service, router, metrics = _service(consumer)
    router.start()
    try:
        mine = router.expect("mine")
        odd = _Record(b"{}")
        odd.headers = [("content-type", b"\xff\xfe")]  # not a content type anyone knows
        await consumer.queue.put([_Record(b"\x00garbage"), odd, _Record(b"[" * 100_000), _result("mine")])
        assert (await asyncio.wait_for(mine, 2)).id == "mine"
        assert router.undecodable == 3 and await service.readiness() is None
        sample = metrics.registry.get_sample_value(
            "embedfleet_gateway_reply_records_skipped_total", {"reason": "undecodable"}
        )
        assert sample == 3
    finally:
        await router.stop()


# --- the HTTP edge over the service --------------------------------------------------------------


class _AnsweringProducer:
    """Answers each request it is sent on ``consumer``'s queue at once, as a worker would."""

    def __init__(self, consumer: _FlakyConsumer) -> None:
        self.consumer = consumer

    async def send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        request = decode_request(value, headers)
        result = EmbedResult.success(request_id=request.id, key=key.decode(), model="m", vector=[1.0, 2.0])
        await self.consumer.queue.put([_Record(encode_result(result))])
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked


async def test_a_request_reads_the_contract_once_and_the_edge_answers_what_the_service_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = _FlakyConsumer()
    service, router, metrics = _service(consumer, GatewayConfig(max_outstanding=2))
    service.client._producer = _AnsweringProducer(consumer)
    reads = 0
    read_contract = service.client.model_contract

    async def counted() -> ModelContract | None:
        nonlocal reads
        reads += 1
        return await read_contract()

    monkeypatch.setattr(service.client, "model_contract", counted)
    app = create_app(service, GatewayConfig(max_outstanding=2), metrics)
    router.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            ok = await http.post("/v1/embeddings", json={"model": service.model_name, "input": ["a", "b"]})
            assert ok.status_code == 200, ok.text
            assert [item["embedding"] for item in ok.json()["data"]] == [[1.0, 2.0], [1.0, 2.0]]
            assert reads == 1  # read once, passed along to the lookup and the wait for results
            seed = await http.post("/embed", json={"texts": ["c"]})
            assert seed.status_code == 200 and reads == 2
            busy = await http.post(
                "/v1/embeddings", json={"model": service.model_name, "input": ["x", "y", "z"]}
            )
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            unknown = await http.get("/v1/models/another")
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
            empty = await http.post("/v1/embeddings", json={"model": service.model_name, "input": ["a", ""]})
            assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"
            service._started = False
            down = await http.post("/embed", json={"texts": ["c"]})
            assert down.status_code == 503 and down.headers["retry-after"] == "2"
    finally:
        await router.stop()


# --- long inputs (issue 24): the extension fields and the headers that say what was read --------


def test_long_and_overlap_are_checked_with_openai_errors() -> None:
    assert long_inputs(None, None) == ("truncate", None)
    assert long_inputs("truncate", 64) == ("truncate", None)  # no windows: the overlap is dropped
    assert long_inputs("pool", None) == ("pool", None)
    assert long_inputs("chunks", 0) == ("chunks", 0)
    for long, overlap, param in (
        ("summarise", None, "long"),
        ("pool", 257, "overlap"),
        ("chunks", -1, "overlap"),
    ):
        with pytest.raises(ApiError) as raised:
            long_inputs(long, overlap)
        error = json.loads(raised.value.body())["error"]
        assert raised.value.status == 400 and error["param"] == param
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    request = decode_embeddings_request(b'{"model": "m", "input": "x", "long": "pool", "overlap": 16}')
    assert (request.long, request.overlap) == ("pool", 16)
    with pytest.raises(ApiError) as raised:
        decode_embeddings_request(b'{"model": "m", "input": "x", "long": 3}')
    assert raised.value.status == 400 and raised.value.param == "long"


def test_read_headers_only_what_is_known() -> None:
    assert read_headers([True, False, True], [256, 10, 256]) == {
        TRUNCATED_HEADER: "2",
        TOKENS_READ_HEADER: "522",
    }
    assert read_headers([False], [None]) == {TRUNCATED_HEADER: "0"}
    assert read_headers([None, False], [3, 4]) == {TOKENS_READ_HEADER: "7"}


class _LongAnsweringProducer(_AnsweringProducer):
    """Answers as a worker with a model of 8 tokens would: a text with "long" in it is cut
    (truncate), or read in two windows (pool, chunks); any other reads 3 tokens (one window)."""

    async def send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        request = decode_request(value, headers)
        self.requests.append((request, dict(headers)))
        long_text = "long" in request.text
        vector = np.asarray([0.6, 0.8], np.float32)
        windows, chunks = None, None
        one, other = np.asarray([1, 0], np.float32), np.asarray([0, 1], np.float32)
        if request.long != "truncate" and long_text:
            windows = 2
            chunks = [
                Chunk(start=0, end=5, tokens=8, vector_b64=encode_vector_b64(one)),
                Chunk(start=3, end=9, tokens=6, vector_b64=encode_vector_b64(other)),
            ]
        elif request.long != "truncate":
            windows = 1
            chunks = [Chunk(start=0, end=len(request.text), tokens=3, vector_b64=encode_vector_b64(one))]
        value = encode_success_result(
            request_id=request.id,
            key=key.decode(),
            model="m",
            vector=vector,
            encoding_format=request.encoding_format,
            truncated=long_text and request.long == "truncate",
            tokens=(14 if windows else 8) if long_text else 3,
            windows=windows,
            chunks=chunks if request.long == "chunks" else None,
        )
        await self.consumer.queue.put([_Record(value)])
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked

    def __init__(self, consumer: _FlakyConsumer) -> None:
        super().__init__(consumer)
        self.requests: list[tuple[Any, dict[str, bytes]]] = []


async def test_long_inputs_at_the_edge_chunks_and_the_read_headers() -> None:
    consumer = _FlakyConsumer()
    service, router, metrics = _service(consumer)
    producer = _LongAnsweringProducer(consumer)
    service.client._producer = producer
    app = create_app(service, GatewayConfig(), metrics)
    model = service.model_name
    router.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            cut = await http.post("/v1/embeddings", json={"model": model, "input": ["a long text", "short"]})
            assert cut.status_code == 200, cut.text
            assert cut.headers[TRUNCATED_HEADER] == "1" and cut.headers[TOKENS_READ_HEADER] == "11"
            assert all("chunks" not in item for item in cut.json()["data"])
            assert [r.long for r, _ in producer.requests] == ["truncate", "truncate"]
            assert {h["schema"] for _, h in producer.requests} == {b"1"}

            producer.requests.clear()
            pooled = await http.post(
                "/v1/embeddings",
                json={"model": model, "input": ["a long text"], "long": "pool", "overlap": 4},
            )
            assert pooled.status_code == 200, pooled.text
            assert pooled.headers[TRUNCATED_HEADER] == "0" and pooled.headers[TOKENS_READ_HEADER] == "14"
            assert "chunks" not in pooled.json()["data"][0]
            ((request, headers),) = producer.requests
            assert (request.long, request.overlap, headers["schema"]) == ("pool", 4, b"2")

            chunked = await http.post(
                "/v1/embeddings",
                json={"model": model, "input": ["a long text", "short"], "long": "chunks"},
            )
            assert chunked.status_code == 200, chunked.text
            first, second = chunked.json()["data"]
            assert first["chunks"] == [
                {"start": 0, "end": 5, "tokens": 8, "embedding": [1.0, 0.0]},
                {"start": 3, "end": 9, "tokens": 6, "embedding": [0.0, 1.0]},
            ]
            assert second["chunks"] == [{"start": 0, "end": 5, "tokens": 3, "embedding": [1.0, 0.0]}]
            b64 = await http.post(
                "/v1/embeddings",
                json={"model": model, "input": "a long text", "long": "chunks", "encoding_format": "base64"},
            )
            (item,) = b64.json()["data"]
            decoded = np.frombuffer(base64.b64decode(item["chunks"][1]["embedding"]), dtype="<f4")
            assert decoded.tolist() == [0.0, 1.0] and isinstance(item["embedding"], str)

            bad = await http.post("/v1/embeddings", json={"model": model, "input": "x", "long": "summarise"})
            assert bad.status_code == 400
            error = bad.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["type"], error["param"]) == ("invalid_request_error", "long")
            assert error["code"] == "invalid_value" and "'pool'" in error["message"]
            assert TRUNCATED_HEADER not in bad.headers

            seed = await http.post("/embed", json={"texts": ["a long text", "short"]})
            assert seed.status_code == 200, seed.text
            body = seed.json()
            assert body["truncated"] == [True, False] and body["tokens"] == [8, 3]
            assert seed.headers[TRUNCATED_HEADER] == "1" and seed.headers[TOKENS_READ_HEADER] == "11"
    finally:
        await router.stop()
