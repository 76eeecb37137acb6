"""The HTTP server: Starlette routes on uvicorn, bodies through msgspec.

Routes (auth, when API keys are set, on everything but health and metrics):

* ``POST /v1/embeddings``: OpenAI's embeddings API (extensions: ``long``, ``overlap``, and
  ``data[i].chunks`` for ``long: chunks``);
* ``POST /embed``: the seed's ``{"texts": [...]}`` -> ``{"embeddings": [...], "model": ...,
  "truncated": [...], "tokens": [...]}`` (the configured model);

Both answer with the headers ``X-Embedfleet-Truncated`` (inputs cut at the model's limit) and
``X-Embedfleet-Tokens-Read`` (tokens read over all inputs): truncation is never silent.
* ``GET /v1/models``, ``GET /v1/models/{model}``: every model whose contract the fleet publishes
  (``model`` in a request routes it to that model's requests topic);
* ``GET /healthz`` (the process answers), ``GET /readyz`` (connected and the contract known),
  ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from producer.client import Client
from producer.config import ClientConfig
from producer.gateway.config import GatewayConfig
from producer.gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    NoFleet,
    Overloaded,
    RejectedText,
    UnknownModel,
    UnsupportedDimensions,
)
from producer.gateway.guard import header_deadline_protocol
from producer.gateway.metrics import GatewayMetrics, model_of, note_model
from producer.gateway.openai_api import (
    TOKENS_READ_HEADER,
    TRUNCATED_HEADER,
    ApiError,
    ModelList,
    ModelObject,
    SeedEmbedResponse,
    Status,
    check_count,
    decode_embeddings_request,
    decode_seed_request,
    embeddings_response,
    encode,
    input_texts,
    long_inputs,
    read_headers,
)
from producer.gateway.service import EmbeddingService

log = logging.getLogger(__name__)
JSON = "application/json"
INLINE_DECODE_BYTES = 256 * 1024
T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]


def create_app(service: EmbeddingService, config: GatewayConfig, metrics: GatewayMetrics) -> Starlette:
    keys = [key.encode() for key in config.keys]

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compared in constant time; a key is never logged or echoed.
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(token.strip().encode(), k) for k in keys
        ):
            metrics.rejected.labels("unauthorized").inc()
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>' with a key from "
                "EMBEDFLEET_GATEWAY_API_KEYS",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="embedfleet"'},
            )

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            metrics.rejected.labels("too_large").inc()
            raise _too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        try:
            # The whole body within the read timeout: a client that trickles it holds nothing long.
            async with asyncio.timeout(config.read_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:  # chunked bodies have no Content-Length: stop reading at the limit
                        metrics.rejected.labels("too_large").inc()
                        raise _too_large(size, limit)
                    chunks.append(chunk)
        except TimeoutError:
            metrics.rejected.labels("slow_body").inc()
            raise ApiError(
                408,
                f"the request body did not arrive within {config.read_timeout_s:g}s "
                f"({size} bytes came; EMBEDFLEET_GATEWAY_READ_TIMEOUT_S)",
                code="request_timeout",
                headers={"Connection": "close"},  # the rest of the body is not read
            ) from None
        return b"".join(chunks)

    # Embedding requests being handled (their bodies read, decoded, waiting for the fleet): past
    # EMBEDFLEET_GATEWAY_MAX_CONCURRENT a request is refused at once, before its body is read.
    handling = [0]

    async def decoded(decode: Callable[[bytes, int], T], raw: bytes) -> T:
        """A body checked and decoded; a large one in a thread (megabytes take a good part of a
        second, which would hold every other request of this gateway)."""
        if len(raw) <= INLINE_DECODE_BYTES:
            return decode(raw, config.max_inputs)
        return await asyncio.to_thread(decode, raw, config.max_inputs)

    def observed(route: str, handler: Handler, *, bounded: bool = False) -> Handler:
        """Times and counts every answer of ``handler``, and turns errors into OpenAI's shape;
        ``bounded``: one of the requests EMBEDFLEET_GATEWAY_MAX_CONCURRENT counts."""
        requests: dict[tuple[int, str], Any] = {}
        latencies: dict[str, Any] = {}

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            admitted = False
            try:
                if bounded:
                    if handling[0] >= config.max_concurrent:
                        metrics.rejected.labels("busy").inc()
                        raise ApiError(
                            503,
                            f"this gateway is handling {handling[0]} requests, its limit "
                            "(EMBEDFLEET_GATEWAY_MAX_CONCURRENT): retry shortly, or add gateways",
                            type="server_error",
                            code="service_unavailable",
                            headers={"Retry-After": "1"},
                        )
                    handling[0] += 1
                    admitted = True
                response = await handler(request)
            except (ApiError, GatewayError) as exc:
                error = exc if isinstance(exc, ApiError) else api_error(exc)
                response = Response(error.body(), error.status, headers=error.headers, media_type=JSON)
            except Exception:
                log.exception("the gateway failed on %s", route)
                error = ApiError(500, "the gateway failed; see its log", type="server_error")
                response = Response(error.body(), 500, media_type=JSON)
            finally:
                if admitted:
                    handling[0] -= 1
            status, model = response.status_code, model_of(request)
            counter = requests.get((status, model))
            if counter is None:
                counter = requests[status, model] = metrics.requests.labels(route, str(status), model)
            counter.inc()
            latency = latencies.get(model)
            if latency is None:
                latency = latencies[model] = metrics.latency.labels(route, model)
            latency.observe(time.perf_counter() - started)
            return response

        return endpoint

    async def embeddings(request: Request) -> Response:
        deadline = time.monotonic() + config.deadline_s
        authorize(request)
        body = await decoded(decode_embeddings_request, await read_body(request))
        await service.check_model(body.model)
        note_model(request, body.model)
        texts = input_texts(body.input, config.max_inputs)
        long, overlap = long_inputs(body.long, body.overlap)
        # `model` routes the request: that model's contract keys it, checks `dimensions` and
        # names its requests topic (schemas.model_routing).
        contract = await service.contract(body.model)
        width = service.width(contract, body.dimensions)
        embedded = await service.embed(texts, contract, width, deadline, long=long, overlap=overlap)
        answer = embeddings_response(
            embedded.vectors,
            embedded.tokens,
            body.model,
            body.encoding_format,
            embedded.chunks if long == "chunks" else None,
        )
        headers = read_headers(embedded.truncated, embedded.token_counts)
        return Response(encode(answer), headers=headers, media_type=JSON)

    async def seed_embed(request: Request) -> Response:
        deadline = time.monotonic() + config.deadline_s
        authorize(request)
        body = await decoded(decode_seed_request, await read_body(request))
        check_count(len(body.texts), config.max_inputs, "texts")
        note_model(request, service.model_name)
        contract = await service.contract()
        embedded = await service.embed(body.texts, contract, None, deadline)
        answer = SeedEmbedResponse(
            embeddings=[v.tolist() for v in embedded.vectors],
            model=service.model_name,
            truncated=embedded.truncated,
            tokens=embedded.token_counts,
        )
        headers = read_headers(embedded.truncated, embedded.token_counts)
        return Response(encode(answer), headers=headers, media_type=JSON)

    async def models(request: Request) -> Response:
        authorize(request)
        listed = [ModelObject(id=name) for name in await service.models()]
        return Response(encode(ModelList(data=listed)), media_type=JSON)

    async def model(request: Request) -> Response:
        authorize(request)
        name = request.path_params["model"]
        await service.check_model(name)
        note_model(request, name)
        return Response(encode(ModelObject(id=name)), media_type=JSON)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    async def readyz(request: Request) -> Response:
        problem = await service.readiness()
        metrics.ready.set(0 if problem else 1)
        if problem:
            return Response(encode(Status(status="unavailable", reason=problem)), 503, media_type=JSON)
        return Response(b'{"status":"ready"}', media_type=JSON)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else "method_not_allowed"
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return Response(error.body(), exc.status_code, headers=exc.headers, media_type=JSON)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    middleware = []
    if config.origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=[TRUNCATED_HEADER, TOKENS_READ_HEADER],
            )
        )
    routes = [
        Route("/v1/embeddings", observed("/v1/embeddings", embeddings, bounded=True), methods=["POST"]),
        Route("/embed", observed("/embed", seed_embed, bounded=True), methods=["POST"]),
        Route("/v1/models", observed("/v1/models", models), methods=["GET"]),
        Route("/v1/models/{model:path}", observed("/v1/models/{model}", model), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )


def api_error(error: GatewayError) -> ApiError:
    """The one place where what the service reports becomes an HTTP answer: the status clients act
    on (the openai SDK retries 429 and 5xx), OpenAI's error object, and when to come back."""
    message = str(error)
    match error:
        case NoFleet():
            return ApiError(
                503, message, type="server_error", code="service_unavailable", headers={"Retry-After": "2"}
            )
        case Overloaded():
            return ApiError(
                429,
                message,
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        case UnknownModel():
            return ApiError(404, message, param="model", code="model_not_found")
        case UnsupportedDimensions():
            return ApiError(400, message, param="dimensions", code="invalid_value")
        case DeadlineExceeded():
            return ApiError(504, message, type="server_error", code="timeout")
        case RejectedText(by_request=True):
            return ApiError(400, message, param="input", code=error.code)
        case RejectedText():
            return ApiError(500, message, type="server_error", code=error.code)
    return ApiError(500, message, type="server_error")  # FleetFailed: the gateway's own call failed


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size} bytes or more; the limit is {limit} "
        "(EMBEDFLEET_GATEWAY_MAX_BODY_BYTES): send fewer or shorter texts per request",
        code="request_too_large",
    )


def serve(config: GatewayConfig, client_config: ClientConfig) -> None:
    """Runs the gateway until SIGINT or SIGTERM (in-flight requests get up to the deadline)."""
    metrics = GatewayMetrics()
    service = EmbeddingService(Client(client_config), config, metrics)
    app = create_app(service, config, metrics)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            lifespan="on",
            access_log=False,
            log_config=None,
            server_header=False,
            # A deadline for request headers; the body's is in read_body.
            http=header_deadline_protocol(config.read_timeout_s, metrics),
            timeout_graceful_shutdown=int(config.deadline_s) + 1,
        )
    )
    server.run()
