"""The seeds' HTTP/JSON API (seed 003) in front of the same FeedService the gRPC port serves.

    GET  /api/v1/feed?type=home&cursor=…&limit=20     a page of the caller's feed        (GetFeed)
    POST /api/v1/feed/signals                         client engagement signals          (SubmitSignals)
    POST /api/v1/feed/feedback                        negative feedback on an item       (SubmitFeedback)
    GET  /api/v1/feed/debug?user_id=…&post_id=…       why a post ranks where it does     (DebugRanking, admin)
         …&request_id=… | &cursor=…                   why a past request served it there
    GET  /debug                                       that, as a page for ranking engineers
    GET  /openapi.json                                this API, generated from the models below

Each endpoint builds the RPC's request message and calls the FeedService method itself, so
authentication ("Authorization: Bearer <JWT>"), per-user rate limits, load shedding, validation
and metrics are the gRPC ones; a gRPC status becomes the HTTP status in ``HTTP_STATUS`` with the
body ``{"error": <status name>, "message": …}``. FastAPI because its pydantic models are the
request validation and the OpenAPI document at once, it already ships with Feast, and it runs on
uvicorn inside each server worker (SO_REUSEPORT, like the gRPC port).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import grpc
from pydantic import BaseModel, Field

from core.events import FeedType
from serving.client import ACTIONS, FEEDBACK, FEED_TYPES
from serving.protos import pb

log = logging.getLogger("feedrank.serving.http")

DEBUG_PAGE = Path(__file__).resolve().parent / "web" / "debug.html"
U64 = 2**63 - 1      # ids: the service's own range check (validation.MAX_ID) names the field when beyond it
U32 = 2**32 - 1
I64 = 2**63 - 1

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class RpcAborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class HttpCall:
    """The part of ``grpc.ServicerContext`` the FeedService uses, for one HTTP request: the
    Authorization header as call metadata, no client deadline (the configured budget applies), and
    ``abort`` raising :class:`RpcAborted` for the status mapping."""

    def __init__(self, authorization: str | None):
        self.metadata = (("authorization", authorization),) if authorization else ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise RpcAborted(code, message)


# ---------------------------------------------------------------------------------------- models

# the API's names are the gRPC client's (serving.client): one mapping from names to the proto's values
SignalActionName = Enum("SignalActionName", {a: a for a in ACTIONS}, type=str)
FeedbackTypeName = Enum("FeedbackTypeName", {f: f for f in FEEDBACK}, type=str)


class FeedbackTargetName(str, Enum):
    post = "post"
    author = "author"
    topic = "topic"


class Error(BaseModel):
    error: str = Field(description="the gRPC status name, e.g. INVALID_ARGUMENT")
    message: str


class HeadScores(BaseModel):
    click: float
    like: float
    comment: float
    share: float
    long_dwell: float
    negative: float


class FeedItem(BaseModel):
    post_id: int
    author_id: int
    score: float = Field(description="final score after the re-rank adjustments")
    heads: HeadScores = Field(description="P(head | examined) from the heavy ranker")
    source: str = Field(description="IN_NETWORK | OUT_OF_NETWORK | AD | TRENDING")
    position: int = Field(description="1-based position in the whole ranking (continues across pages)")
    reasons: list[str]


class FeedPage(BaseModel):
    items: list[FeedItem]
    next_cursor: str = Field(description='the next page: pass as ?cursor=; "" = no more items')
    model_version: str
    experiments: dict[str, str]
    degraded: bool = Field(description="served without some dependency; see degraded_reasons")
    degraded_reasons: list[str]
    request_id: str
    from_cache: bool


class Signal(BaseModel):
    post_id: int = Field(ge=0, le=U64)
    action: SignalActionName
    dwell_ms: int = Field(0, ge=0, le=U32, description="required for dwell")
    position: int = Field(0, ge=0, le=U32, description="the position the item was shown at")
    request_id: str = Field("", max_length=64, description="the GetFeed request the item came from")
    ts_ms: int = Field(0, ge=-I64, le=I64, description="client event time (epoch ms); 0 = receive time")
    author_id: int = Field(0, ge=0, le=U64)


class SignalsBody(BaseModel):
    user_id: int | None = Field(None, ge=0, le=U64, description="default: the token's subject")
    signals: list[Signal] = Field(max_length=500)


class SignalsResult(BaseModel):
    accepted: int = Field(description="logged as engagement events")
    dropped: dict[str, int] = Field(description="not logged, by reason (not_served, repeated)")


class FeedbackBody(BaseModel):
    user_id: int | None = Field(None, ge=0, le=U64, description="default: the token's subject")
    post_id: int = Field(0, ge=0, le=U64)
    feedback_type: FeedbackTypeName
    target: FeedbackTargetName = FeedbackTargetName.post
    author_id: int = Field(0, ge=0, le=U64, description="for target=author")
    topic: int = Field(0, ge=0, le=U32, description="for target=topic")
    ts_ms: int = Field(0, ge=-I64, le=I64)


class FeedbackResult(BaseModel):
    accepted: bool


class StageDecision(BaseModel):
    stage: str
    decision: str
    score: float
    rank: int
    of: int
    detail: str


class StageCount(BaseModel):
    stage: str
    candidates_in: int
    candidates_out: int


class DebugResult(BaseModel):
    post_id: int
    served: bool = Field(description="fresh: in the user's current page; by request: true")
    position: int
    features: dict[str, float] = Field(description="the full heavy-ranker feature vector, by name (by request: "
                                                   "as served)")
    heads: HeadScores | None = Field(description="P(head) (by request: as served)")
    stages: list[StageDecision] = Field(description="the post's journey through the funnel")
    model_version: str
    experiments: dict[str, str]
    request_id: str = Field(description='the request explained ("" = a fresh ranking)')
    served_ms: int = Field(description="when it was served (by request) or ranked (fresh), epoch ms")
    features_from: str = Field(description="fresh | lake (exact rows) | snapshot (Redis, float16) | unavailable")
    funnel: list[StageCount] = Field(description="every stage's candidate counts in the ranking that placed it")
    source: str
    score: float = Field(description="the final score the re-ranker ordered by")
    heavy_score: float = Field(description="the weighted head scores before the adjustments")
    weighted: dict[str, float] = Field(description='score parts: weight x P(head) per head and "adjustments"; '
                                                   'an ad: "bid_x_click"')
    rescored: HeadScores | None = Field(description="by request: the served model re-run on the served features")
    reasons: list[str] = Field(description="the re-rank rules that placed it")
    score_order: int = Field(description="its place by score alone, before the re-rank rules")
    page: list[FeedItem] = Field(description="by request: the page it was served on")
    notes: list[str] = Field(description="what could not be explained, and why")


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Error, "description": name}
    for status, name in ((400, "invalid argument (the field and the reason)"), (401, "no, malformed or expired token"),
                         (403, "acting as another user, or an admin endpoint without admin"),
                         (404, "no such served record or post (DebugRanking by request)"),
                         (429, "rate limit or load shedding: retry later"),
                         (500, "internal error (with a request id)"), (503, "a store did not accept the write: retry"),
                         (504, "deadline exceeded"))
}


# ---------------------------------------------------------------------------------------- marshalling

def _heads(h: Any) -> HeadScores:
    return HeadScores(click=h.click, like=h.like, comment=h.comment, share=h.share, long_dwell=h.long_dwell,
                      negative=h.negative)


def _item(i: Any) -> FeedItem:
    return FeedItem(post_id=i.post_id, author_id=i.author_id, score=i.score, heads=_heads(i.heads),
                    source=pb.Source.Name(i.source), position=i.position, reasons=list(i.reasons))


def feed_page(r: Any) -> FeedPage:
    return FeedPage(items=[_item(i) for i in r.items],
                    next_cursor=r.next_cursor, model_version=r.model_version, experiments=dict(r.experiments),
                    degraded=r.degraded, degraded_reasons=list(r.degraded_reasons), request_id=r.request_id,
                    from_cache=r.from_cache)


def _ordered(m: Any, names: list[str]) -> dict[str, float]:
    """A proto map (unordered) in the schema's order, then any other keys."""
    return {**{n: m[n] for n in names if n in m}, **{k: v for k, v in sorted(m.items()) if k not in names}}


def debug_result(r: Any) -> DebugResult:
    from core.schema import HEAD_NAMES, HEAVY_NAMES

    return DebugResult(post_id=r.post_id, served=r.served, position=r.position,
                       features=_ordered(r.features, HEAVY_NAMES),
                       heads=_heads(r.heads) if r.HasField("heads") else None, model_version=r.model_version,
                       experiments=dict(r.experiments),
                       stages=[StageDecision(stage=s.stage, decision=s.decision, score=s.score, rank=s.rank, of=s.of,
                                             detail=s.detail) for s in r.stages],
                       request_id=r.request_id, served_ms=r.served_ms, features_from=r.features_from,
                       funnel=[StageCount(stage=f.stage, candidates_in=f.candidates_in, candidates_out=f.candidates_out)
                               for f in r.funnel],
                       source=pb.Source.Name(r.source), score=r.score, heavy_score=r.heavy_score,
                       weighted=_ordered(r.weighted, [*HEAD_NAMES, "adjustments"]), rescored=_heads(r.rescored) if r.HasField("rescored") else None,
                       reasons=list(r.reasons), score_order=r.score_order, page=[_item(i) for i in r.page],
                       notes=list(r.notes))


# ---------------------------------------------------------------------------------------- the app

class Health(BaseModel):
    status: str = Field(description="SERVING | NOT_SERVING (models or index not loaded and usable yet)")


def create_app(service: Any, ready: Callable[[], bool] = lambda: True) -> Any:
    """The FastAPI app over ``service`` (a :class:`serving.service.FeedService`); ``ready`` is the
    server's readiness, answered on /healthz (503 until ready) as gRPC health answers it."""
    from fastapi import FastAPI, Header, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="feedrank FeedService", version="1", docs_url=None, redoc_url=None,
                  description="The feed API of seed 003 over the gRPC FeedService: same auth (Authorization: "
                              "Bearer <JWT>), limits and validation; errors are {error, message}.")

    def error(status: int, code: str, message: str, retry: bool = False) -> JSONResponse:
        return JSONResponse({"error": code, "message": message}, status_code=status,
                            headers={"Retry-After": "1"} if retry else None)

    @app.exception_handler(RpcAborted)
    def _aborted(request: Request, e: RpcAborted) -> JSONResponse:
        return error(HTTP_STATUS.get(e.code, 500), e.code.name, e.message,
                     retry=e.code == grpc.StatusCode.RESOURCE_EXHAUSTED)

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:  # e.g. a body that is not JSON
        code = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(e.status_code, "INVALID_ARGUMENT")
        return error(e.status_code, code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return error(400, "INVALID_ARGUMENT", f"{where or 'request'}: {first.get('msg', 'invalid')}")

    def subject(call: HttpCall) -> int:
        """The token's user (the default user_id); UNAUTHENTICATED as the RPC would answer it."""
        from serving.edge import AuthError, KeysUnavailable

        try:
            return service.auth.principal(call.invocation_metadata()).user_id
        except AuthError as e:
            raise RpcAborted(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        except KeysUnavailable as e:
            raise RpcAborted(grpc.StatusCode.UNAVAILABLE, f"{e}; retry") from None

    auth_header = Header(None, alias="Authorization", description="Bearer <JWT>")

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "not ready"}},
             summary="Readiness: SERVING once every model and index a pipeline needs is loaded")
    def healthz() -> Any:
        if ready():
            return Health(status="SERVING")
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    @app.get("/api/v1/feed", response_model=FeedPage, responses=ERRORS, summary="The next page of the ranked feed")
    def get_feed(type: FeedType = Query(FeedType.HOME, description="home | explore | following"),
                 cursor: str = Query("", max_length=4096, description="next_cursor of the previous page"),
                 limit: int = Query(20, ge=1, le=100),
                 user_id: int | None = Query(None, ge=0, le=U64, description="default: the token's subject"),
                 authorization: str | None = auth_header) -> FeedPage:
        call = HttpCall(authorization)
        user = subject(call) if user_id is None else user_id
        req = pb.GetFeedRequest(user_id=user, feed_type=FEED_TYPES[type.value], cursor=cursor, limit=limit)
        return feed_page(service.GetFeed(req, call))

    @app.post("/api/v1/feed/signals", response_model=SignalsResult, responses=ERRORS,
              summary="A batch of client-side engagement signals about served items")
    def submit_signals(body: SignalsBody, authorization: str | None = auth_header) -> SignalsResult:
        call = HttpCall(authorization)
        user = subject(call) if body.user_id is None else body.user_id
        req = pb.SubmitSignalsRequest(user_id=user, signals=[
            pb.Signal(post_id=s.post_id, action=ACTIONS[s.action.value], dwell_ms=s.dwell_ms,
                      position=s.position, request_id=s.request_id, ts_ms=s.ts_ms, author_id=s.author_id)
            for s in body.signals])
        r = service.SubmitSignals(req, call)
        return SignalsResult(accepted=r.accepted, dropped=dict(r.dropped))

    @app.post("/api/v1/feed/feedback", response_model=FeedbackResult, responses=ERRORS,
              summary="Negative feedback on a feed item (hide, not_interested, see_less)")
    def submit_feedback(body: FeedbackBody, authorization: str | None = auth_header) -> FeedbackResult:
        call = HttpCall(authorization)
        user = subject(call) if body.user_id is None else body.user_id
        req = pb.SubmitFeedbackRequest(user_id=user, kind=FEEDBACK[body.feedback_type.value],
                                       target=pb.FeedbackTarget.Value(body.target.value.upper()), post_id=body.post_id,
                                       author_id=body.author_id, topic=body.topic, ts_ms=body.ts_ms)
        service.SubmitFeedback(req, call)
        return FeedbackResult(accepted=True)

    @app.get("/api/v1/feed/debug", response_model=DebugResult, responses=ERRORS,
             summary="For ranking engineers (admin token): the post's features, head scores and funnel journey")
    def debug(user_id: int = Query(ge=0, le=U64), post_id: int = Query(ge=0, le=U64),
              type: FeedType = Query(FeedType.HOME),
              request_id: str = Query("", max_length=128, description="explain it as this GetFeed request served it"),
              cursor: str = Query("", max_length=4096, description="or as the request of this next_cursor served it"),
              authorization: str | None = auth_header) -> DebugResult:
        req = pb.DebugRankingRequest(user_id=user_id, post_id=post_id, feed_type=FEED_TYPES[type.value],
                                     request_id=request_id, cursor=cursor)
        return debug_result(service.DebugRanking(req, HttpCall(authorization)))

    @app.get("/debug", response_class=HTMLResponse, include_in_schema=False)
    def debug_page() -> HTMLResponse:
        """For ranking engineers: renders /api/v1/feed/debug (the admin token is entered in the page)."""
        return HTMLResponse(DEBUG_PAGE.read_text(encoding="utf-8"))

    return app


class HttpServer:
    """uvicorn serving :func:`create_app` in a background thread of this worker, on a socket bound
    here (SO_REUSEPORT when the workers share the port); port 0 picks a free one; ``tls`` =
    (certificate, key) PEM paths serves HTTPS."""

    def __init__(self, service: Any, host: str, port: int, reuse_port: bool = False,
                 ready: Callable[[], bool] = lambda: True, tls: tuple[str, str] | None = None):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(service, ready), log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="http-api")
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError(f"the HTTP API did not start on {host}:{self.port}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()
