"""The seed's pattern, as bench/gateway.py's baseline: one HTTP service that runs the FP32 model
in-process for every request (no cache, no batching across requests), Starlette on uvicorn.

    python bench/naive_http.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine.embedder import Embedder


class EmbedBody(msgspec.Struct):
    texts: list[str]


def main() -> None:
    model_dir, port = Path(sys.argv[1]), int(sys.argv[2])
    embedder = Embedder.from_bundle(model_dir, variant="fp32")
    decoder = msgspec.json.Decoder(EmbedBody)

    async def embed(request: Request) -> Response:
        body = decoder.decode(await request.body())
        vectors = await run_in_threadpool(lambda: embedder.embed(body.texts).vectors)
        return Response(msgspec.json.encode({"embeddings": vectors.tolist()}), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    app = Starlette(routes=[Route("/embed", embed, methods=["POST"]), Route("/healthz", healthz)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
