"""A gateway that is never open by accident (issue 25), without services: no start on a reachable
address without keys, a Bearer challenge on 401, a cap on requests handled at once, bodies counted
before they are decoded, readiness in words, configurations whose repr hides their secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import tracemalloc
from typing import Any

import httpx
import pytest

from producer.config import ClientConfig
from producer.gateway import GatewayConfig
from producer.gateway.app import create_app
from producer.gateway.openai_api import ApiError, decode_embeddings_request, decode_seed_request
from tests.producer.test_gateway_parts import _AnsweringProducer, _FlakyConsumer, _service
from worker.commands import gateway as gateway_command
from worker.config import WorkerConfig


@pytest.mark.parametrize(
    ("host", "keys", "anonymous", "refused"),
    [
        ("0.0.0.0", "", False, True),
        ("10.1.2.3", "", False, True),
        ("gateway.internal", "", False, True),  # a name may resolve to anything
        ("::", "", False, True),
        ("0.0.0.0", "k1", False, False),
        ("0.0.0.0", "", True, False),
        ("127.0.0.1", "", False, False),
        ("127.0.0.2", "", False, False),
        ("::1", "", False, False),
        ("[::1]", "", False, False),
        ("localhost", "", False, False),
    ],
)
def test_an_open_gateway_on_a_reachable_address_needs_saying_so(
    host: str, keys: str, anonymous: bool, refused: bool
) -> None:
    config = GatewayConfig(host=host, api_keys=keys, allow_anonymous=anonymous)
    problem = config.exposure_problem()
    assert (problem is not None) == refused
    if problem:
        assert "EMBEDFLEET_GATEWAY_API_KEYS" in problem and "EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS" in problem


def test_the_command_refuses_to_start_open_and_warns_when_told_to(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    served: list[GatewayConfig] = []
    monkeypatch.setattr(gateway_command, "serve", lambda config, client: served.append(config))
    monkeypatch.setattr(gateway_command, "setup_logging", lambda *args, **kwargs: None)
    for name in ("EMBEDFLEET_GATEWAY_API_KEYS", "EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBEDFLEET_GATEWAY_HOST", "0.0.0.0")

    def run() -> int:
        import argparse

        parser = argparse.ArgumentParser()
        gateway_command.add_arguments(parser)
        return gateway_command.run(parser.parse_args([]))

    assert run() == 2 and not served
    assert "without API keys" in capsys.readouterr().err
    monkeypatch.setenv("EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS", "true")
    with caplog.at_level(logging.WARNING):
        assert run() == 0
    assert len(served) == 1 and "without API keys" in caplog.text
    monkeypatch.setenv("EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS", "maybe")
    assert run() == 2  # not a yes or a no: refused, with the variable named
    assert "EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS" in capsys.readouterr().err


async def test_401_carries_a_bearer_challenge_and_the_right_key_passes() -> None:
    consumer = _FlakyConsumer()
    config = GatewayConfig(api_keys="k1,k2")
    service, router, metrics = _service(consumer, config)
    service.client._producer = _AnsweringProducer(consumer)
    app = create_app(service, config, metrics)
    router.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            body = {"model": service.model_name, "input": "a"}
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}):
                refused = await http.post("/v1/embeddings", json=body, headers=headers)
                assert refused.status_code == 401
                assert refused.headers["www-authenticate"].startswith("Bearer")
                assert refused.json()["error"]["code"] == "invalid_api_key"
            ok = await http.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer k2"})
            assert ok.status_code == 200, ok.text
    finally:
        await router.stop()


class _HeldProducer(_AnsweringProducer):
    """Answers only once ``release`` is set: requests stay in the gateway meanwhile."""

    def __init__(self, consumer: _FlakyConsumer) -> None:
        super().__init__(consumer)
        self.release = asyncio.Event()
        self.sent = 0

    async def send(self, topic: str, value: bytes, **kwargs: Any) -> asyncio.Future[None]:
        self.sent += 1
        await self.release.wait()
        return await super().send(topic, value, **kwargs)


async def test_past_the_concurrency_cap_a_request_gets_503_with_retry_after_and_the_rest_are_served() -> None:
    consumer = _FlakyConsumer()
    config = GatewayConfig(max_concurrent=3)
    service, router, metrics = _service(consumer, config)
    producer = _HeldProducer(consumer)
    service.client._producer = producer
    app = create_app(service, config, metrics)
    router.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:

            async def post(text: str) -> httpx.Response:
                return await http.post("/v1/embeddings", json={"model": service.model_name, "input": text})

            held = [asyncio.create_task(post(f"t{i}")) for i in range(3)]
            deadline = asyncio.get_running_loop().time() + 5
            while producer.sent < 3:  # all three inside the gateway, waiting for the fleet
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            busy = await post("one too many")
            seed_busy = await http.post("/embed", json={"texts": ["also"]})
            producer.release.set()
            answers = await asyncio.gather(*held)
            after = await post("after")
    finally:
        await router.stop()
    for refused in (busy, seed_busy):
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "service_unavailable"
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert after.status_code == 200  # the places were given back
    assert metrics.rejected.labels("busy")._value.get() == 2


def test_a_body_of_many_values_is_refused_before_it_is_decoded() -> None:
    nested = b'{"model": "m", "input": [' + b",".join([b"[]"] * 2_700_000) + b"]}"  # 8 MB
    tiny = b'{"model": "m", "input": [' + b",".join([b'"a"'] * 300_000) + b"]}"
    for body in (nested, tiny):
        for decode in (decode_embeddings_request, decode_seed_request):
            tracemalloc.start()
            try:
                with pytest.raises(ApiError) as refused:
                    decode(body, 2048)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert refused.value.status == 400 and refused.value.code == "invalid_value"
            assert peak < 4 * len(body), f"{peak / 1e6:.0f} MB to refuse a {len(body) / 1e6:.0f} MB body"
    # Commas, brackets and braces inside texts are text: 2048 of them pass.
    texts = ['a, [b] {c} "d" \\ e'] * 2048
    assert decode_embeddings_request(json.dumps({"model": "m", "input": texts}).encode(), 2048).input == texts
    # Nested arrays beyond token-id arrays are not an input at all.
    with pytest.raises(ApiError) as nested_deeper:
        decode_embeddings_request(b'{"model": "m", "input": [[[1]]]}', 2048)
    assert nested_deeper.value.code == "invalid_type"


async def test_readiness_says_why_in_words_never_a_url_or_a_client_error() -> None:
    consumer = _FlakyConsumer()
    service, _, _ = _service(consumer)
    service._started = False
    service._start_problem = "KafkaConnectionError: Unable to bootstrap from [('10.0.0.7', 9092)]"
    problem = await service.readiness()
    assert problem is not None and "not connected to Kafka" in problem
    assert "10.0.0.7" not in problem and "KafkaConnectionError" not in problem
    secret_url = "redis://reader:s3cret@redis.internal:6379/0"
    client = ClientConfig.from_env({}, redis_url=secret_url)
    service.client.config = client
    assert "redis.internal" not in service._no_contract_message()
    assert "s3cret" not in service._no_contract_message()


def test_configuration_reprs_hide_secrets() -> None:
    gateway = GatewayConfig(api_keys="gw-key-1,gw-key-2")
    assert "gw-key" not in repr(gateway) and "api_keys='***'" in repr(gateway)
    client = ClientConfig(
        redis_url="redis://u:url-secret@r:6379/0",
        redis_password="pw-secret",
        kafka_sasl_password="sasl-secret",
    )
    assert not any(secret in repr(client) for secret in ("url-secret", "pw-secret", "sasl-secret"))
    assert "redis://u:***@r:6379/0" in repr(client)
    worker = WorkerConfig.from_env(
        {
            "EMBEDFLEET_REDIS_URL": "redis://u:url-secret@r:6379/0",
            "EMBEDFLEET_REDIS_PASSWORD": "pw-secret",
            "EMBEDFLEET_KAFKA_SASL_PASSWORD": "sasl-secret",
        }
    )
    assert not any(secret in repr(worker) for secret in ("url-secret", "pw-secret", "sasl-secret"))
