"""The FastAPI app: routes, the JSON error handlers, the upload-size guard, the token check.

`create_app` builds everything from a store root; `iumad serve` runs it under uvicorn. Scoring runs in
the threadpool on a snapshot of the holder, so a swap never changes the model under a request.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iumad import __version__
from iumad.continual.report import classes as list_classes
from iumad.continual.report import forgetting, forgetting_json
from iumad.data.loading import load_sample
from iumad.errors import DataError, IumadError, UsageError
from iumad.eval.overlay import prediction_rows
from iumad.eval.protocol import PROTOCOL_METRICS
from iumad.serve import uploads
from iumad.serve.errors import ApiError, error_body
from iumad.serve.dashboard import add_dashboard
from iumad.serve.holder import ModelHolder, Served, version_rows
from iumad.serve.maps import MapCache, RecentPredictions, new_id, overlay_png
from iumad.serve.metrics import Metrics
from iumad.serve.security import COOKIE, credentials_ok
from iumad.store.db import Store

log = logging.getLogger("iumad.serve")

MAX_UPLOAD_BYTES = 64 * 2 ** 20
"""Largest request body accepted (413 above it), before any byte is parsed."""


class BodyTooLarge(Exception):
    """Raised from `receive` when a body without (or beyond) its Content-Length passes the limit."""


class UploadGuard:
    """ASGI middleware: refuse bodies over `limit` bytes (413, from Content-Length before reading, or
    while streaming), and count every request's status and latency in `metrics`."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.limit, self.metrics, self.routes = app, limit, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        start, status = time.perf_counter(), [500]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                await _send_too_large(send_counted, self.limit)
                return
            seen = [0]

            async def receive_counted() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.limit:
                        raise BodyTooLarge()
                return message

            await self.app(scope, receive_counted, send_counted)
        finally:
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - start)


async def _send_too_large(send: Send, limit: int) -> None:
    body = JSONResponse(error_body(f"the request body is over the {limit // 2 ** 20} MiB upload limit", 413,
                                   None, "send smaller files, or fewer samples per batch"), status_code=413)
    await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
    await send({"type": "http.response.body", "body": body.body})


def _finite(value: Any) -> Any:
    """JSON has no NaN: NaN and inf become null (the report marks cells it could not measure as NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "properties": {
        "rgb": {"type": "string", "format": "binary", "description": "8-bit PNG or JPEG colour image"},
        "xyz": {"type": "string", "format": "binary", "description": "HxWx3 float TIFF of xyz points (metres)"},
        "depth": {"type": "string", "format": "binary", "description": "16-bit PNG depth in mm (instead of xyz)"},
        "class": {"type": "string", "default": "auto", "description": "class name, or auto to predict it"},
        "heatmap": {"type": "string", "enum": ["false", "true", "base64"], "default": "false",
                    "description": "true: add heatmap_url (a PNG overlay under /v1/maps/); base64: add heatmap_png"},
    }}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "properties": {
        "rgb.0": {"type": "string", "format": "binary", "description": "sample 0's colour image (rgb.1, ...)"},
        "xyz.0": {"type": "string", "format": "binary", "description": "sample 0's xyz TIFF (xyz.1, ...)"},
        "depth.0": {"type": "string", "format": "binary", "description": "sample 0's depth PNG (depth.1, ...)"},
        "class": {"type": "string", "default": "auto", "description": "class of every sample, or auto"},
        "heatmap": {"type": "string", "enum": ["false", "true", "base64"], "default": "false",
                    "description": "an overlay per sample, as in /v1/predict"},
    }}}}}}
ERRORS = {s: {"description": d, "content": {"application/json": {"example": error_body("...", s, "rgb", "...")}}}
          for s, d in ((400, "bad upload: unreadable, truncated, wrong shape, no valid point, unknown class or "
                             "field"), (401, "missing or wrong bearer token"), (413, "body over the upload limit"),
                       (415, "wrong content type or file signature for the field"),
                       (503, "no model loaded yet"))}


def _check_modalities(samples: list[uploads.Upload], class_name: str, learned: tuple[str, ...],
                      batch: bool) -> None:
    """400 naming the missing field when a sample lacks a modality its class was learned with: the
    model's scores are calibrated on the fused maps of all of them."""
    for i, sample in enumerate(samples):
        have = {"rgb"} & set(sample.files) | ({"geometry"} if {"xyz", "depth"} & set(sample.files) else set())
        for mod in learned:
            if mod not in have:
                field = ("rgb" if mod == "rgb" else "xyz") + (f".{i}" if batch else "")
                raise ApiError(400, f"class {class_name!r} was learned with {' and '.join(learned)}; sample {i} "
                               f"has no {mod}", field=field,
                               fix=f"send {field} too (rgb: PNG/JPEG; geometry: xyz TIFF or depth PNG)")


def create_app(store_root: Path | str | None = None, *, token: str | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, poll_s: float = 2.0, retry_s: float = 60.0) -> FastAPI:
    """The serving app over the store at `store_root`. With `token`, every /v1/ request and the dashboard
    need `Authorization: Bearer <token>` (or the dashboard's login cookie); /healthz, /readyz and
    /metrics stay open for probes. Quarantine decisions need a token: without one the server is read-only.
    The production alias is checked every `poll_s` seconds; a refused version is tried again after `retry_s`."""
    store = Store.open(store_root, create=False)
    metrics = Metrics()
    holder = ModelHolder(store, metrics, poll_s=poll_s, retry_s=retry_s)
    maps, recent = MapCache(), RecentPredictions()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.start()
        try:
            yield
        finally:
            holder.stop()
            store.close()

    app = FastAPI(title="iumad serve", version=__version__, lifespan=lifespan,
                  description="Incremental multimodal anomaly detection: the production model behind HTTP. "
                              "Errors are JSON {error, code, field, fix}.")
    app.state.store, app.state.holder, app.state.metrics = store, holder, metrics
    app.state.maps, app.state.recent = maps, recent

    def authorised(request: Request) -> None:
        if token is None:
            return
        if not credentials_ok(token, request.headers.get("authorization"), request.cookies.get(COOKIE)):
            raise ApiError(401, "missing or wrong bearer token", field="authorization",
                           fix="send the header Authorization: Bearer <token> (IUMAD_SERVE_TOKEN or --token-file)")

    def serving() -> Served:
        served = holder.served
        if served is None:
            raise ApiError(503, f"no model loaded yet ({holder.last_error or 'loading'})",
                           fix="wait for /readyz, or learn a class with `iumad add-class`")
        return served

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse(error_body(f"the request body is over the {max_upload_bytes // 2 ** 20} MiB upload "
                                       "limit", 413, None, "send smaller files, or fewer samples per batch"),
                            status_code=413)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        fix = "see /docs for the endpoints" if exc.status_code in (404, 405) else "send a well-formed multipart body"
        return JSONResponse(error_body(str(exc.detail), exc.status_code, None, fix), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug, not a bad request: still JSON
        log.exception("unexpected error")
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); the server log has the traceback", 500,
                                       None, "report it with the server log"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{field}: {first.get('msg', 'invalid')}", 400, field, "see /docs"),
                            status_code=400)

    async def read_samples(request: Request, batch: bool) -> tuple[list[uploads.Upload], str | None, str | None]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            raise ApiError(415, f"the body is {kind or 'untyped'}, not multipart/form-data", field=None,
                           fix="send the files as multipart/form-data (curl -F rgb=@part.png)")
        async with request.form(max_files=3 * uploads.MAX_BATCH + 1, max_fields=3 * uploads.MAX_BATCH + 3) as form:
            return await uploads.collect(form, batch=batch), uploads.class_of(form), uploads.heatmap_of(form)

    def score(samples: list[uploads.Upload], class_name: str | None, batch: bool, heatmap: str | None = None
              ) -> tuple[list[dict[str, Any]], int]:
        """Score on one snapshot: the version that scores is the one every row names. Every sample joins
        the dashboard's ring of recent predictions; with `heatmap` its overlay is drawn now."""
        served = serving()
        det = served.detector
        if class_name is not None and class_name not in det.classes:
            raise ApiError(400, f"class {class_name!r} is not in model version {served.version}; it knows "
                           f"{', '.join(det.class_names)}", field="class", fix="send a known class name, or auto")
        if class_name is not None:
            _check_modalities(samples, class_name, tuple(det.classes[class_name].modalities), batch)
        with tempfile.TemporaryDirectory(prefix="iumad-serve-") as tmp:
            records, loaded = uploads.write_records(samples, Path(tmp), det.spec.input_size)
            try:
                with served.lock:
                    preds = det.predict_records(records, class_name, samples=loaded)
            except DataError as exc:
                raise uploads.data_error(exc, {}) from None
            except UsageError as exc:  # the predicted class lacks the modalities sent (or needs more)
                raise ApiError(400, str(exc), field="class", fix="send every modality the class was learned "
                               "with (GET /v1/classes lists them), or name the class") from None
            rows = [_finite(uploads.as_row(r)) | {"model_version": served.version}
                    for r in prediction_rows(records, preds, served.thresholds)]
            for row, sample, record, pred in zip(rows, samples, records, preds):
                metrics.samples.labels(class_name=row["class"]).inc()
                map_id = None
                if heatmap is not None:
                    png = overlay_png(load_sample(record), pred.maps, row["threshold"])
                    map_id = maps.put(new_id(), png)
                    row["heatmap_url" if heatmap == "url" else "heatmap_png"] = \
                        f"/v1/maps/{map_id}.png" if heatmap == "url" else base64.b64encode(png).decode("ascii")
                recent.add({k: v for k, v in row.items() if k != "heatmap_png"}, sample.files, pred.maps, map_id)
        return rows, served.version

    @app.post("/v1/predict", dependencies=[Depends(authorised)], openapi_extra=PREDICT_BODY, responses=ERRORS,
              summary="Score one sample (rgb and/or xyz or depth)")
    async def predict(request: Request) -> dict[str, Any]:
        """One row as `iumad predict --json` gives it (class, class_probability, score, score_rgb,
        score_geometry, threshold, decision) plus model_version and latency_ms; with heatmap=true also
        heatmap_url (/v1/maps/<id>.png), with heatmap=base64 heatmap_png (the PNG, base64)."""
        start = time.perf_counter()
        samples, class_name, heatmap = await read_samples(request, batch=False)
        rows, _ = await run_in_threadpool(score, samples, class_name, False, heatmap)
        return rows[0] | {"latency_ms": (time.perf_counter() - start) * 1000}

    @app.post("/v1/predict/batch", dependencies=[Depends(authorised)], openapi_extra=BATCH_BODY, responses=ERRORS,
              summary="Score several samples together (the detector's batched path)")
    async def predict_batch(request: Request) -> dict[str, Any]:
        """{model_version, latency_ms, results: one row per sample in index order}."""
        start = time.perf_counter()
        samples, class_name, heatmap = await read_samples(request, batch=True)
        rows, version = await run_in_threadpool(score, samples, class_name, True, heatmap)
        return {"model_version": version, "latency_ms": (time.perf_counter() - start) * 1000, "results": rows}

    @app.get("/healthz", summary="The process is alive")
    def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and the store answers", responses={503: ERRORS[503]})
    def readyz() -> JSONResponse:
        served = holder.served
        try:
            with store.session() as s:
                s.execute(text("select 1"))
        except Exception as exc:
            return JSONResponse(error_body(f"the store does not answer: {exc}", 503, None, "check the store"), 503)
        if served is None:
            return JSONResponse(error_body(f"no model loaded yet ({holder.last_error or 'loading'})", 503, None,
                                           "wait, or learn a class with `iumad add-class`"), 503)
        return JSONResponse({"status": "ready", "model_version": served.version, "last_error": holder.last_error})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/classes", dependencies=[Depends(authorised)], summary="Learned classes in arrival order")
    def v1_classes() -> list[dict[str, Any]]:
        return _finite(list_classes(store))

    @app.get("/v1/versions", dependencies=[Depends(authorised)], summary="Model versions and which one serves")
    def v1_versions() -> list[dict[str, Any]]:
        return version_rows(store, holder)

    @app.get("/v1/forgetting", dependencies=[Depends(authorised)], responses={400: ERRORS[400]},
             summary="The forgetting report (as `iumad forgetting-report --json`)")
    def v1_forgetting(metric: str = Query("i_auroc", description=", ".join(PROTOCOL_METRICS))) -> dict[str, Any]:
        try:
            report, drift = forgetting(store, metric)
        except IumadError as exc:
            raise ApiError(400, str(exc).replace("--metric", "metric"), field="metric",
                           fix=f"use one of {', '.join(PROTOCOL_METRICS)}") from None
        return _finite(forgetting_json(report, drift))

    add_dashboard(app, store=store, holder=holder, token=token, authorised=authorised, serving=serving,
                  maps=maps, recent=recent, errors=ERRORS)
    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(UploadGuard, limit=max_upload_bytes, metrics=metrics, routes=routes)
    return app


ENV_MAX_UPLOAD, ENV_POLL = "IUMAD_SERVE_MAX_UPLOAD_BYTES", "IUMAD_SERVE_POLL_S"


def app_from_env() -> FastAPI:
    """The app of one `iumad serve --workers N` worker. uvicorn spawns workers from an import string, so
    the options travel as environment variables the CLI sets: $IUMAD_STORE, $IUMAD_SERVE_TOKEN,
    $IUMAD_SERVE_MAX_UPLOAD_BYTES, $IUMAD_SERVE_POLL_S ($IUMAD_DEVICE for --device). Each worker loads
    the production model and polls the alias on its own, so each swaps by itself."""
    import os

    from iumad.serve.metrics import worker_exited
    from iumad.serve.security import TOKEN_ENV

    if not logging.getLogger().handlers:  # a spawned worker starts without the CLI's logging setup
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        logging.getLogger("alembic").setLevel(logging.WARNING)
    app = create_app(os.environ.get("IUMAD_STORE") or None, token=os.environ.get(TOKEN_ENV) or None,
                     max_upload_bytes=int(os.environ.get(ENV_MAX_UPLOAD) or MAX_UPLOAD_BYTES),
                     poll_s=float(os.environ.get(ENV_POLL) or 2.0))
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[None]:
        try:
            async with inner(a):
                yield
        finally:
            worker_exited()

    app.router.lifespan_context = lifespan
    return app
