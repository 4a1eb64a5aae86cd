"""The Ray Serve application: a FastAPI ingress speaking the Open Inference Protocol, plus an image endpoint and page.

    serve run serve.app:build model=model.onnx [name=...] [provider=cpu] [max_batch_size=8] [batch_wait_ms=5]
    serve deploy serve/cluster.yaml                       # a cluster: replicas, CPUs/GPUs per replica
    dinoqpm-serve --model model.onnx                      # one machine (serve/cli.py)

Routes (`{m}` is the model's name; `/versions/1` may follow it):
    GET  /v2/health/live, /v2/health/ready, /v2, /v2/models/{m}, /v2/models/{m}/ready
    POST /v2/models/{m}/infer        JSON tensors or the binary tensor data extension (serve/protocol.py)
    POST /explain/{m}                an image file as the body -> JSON (?top_k=5&maps=true&html=true&filename=x.png)
    GET  /                           the upload page (serve/page.py)

Each replica holds one ONNX Runtime session with as many intra-op threads as the CPUs Ray gave the replica and one
inter-op thread, and runs it on one worker thread, so one replica never competes with itself for cores. Requests
that arrive together are run as one batch (`@serve.batch`, up to `max_batch_size` requests or `batch_wait_ms`);
`max_batch_size=1` turns batching off. This module only moves bytes between HTTP and `serve.protocol` /
`serve.model`, which hold the logic and are tested without Ray.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at class-definition time,
# and Ray's ingress rewrites the class where string annotations no longer resolve.
import asyncio
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from export.predict import PredictError, card
from serve.model import Limits, ServedModel, read_image
from serve.page import upload_page
from serve.protocol import (
    HEADER,
    ProtocolError,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
)

DEPLOYMENT = "dinoqpm"
try:
    VERSION = version("dinoqpm-toolkit")
except PackageNotFoundError:  # a checkout that was not pip-installed
    VERSION = "unknown"

api = FastAPI(title="dinoqpm-serve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # FastAPI's own 404/405 as the protocol's error object.
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": f"bad request to {request.url.path}: {exc.errors()}"}, status_code=400)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    # A failure of the service itself (not of the request): still the protocol's error object, with a 500.
    return JSONResponse({"error": f"internal error on {request.url.path}: {type(exc).__name__}: {exc}"},
                        status_code=500)


@api.exception_handler(ProtocolError)
async def _protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is over `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    too_big = f"over this service's limit of {limit:,} bytes (dinoqpm-serve --max-body-mb)"
    if declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"the body is {int(declared):,} bytes, {too_big}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"the body is {too_big}", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _flag(request: Request, key: str) -> bool:
    return request.query_params.get(key, "false").lower() in ("1", "true", "yes")


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
@serve.ingress(api)
class ModelService:
    """One replica: one ServedModel and the routes above (module docstring).

    Args:
        model: the .onnx file (a path on the replica's node).
        name: the model's name in URLs (default: the file's stem).
        provider: "cpu" or "cuda"; cuda needs a GPU in the replica's `ray_actor_options`.
        max_batch_size: requests run as one batch at most; 1 turns batching off.
        batch_wait_ms: how long a batch waits to fill.
        max_body_mb: largest request body (413 above).
        max_image_pixels: largest image the image endpoint decodes (413 above).
    """

    def __init__(self, model: str, name: str | None = None, provider: str = "cpu", max_batch_size: int = 8,
                 batch_wait_ms: float = 5.0, max_body_mb: float = 32, max_image_pixels: int = 25_000_000) -> None:
        assigned = ray.get_runtime_context().get_assigned_resources()
        if provider == "cuda" and not assigned.get("GPU"):
            raise PredictError("provider cuda needs a GPU per replica: set ray_actor_options num_gpus (or "
                               "dinoqpm-serve --num-gpus 1)")
        threads = max(1, round(assigned.get("CPU", 1)))  # the replica's share, not the machine's cores
        self.model = ServedModel(model, name or Path(model).stem, provider, threads)
        self.limits = Limits(int(max_body_mb * 2**20), int(max_image_pixels))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ort")  # session calls one at a time
        self.batching = max_batch_size > 1
        self._batched.set_max_batch_size(max(1, max_batch_size))
        self._batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.page = upload_page(self.model.name, self.model.classes, self.model.meta["image_size"],
                                self.model.providers[0])

    # ------------------------------------------------------------------------------------------------- running

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, batches: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.model.run_many, batches)

    async def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self.batching:
            return await self._batched(images)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.model.run, images)

    def _check_name(self, name: str, model_version: str | None = None) -> None:
        if name != self.model.name:
            raise ProtocolError(f"unknown model {name!r}; this service serves {self.model.name!r}", status=404)
        if model_version not in (None, "1"):
            raise ProtocolError(f"model {name!r} has version 1 only, not {model_version!r}", status=404)

    # -------------------------------------------------------------------------------------------------- routes

    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> dict[str, bool]:
        return {"ready": True}  # a replica answers only after __init__ opened the session

    @api.get("/v2")
    async def server(self) -> dict[str, Any]:
        return server_metadata(VERSION)

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{model_version}")
    async def metadata(self, name: str, model_version: str | None = None) -> dict[str, Any]:
        self._check_name(name, model_version)
        return model_metadata(self.model.name, self.model.inputs, self.model.outputs, self.model.parameters())

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{model_version}/ready")
    async def model_ready(self, name: str, model_version: str | None = None) -> dict[str, Any]:
        self._check_name(name, model_version)
        return {"name": self.model.name, "ready": True}

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{model_version}/infer")
    async def infer(self, name: str, request: Request, model_version: str | None = None) -> Response:
        self._check_name(name, model_version)
        body = await _body(request, self.limits.max_body_bytes)
        parsed = parse_infer_request(body, request.headers.get(HEADER), self.model.inputs, self.model.outputs)
        images = parsed.inputs[self.model.inputs[0].name]
        self.model.check_image_size(images)
        results = await self._run(images)
        content, headers = encode_infer_response(self.model.name, parsed, results, self.model.classes)
        return Response(content, headers=headers, media_type=headers["content-type"])

    @api.post("/explain/{name}")
    async def explain(self, name: str, request: Request) -> JSONResponse:
        self._check_name(name)
        picture = read_image(await _body(request, self.limits.max_body_bytes), self.limits)
        top_k = request.query_params.get("top_k", "5")
        if not top_k.isdigit() or int(top_k) < 1:
            raise ProtocolError(f"top_k must be a positive integer, got {top_k!r}")
        results = await self._run(self.model.image_input(picture))
        filename = request.query_params.get("filename", "upload")[:200]  # shown only, never opened
        pred = self.model.explain_image(picture, results, top_k=int(top_k), maps=_flag(request, "maps"),
                                        filename=filename)
        if _flag(request, "html"):
            if "png" not in pred:
                raise ProtocolError("html=true needs maps=true (the card shows the overlay)")
            pred["html"] = card(0, pred)
        return JSONResponse(pred)

    @api.get("/")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)


def application(options: dict[str, Any] | None = None, **kwargs: Any) -> Application:
    """ModelService bound to `kwargs` (its arguments) with deployment `options` (replicas, ray_actor_options, ...);
    max_ongoing_requests lets a replica hold a full batch and the next one queued."""
    full = {"max_ongoing_requests": max(4 * int(kwargs.get("max_batch_size", 8)), 32), **(options or {})}
    return ModelService.options(**full).bind(**kwargs)


def build(args: dict[str, Any]) -> Application:
    """The application builder behind `serve run serve.app:build model=...` and a config's `import_path`: `args`
    are ModelService's arguments (strings from the command line are converted). A config's `deployments` entry
    named "dinoqpm" sets replicas, autoscaling and ray_actor_options."""
    if "model" not in args:
        raise ValueError("serve.app:build needs model=PATH (the .onnx file written by export/to_onnx.py)")
    kinds = {"max_batch_size": int, "batch_wait_ms": float, "max_body_mb": float, "max_image_pixels": int}
    unknown = sorted(set(args) - {"model", "name", "provider", *kinds})
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for serve.app:build; known: model, name, provider, "
                         f"{', '.join(kinds)}")
    return application(**{k: kinds[k](v) if k in kinds else v for k, v in args.items()})
