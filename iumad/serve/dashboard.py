"""The dashboard and quarantine review: server-rendered HTML (Jinja2, one small script) and the JSON/PNG
routes it reads, on the same app as the scoring API.

Access. Without a token the server is read-only: the page and its images are open (loopback), and a
quarantine decision is refused with 401. With a token, the page, its images and every /v1/ route need
`Authorization: Bearer <token>` or the login cookie that POST /dashboard/login sets for the right token
(an HMAC of it, HttpOnly, SameSite=Strict, so another site cannot make the browser send it); the
page's accept/reject buttons post with that cookie. Files are only read where the store's rows say
(quarantine/...) and PNGs are served from memory by server-made ids: no request path reaches the disk.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from iumad.continual.quarantine import decide, get_sample, list_samples, record_of
from iumad.continual.report import classes as list_classes
from iumad.continual.report import forgetting
from iumad.data.loading import load_sample
from iumad.errors import DataError, IumadError
from iumad.eval.forgetting import plot, to_dict
from iumad.eval.protocol import PROTOCOL_METRICS
from iumad.serve.errors import ApiError
from iumad.serve.holder import ModelHolder, Served, version_rows
from iumad.serve.maps import MAP_ID_CHARS, MapCache, RecentPredictions, overlay_png, render_recent
from iumad.serve.security import COOKIE, TOKEN_ENV, cookie_value, credentials_ok
from iumad.store.db import Store
from iumad.store.repository import DecisionConflict, UnknownSample

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
PNG_HEADERS = {"Cache-Control": "no-store"}
_HEX = set("0123456789abcdef")


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers=PNG_HEADERS)


def _api_error(exc: IumadError) -> ApiError:
    """A quarantine lookup's error as its HTTP answer: unknown sample or gone file 404, conflict 409."""
    if isinstance(exc, UnknownSample):
        return ApiError(404, str(exc), field="sample_id", fix=exc.fix or "GET /v1/quarantine lists the samples")
    if isinstance(exc, DecisionConflict):
        return ApiError(409, str(exc), field="sample_id", fix=exc.fix or "the first decision stands")
    if isinstance(exc, DataError):
        return ApiError(404, str(exc), field="sample_id", fix=exc.fix or "restore the store's quarantine/ folder")
    return ApiError(400, str(exc), field=None, fix=exc.fix or "see /docs")


def add_dashboard(app: FastAPI, *, store: Store, holder: ModelHolder, token: str | None,
                  authorised: Callable[[Request], None], serving: Callable[[], Served], maps: MapCache,
                  recent: RecentPredictions, errors: dict[int, Any]) -> None:
    """Add the dashboard, its login, the quarantine routes and the PNG routes to `app`."""
    plot_lock = threading.Lock()  # pyplot keeps global state: one plot at a time
    quarantine_errors = {s: errors[s] for s in (400, 401)} | {
        404: {"description": "no quarantined sample has this id, or its files are gone"},
        409: {"description": "the sample already has the other decision (decisions are final)"}}

    def logged_in(request: Request) -> bool:
        return token is None or credentials_ok(token, request.headers.get("authorization"), request.cookies.get(COOKIE))

    def decider(request: Request) -> str:
        """Who decides (recorded with the decision); 401 unless this server has a token and it was sent."""
        if token is None:
            raise ApiError(401, "this server was started without a token, so it takes no quarantine decisions",
                           field="authorization", fix=f"restart it with {TOKEN_ENV} or --token-file, or use "
                           "`iumad quarantine accept|reject`")
        authorised(request)
        return f"serve {request.client.host if request.client else 'unknown'}"

    def metric_of(metric: str) -> str:
        if metric not in PROTOCOL_METRICS:
            raise ApiError(400, f"metric {metric!r} is not one of {', '.join(PROTOCOL_METRICS)}", field="metric",
                           fix=f"use one of {', '.join(PROTOCOL_METRICS)}")
        return metric

    def recent_rows() -> list[dict[str, Any]]:
        return [item.row | {"id": item.id, "at": datetime.fromtimestamp(item.at, timezone.utc).isoformat(),
                            "overlay": f"/v1/maps/{item.id}.png" if maps.get(item.id) is not None
                            or item.uploads is not None else None}
                for item in recent.latest()]

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard", status_code=307)

    @app.get("/dashboard", response_class=HTMLResponse, summary="The dashboard (HTML): classes, versions, "
             "forgetting, recent predictions, quarantine review")
    def dashboard(request: Request, metric: str = Query("i_auroc", description=", ".join(PROTOCOL_METRICS))
                  ) -> HTMLResponse:
        if not logged_in(request):
            return TEMPLATES.TemplateResponse(request, "login.html", {"error": None}, status_code=401)
        metric = metric_of(metric)
        served = holder.served
        report, _ = forgetting(store, metric)
        summary = to_dict(report)
        return TEMPLATES.TemplateResponse(request, "dashboard.html", {
            "served": served, "last_error": holder.last_error, "classes": list_classes(store),
            "versions": version_rows(store, holder), "metric": metric, "metrics": PROTOCOL_METRICS,
            "report": summary, "recent": recent_rows(), "quarantine": list_samples(store),
            "can_decide": token is not None, "token_env": TOKEN_ENV})

    @app.post("/dashboard/login", response_class=HTMLResponse, summary="Log the browser in with the token "
              "(form field `token`): sets the dashboard's cookie")
    async def login(request: Request) -> Response:
        async with request.form(max_files=0, max_fields=4) as form:
            given = form.get("token")
        if token is None:
            return RedirectResponse("/dashboard", status_code=303)
        if not isinstance(given, str) or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return TEMPLATES.TemplateResponse(request, "login.html", {"error": "wrong token"}, status_code=401)
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="strict", path="/")
        return response

    @app.post("/dashboard/logout", summary="Forget the dashboard's cookie")
    def logout() -> Response:
        response = RedirectResponse("/dashboard", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/v1/forgetting.png", dependencies=[Depends(authorised)], response_class=Response,
             responses={400: errors[400]}, summary="The forgetting report's plot (PNG): R as a heat map and "
             "per-class curves")
    def forgetting_png(metric: str = Query("i_auroc", description=", ".join(PROTOCOL_METRICS))) -> Response:
        report, _ = forgetting(store, metric_of(metric))
        key = "forgetting-" + hashlib.sha256(json.dumps(to_dict(report), sort_keys=True).encode()).hexdigest()
        png = maps.get(key)
        if png is None:
            with plot_lock, tempfile.TemporaryDirectory(prefix="iumad-serve-plot-") as tmp:
                plot(report, Path(tmp) / "r.png")
                png = (Path(tmp) / "r.png").read_bytes()
            maps.put(key, png)
        return _png(png)

    @app.get("/v1/maps/{map_id}.png", dependencies=[Depends(authorised)], response_class=Response,
             responses={404: {"description": "no such map (maps are kept in a bounded memory)"}},
             summary="A heat-map overlay PNG (from heatmap=true, or a recent prediction)")
    def map_png(map_id: str) -> Response:
        if len(map_id) != MAP_ID_CHARS or not set(map_id) <= _HEX:
            raise ApiError(404, "no such map", field="map_id", fix="use a heatmap_url a prediction returned")
        png = maps.get(map_id)
        item = recent.find(map_id) if png is None else None
        if png is None and item is not None:
            png = render_recent(item)
            if png is not None:
                maps.put(map_id, png)
        if png is None:
            raise ApiError(404, f"map {map_id} is no longer held (the server keeps the latest ones in memory)",
                           field="map_id", fix="score the sample again with heatmap=true")
        return _png(png)

    @app.get("/v1/recent", dependencies=[Depends(authorised)], summary="The latest predictions, newest first")
    def v1_recent() -> list[dict[str, Any]]:
        """Rows as /v1/predict gives them, plus id, at (UTC) and overlay (a /v1/maps/ URL, or null when
        its pixels were dropped from the bounded memory)."""
        return recent_rows()

    @app.get("/v1/quarantine", dependencies=[Depends(authorised)], summary="Samples nightly quarantined, "
             "with their decisions (as `iumad quarantine list --json`)")
    def v1_quarantine(class_name: str | None = Query(None, alias="class"), undecided: bool = False
                      ) -> list[dict[str, Any]]:
        return list_samples(store, class_name=class_name, undecided=undecided)

    @app.get("/v1/quarantine/{sample_id}", dependencies=[Depends(authorised)], responses=quarantine_errors,
             summary="One quarantined sample")
    def v1_quarantine_one(sample_id: int) -> dict[str, Any]:
        try:
            return get_sample(store, sample_id)
        except IumadError as exc:
            raise _api_error(exc) from None

    @app.get("/v1/quarantine/{sample_id}/overlay.png", dependencies=[Depends(authorised)], response_class=Response,
             responses=quarantine_errors | {503: errors[503]},
             summary="A quarantined sample's overlay, scored now by the serving model (PNG)")
    def v1_quarantine_overlay(sample_id: int) -> Response:
        served = serving()
        key = f"quarantine-{sample_id}-{served.version}"
        png = maps.get(key)
        if png is None:
            try:
                class_name, record = record_of(store, sample_id)
            except IumadError as exc:
                raise _api_error(exc) from None
            if class_name not in served.detector.classes:
                raise ApiError(409, f"model version {served.version} does not know class {class_name!r}",
                               field="sample_id", fix="promote a version that learned it")
            try:
                with served.lock:
                    pred = served.detector.predict_records([record], class_name)[0]
                png = overlay_png(load_sample(record), pred.maps, served.thresholds.get(class_name))
            except DataError as exc:  # a quarantined file damaged since: say which
                raise _api_error(exc) from None
            maps.put(key, png)
        return _png(png)

    def decided(sample_id: int, decision: str, by: str) -> dict[str, Any]:
        try:
            return decide(store, sample_id, decision, decided_by=by)
        except IumadError as exc:
            raise _api_error(exc) from None

    @app.post("/v1/quarantine/{sample_id}/accept", responses=quarantine_errors,
              summary="Accept a quarantined sample: the next nightly run learns it (needs the token)")
    def v1_accept(sample_id: int, by: str = Depends(decider)) -> dict[str, Any]:
        """The sample's row with its decision; `created` is false when it was already accepted."""
        return decided(sample_id, "accept", by)

    @app.post("/v1/quarantine/{sample_id}/reject", responses=quarantine_errors,
              summary="Reject a quarantined sample: it is never learned (needs the token)")
    def v1_reject(sample_id: int, by: str = Depends(decider)) -> dict[str, Any]:
        """The sample's row with its decision; `created` is false when it was already rejected."""
        return decided(sample_id, "reject", by)
