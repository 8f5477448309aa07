"""``reg2rg-serve``: the report engine as an authenticated HTTP service (FastAPI + uvicorn).

Endpoints (all under ``/v1`` except health and metrics; every one but ``/health`` needs
``Authorization: Bearer <token>``; the OpenAPI page is ``/docs``, its schema ``/openapi.json``):

* ``GET /health`` — the process is up (no authentication, for load balancers);
* ``GET /v1/ready`` — the model is loaded and the decode thread runs (503 otherwise);
* ``GET /v1/model`` — name, version, weights digest, model card, layout, server limits;
* ``POST /v1/drafts`` — body: a pre-processed study (`wire`, ``application/x-reg2rg-study``);
  answer: server-sent events ``accepted`` (the draft id), ``encoding_started``, ``encoding_done``,
  ``token``…, then ``finished`` (the whole draft) or ``error``. Closing the stream cancels the draft;
* ``POST /v1/drafts/{id}/cancel`` — stop a draft between two tokens (it still ends with ``finished``);
* ``GET /v1/drafts/{id}`` — a running or finished draft (kept ``--keep-drafts`` drafts, 15 minutes);
* ``POST /v1/drafts/{id}/attention`` — ``{"token_indices": [...], "layers": "all"|[...], "heads":
  "mean"|[...]}``: attention shares and per-group patch-grid maps (the client maps them onto its CT);
* ``POST /v1/drafts/{id}/relevance`` — body: the draft's study again (`wire`, with ``token_indices``
  in its header; the server keeps no model-grid tensors after a draft and checks their digest):
  the selection's log-probability and per-group signed patch relevance (gradient × input), which the
  client projects onto its CT;
* ``POST /v1/drafts/{id}/dependence`` — ``{"token_indices": [...]}``: the selection's log-probability
  drop without each visual group (region dependence);
* ``POST /v1/drafts/{id}/findings`` — ``{"threshold": p|null, "contradiction_below": p|null}``: the
  findings check (per-finding probabilities, omission and contradiction flags of each section);
* ``GET /metrics`` — Prometheus: queue length, active drafts, tokens, tokens/s, batch sizes, latencies.

The server keeps nothing between drafts that a draft needs (finished drafts are kept only for their
explanation requests), so replicas behind a load balancer scale out. Nothing of a study but the model
grid tensors reaches it, and it logs no study content, identifier or token.
"""


import argparse
import asyncio
import base64
import collections
import dataclasses
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("reg2rg.engine.service")

API = "/v1"
DEFAULT_PORT = 8765
KEEP_SECONDS = 15 * 60


# ---- the token ---------------------------------------------------------------------------------------
def default_token_file() -> Path:
    """Where ``reg2rg-serve`` keeps a generated token and where clients look for one by default."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "reg2rg" / "server_token"


class TokenError(ValueError):
    """No usable token; the message says where one was looked for."""


def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path`` (surrounding whitespace dropped); `TokenError` if missing or empty."""
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise TokenError(f"{p}: cannot read the token file ({err.strerror or err})") from None
    if not token:
        raise TokenError(f"{p}: the token file is empty")
    return token


def resolve_token(token_file: str | None, create: bool = False) -> tuple[str, str]:
    """(token, where it came from): ``--token-file``, else ``REG2RG_SERVER_TOKEN``, else the default
    file (created with a random token, mode 0600, when ``create``)."""
    if token_file:
        return read_token_file(token_file), str(token_file)
    env = os.environ.get("REG2RG_SERVER_TOKEN", "").strip()
    if env:
        return env, "REG2RG_SERVER_TOKEN"
    path = default_token_file()
    if path.is_file():
        return read_token_file(path), str(path)
    if not create:
        raise TokenError(f"no server token: give --token-file F, set REG2RG_SERVER_TOKEN, or start reg2rg-serve "
                         f"on this computer once (it writes one to {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, f"{path} (new)"


# ---- the guard: authentication and request limits (plain ASGI, before any route runs) ------------------
class Guard:
    """Bearer token on every path but ``/health`` (constant-time comparison), body size and read-time
    limits. Answers 401 / 413 / 408 itself with a one-line JSON ``detail``."""

    def __init__(self, app, token: str, max_body_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self._expected = b"Bearer " + token.encode()
        self.max_body, self.read_timeout = max_body_bytes, read_timeout_s

    @staticmethod
    async def _reply(send, status: int, detail: str, extra=()) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        if not hmac.compare_digest(given, self._expected):
            return await self._reply(send, 401, "missing or wrong bearer token",
                                     [(b"www-authenticate", b'Bearer realm="reg2rg"')])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await self._reply(send, 400, "Content-Length is not a number")
        if declared > self.max_body:
            return await self._reply(send, 413, f"request body of {declared} bytes is above this server's limit "
                                                f"of {self.max_body} bytes")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            chunks: list[bytes] = []

            async def read() -> str:
                size = 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return "gone"
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        return "large"
                    chunks.append(chunk)
                    if not message.get("more_body"):
                        return "ok"

            try:
                status = await asyncio.wait_for(read(), self.read_timeout)
            except (asyncio.TimeoutError, TimeoutError):
                return await self._reply(send, 408, f"request body not received within {self.read_timeout:.0f} s")
            if status == "gone":
                return
            if status == "large":
                return await self._reply(send, 413, f"request body above this server's limit of {self.max_body} bytes")
            body = b"".join(chunks)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


# ---- metrics -------------------------------------------------------------------------------------------
class Metrics:
    """The Prometheus series of one server (its own registry, so tests can run several servers)."""

    def __init__(self, scheduler) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        Gauge("reg2rg_queue_length", "Drafts waiting for a place in the decode batch",
              registry=r).set_function(lambda: scheduler.waiting)
        Gauge("reg2rg_active_drafts", "Drafts in the decode batch", registry=r).set_function(lambda: scheduler.active)
        self.tokens = Counter("reg2rg_generated_tokens", "Tokens generated", registry=r)
        self.drafts = Counter("reg2rg_drafts", "Drafts ended, by outcome", ["outcome"], registry=r)
        self.rejected = Counter("reg2rg_rejected_requests", "Draft requests answered 4xx/503", ["status"], registry=r)
        self.ttft = Histogram("reg2rg_time_to_first_token_seconds", "Request received to first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.draft_seconds = Histogram("reg2rg_draft_seconds", "Request received to last token", registry=r,
                                       buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.step_seconds = Histogram("reg2rg_decode_step_seconds", "One batched decode step", registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.batch = Histogram("reg2rg_decode_batch_size", "Drafts per batched decode step", registry=r,
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        Gauge("reg2rg_tokens_per_second", "Tokens generated per second over the last 10 s",
              registry=r).set_function(self.tokens_per_second)

    def on_step(self, batch: int, seconds: float) -> None:
        self.step_seconds.observe(seconds)
        self.batch.observe(batch)

    def token(self) -> None:
        self.tokens.inc()
        now = time.monotonic()
        with self._lock:
            self._window.append((now, 1))
            while self._window and self._window[0][0] < now - 10:
                self._window.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - 10:
                self._window.popleft()
            return len(self._window) / 10.0


# ---- drafts kept for fetch / cancel / attention -------------------------------------------------------------
@dataclass
class _Draft:
    id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "running"                   # running | finished | failed
    result: object = None                    # DraftResult (its encoding slimmed for attention)
    payload: dict | None = None              # the finished event's data
    digest: str = ""                         # the study tensors' digest (relevance requests must match it)
    touched: float = field(default_factory=time.monotonic)


class DraftBook:
    """Running drafts and the last ``keep`` finished ones (each for at most `KEEP_SECONDS`)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._drafts: collections.OrderedDict[str, _Draft] = collections.OrderedDict()
        self._lock = threading.Lock()

    def new(self) -> _Draft:
        d = _Draft(uuid.uuid4().hex)
        with self._lock:
            self._drafts[d.id] = d
            self._prune()
        return d

    def get(self, draft_id: str) -> _Draft | None:
        with self._lock:
            self._prune()
            d = self._drafts.get(draft_id)
            if d is not None:
                d.touched = time.monotonic()
                self._drafts.move_to_end(draft_id)
            return d

    def _prune(self) -> None:
        now = time.monotonic()
        ended = [k for k, d in self._drafts.items() if d.state != "running"]
        for k in ended:
            if now - self._drafts[k].touched > KEEP_SECONDS:
                del self._drafts[k]
        ended = [k for k, d in self._drafts.items() if d.state != "running"]
        for k in ended[: max(0, len(ended) - self.keep)]:
            del self._drafts[k]

    def finish(self, d: _Draft, state: str) -> None:
        with self._lock:
            d.state, d.touched = state, time.monotonic()
            self._prune()

    @property
    def running(self) -> int:
        with self._lock:
            return sum(d.state == "running" for d in self._drafts.values())


def _release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise): after a burst of concurrent drafts the
    idle server returns to its baseline instead of keeping the burst's peak resident."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to do
        pass


def tune_malloc() -> None:
    """glibc settings for a long-running server with bursts of concurrent drafts: large blocks (the
    decoded study tensors, >= 1 MB) are mmapped and go back to the OS when freed, and two heap arenas
    are shared by the threads. Measured on the demo model: after bursts of 16 concurrent drafts the
    idle server stays ~115 MB above its loaded size instead of ~270 MB, and does not grow further."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)          # M_MMAP_THRESHOLD (a fixed value also stops its growth)
        libc.mallopt(-8, 2)                # M_ARENA_MAX
    except (OSError, AttributeError):      # not glibc
        pass


# ---- serialisation of events ------------------------------------------------------------------------------
def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def take_ready(first: bytes | None, events: "asyncio.Queue") -> tuple[bytes, bool]:
    """``first`` and every event already queued behind it, as one chunk for one write (a stream that fell
    behind catches up in one send instead of one per token); True when the end (None) was among them."""
    chunk, end = [], first is None
    if not end:
        chunk.append(first)
    while not end and not events.empty():
        item = events.get_nowait()
        end = item is None
        if not end:
            chunk.append(item)
    return b"".join(chunk), end


def finished_payload(result) -> dict:
    """What the ``finished`` event carries: `DraftResult.to_dict` plus what a client rebuilds it from."""
    d = result.to_dict()
    d.pop("study", None)                      # the server never knows the study's name
    d["token_ids"] = list(result.token_ids)
    d["prompt_ids"] = list(result.prompt_ids)
    prepared = result.prepared
    d["finding_probabilities"] = getattr(prepared, "finding_probabilities", None)
    return d


def _slim(result) -> None:
    """Drop the model-grid tensors from a kept result: attention, region dependence and the findings
    check need only the prompt's encoding; a relevance request sends the tensors again."""
    if result.prepared is not None:
        result.prepared = dataclasses.replace(result.prepared, inputs=None)


def _b64(arr) -> dict:
    import numpy as np

    a = np.ascontiguousarray(arr, dtype="<f4")
    return {"shape": list(a.shape), "dtype": "float32", "data": base64.b64encode(a.tobytes()).decode("ascii")}


# ---- the application -------------------------------------------------------------------------------------
def create_app(engine, token: str, *, max_body_bytes: int = 256 << 20, read_timeout_s: float = 60.0,
               max_new_tokens: int = 2048, max_queue: int = 64, draft_timeout_s: float = 900.0,
               keep_drafts: int = 32):
    """The ASGI application serving ``engine`` (a `batching.BatchingEngine`), wrapped in `Guard`."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel

    from starlette.concurrency import run_in_threadpool

    from ..attention import group_grid_maps
    from ..generation import EncodingDone, EncodingStarted, Finished, GenerationError, TokenEvent
    from .wire import CONTENT_TYPE, MAX_SELECTION, WireError, decode_request

    metrics = Metrics(engine.scheduler)
    engine.scheduler.on_step = metrics.on_step
    book = DraftBook(keep_drafts)
    info = engine.model_info()
    cfg = engine.config
    app = FastAPI(title="reg2rg-serve", version=info.get("version", "unknown"),
                  description="Reg2RG report drafting engine. Every route but /health needs a bearer token. "
                              "AI drafts for review by a radiologist; the demo model is not for clinical use.")

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/health", tags=["service"])
    def health():
        """The process is up (no authentication)."""
        return {"status": "ok"}

    @app.get(f"{API}/ready", tags=["service"])
    def ready():
        """The model is loaded and the decode thread runs."""
        ok = engine.scheduler.alive
        body = {"ready": ok, "active": engine.scheduler.active, "waiting": engine.scheduler.waiting}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get(f"{API}/model", tags=["model"])
    def model():
        """Name, version, weights digest, model card and layout of the served model, and the limits."""
        return {**info, "max_batch": engine.max_batch, "max_new_tokens": max_new_tokens,
                "max_body_bytes": max_body_bytes, "wire_format": CONTENT_TYPE}

    @app.get("/metrics", tags=["service"])
    def prometheus():
        """Prometheus exposition of the server's series."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def reject(status: int, detail: str):
        metrics.rejected.labels(str(status)).inc()
        raise HTTPException(status, detail)

    @app.post(f"{API}/drafts", tags=["drafts"], status_code=200,
              responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}})
    async def create_draft(request: Request):
        """Draft a report from a pre-processed study (body in the wire format); streams its events."""
        if request.headers.get("content-type", "").split(";")[0].strip() != CONTENT_TYPE:
            reject(415, f"the body must be {CONTENT_TYPE} (a pre-processed study)")
        body = await request.body()
        try:        # inflating and checking a study takes a while: off the event loop, other streams go on
            req = await asyncio.to_thread(decode_request, body, cfg.input_size, cfg.num_regions, max_new_tokens)
        except WireError as err:
            reject(422, str(err))
        del body
        if book.running >= max_queue:
            reject(503, f"the server is busy ({max_queue} drafts running or queued); try again shortly")
        draft = book.new()
        draft.digest = req.digest
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        received = time.perf_counter()

        def work() -> None:
            first = None
            outcome = "failed"
            try:
                for ev in engine.generate_inputs(req.inputs, req.regions, req.settings, draft.cancel):
                    if isinstance(ev, TokenEvent):
                        if first is None:
                            first = time.perf_counter()
                            metrics.ttft.observe(first - received)
                        metrics.token()
                        data = {"index": ev.index, "token_id": ev.token_id, "text": ev.text, "prob": ev.prob,
                                "entropy": ev.entropy, "top": [list(t) for t in ev.top]}
                        loop.call_soon_threadsafe(events.put_nowait, _sse("token", data))
                    elif isinstance(ev, EncodingStarted):
                        loop.call_soon_threadsafe(events.put_nowait, _sse("encoding_started", {"regions": list(ev.regions)}))
                    elif isinstance(ev, EncodingDone):
                        data = {"prompt_tokens": ev.prompt_tokens, "seconds": ev.seconds,
                                "slot_regions": {str(k): v for k, v in ev.slot_regions.items()}}
                        loop.call_soon_threadsafe(events.put_nowait, _sse("encoding_done", data))
                    elif isinstance(ev, Finished):
                        payload = finished_payload(ev.result)
                        _slim(ev.result)
                        draft.result, draft.payload = ev.result, payload
                        outcome = ev.result.stop_reason
                        metrics.draft_seconds.observe(time.perf_counter() - received)
                        loop.call_soon_threadsafe(events.put_nowait, _sse("finished", payload))
            except GenerationError as err:
                loop.call_soon_threadsafe(events.put_nowait, _sse("error", {"status": 422, "detail": str(err)}))
            except Exception as err:  # noqa: BLE001 - the client gets one line, the server goes on
                logger.warning("draft %s failed: %s", draft.id, type(err).__name__)
                detail = str(err) if isinstance(err, MemoryError) else f"the engine failed ({type(err).__name__})"
                loop.call_soon_threadsafe(events.put_nowait, _sse("error", {"status": 500, "detail": detail}))
            finally:
                metrics.drafts.labels(outcome).inc()
                req.inputs = None                      # the model-grid tensors are not needed any more
                book.finish(draft, "finished" if draft.payload is not None else "failed")
                loop.call_soon_threadsafe(events.put_nowait, None)
                if book.running == 0:                  # idle: once the last streams have closed, trim
                    threading.Timer(0.5, lambda: book.running == 0 and _release_memory()).start()

        worker = threading.Thread(target=work, name=f"draft-{draft.id[:8]}", daemon=True)

        async def stream():
            deadline = loop.time() + draft_timeout_s
            try:
                yield _sse("accepted", {"id": draft.id})
                worker.start()
                while True:
                    try:
                        item = await asyncio.wait_for(events.get(), timeout=max(0.1, deadline - loop.time()))
                    except (asyncio.TimeoutError, TimeoutError):
                        draft.cancel.set()            # over the time limit: stop; "finished" (cancelled) follows
                        deadline = loop.time() + 60
                        continue
                    chunk, end = take_ready(item, events)
                    if chunk:
                        yield chunk
                    if end:
                        return
            finally:
                if draft.state == "running":
                    draft.cancel.set()                # the reader went away: free its place in the batch

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post(f"{API}/drafts/{{draft_id}}/cancel", tags=["drafts"], status_code=202)
    def cancel_draft(draft_id: str):
        """Stop a running draft after its current token (its stream still ends with ``finished``)."""
        d = book.get(draft_id)
        if d is None:
            raise HTTPException(404, f"no draft {draft_id} on this server")
        d.cancel.set()
        return {"id": draft_id, "state": d.state}

    @app.get(f"{API}/drafts/{{draft_id}}", tags=["drafts"])
    def fetch_draft(draft_id: str):
        """A draft's state and, once finished, the whole draft (as the ``finished`` event)."""
        d = book.get(draft_id)
        if d is None:
            raise HTTPException(404, f"no draft {draft_id} on this server (unknown, expired, or the server restarted)")
        return {"id": draft_id, "state": d.state, "result": d.payload}

    def finished_draft(draft_id: str, what: str) -> _Draft:
        d = book.get(draft_id)
        if d is None or d.result is None:
            raise HTTPException(404, f"no finished draft {draft_id} on this server (unknown, expired, or the server "
                                     f"restarted): regenerate to see {what}")
        return d

    def explaining(run):
        """``run()`` (an engine explanation, under the engine's lock); a bad selection is 422."""
        try:
            return run()
        except (GenerationError, IndexError) as err:
            raise HTTPException(422, str(err)) from None

    class AttentionRequest(BaseModel):
        token_indices: list[int]
        layers: str | list[int] = "all"
        heads: str | list[int] = "mean"

    def check_selection(token_indices: list[int]) -> None:
        if not token_indices or len(token_indices) > MAX_SELECTION:
            raise HTTPException(422, f"token_indices: give 1 to {MAX_SELECTION} generated-token indices")

    @app.post(f"{API}/drafts/{{draft_id}}/attention", tags=["explanations"])
    def attention(draft_id: str, body: AttentionRequest):
        """Where the model looked for the selected tokens: shares and per-group patch-grid maps."""
        d = finished_draft(draft_id, "attention")
        if (isinstance(body.layers, str) and body.layers != "all") or (isinstance(body.heads, str) and body.heads != "mean"):
            raise HTTPException(422, "layers must be 'all' or a list of indices; heads 'mean' or a list of indices")
        check_selection(body.token_indices)
        am = explaining(lambda: engine.attention_map(d.result, body.token_indices, body.layers, body.heads))
        prepared = d.result.prepared
        latent = {g: t.float().cpu().numpy() for g, t in prepared.latent_patch.items()}
        maps = group_grid_maps(am.visual_weights, latent, prepared.patch_grid)
        return {"token_indices": list(am.token_indices), "layers": list(am.layers),
                "heads": am.heads if isinstance(am.heads, str) else list(am.heads), "shares": am.shares,
                "other_share": am.other_share,
                "visual_weights": {g: [float(x) for x in w] for g, w in am.visual_weights.items()},
                "grid_maps": {g: _b64(m) for g, m in maps.items()}}

    @app.post(f"{API}/drafts/{{draft_id}}/relevance", tags=["explanations"],
              openapi_extra={"requestBody": {"required": True, "content": {CONTENT_TYPE: {}}}})
    async def relevance(draft_id: str, request: Request):
        """The evidence in the CT for the selected tokens (gradient × input on every ViT patch). Body: the
        draft's study again in the wire format, with ``token_indices`` in its header. Answer: the
        selection's log-probability and each group's signed (h, w, d) patch relevance, base64 float32
        (``'global'``, each region's crop, ``'mask:<region>'``); the client projects them onto its CT."""
        d = finished_draft(draft_id, "a relevance map")
        if request.headers.get("content-type", "").split(";")[0].strip() != CONTENT_TYPE:
            raise HTTPException(415, f"the body must be {CONTENT_TYPE} (the draft's study, with token_indices)")
        body = await request.body()

        def run():             # decoding the tensors and the passes take a while: off the event loop
            t0 = time.perf_counter()
            try:
                req = decode_request(body, cfg.input_size, cfg.num_regions, max_new_tokens)
            except WireError as err:
                raise HTTPException(422, str(err)) from None
            if req.token_indices is None:
                raise HTTPException(422, "token_indices: give the selection (generated-token indices) in the header")
            if req.regions != d.result.prepared.slots or req.digest != d.digest:
                raise HTTPException(422, f"the study sent is not the one draft {draft_id} was drafted from "
                                         f"(its tensors or regions differ)")
            result = dataclasses.replace(d.result, prepared=dataclasses.replace(d.result.prepared, inputs=req.inputs))
            idx, patches, log_prob = explaining(lambda: engine.relevance_patches(result, req.token_indices))
            return {"token_indices": idx, "log_prob": log_prob, "seconds": time.perf_counter() - t0,
                    "method": "gradient_x_input", "patch_relevance": {g: _b64(m) for g, m in patches.items()}}

        return await run_in_threadpool(run)

    class SelectionRequest(BaseModel):
        token_indices: list[int]

    @app.post(f"{API}/drafts/{{draft_id}}/dependence", tags=["explanations"])
    def dependence(draft_id: str, body: SelectionRequest):
        """How many nats the selection's log-probability drops without the global image or each region
        slot (all masked in one batched teacher-forced pass)."""
        d = finished_draft(draft_id, "the region dependence")
        check_selection(body.token_indices)
        dep = explaining(lambda: engine.region_dependence(d.result, body.token_indices))
        return {**dep.to_dict(), "seconds": dep.seconds}

    class FindingsRequest(BaseModel):
        threshold: float | None = None
        contradiction_below: float | None = None

    @app.post(f"{API}/drafts/{{draft_id}}/findings", tags=["explanations"])
    def findings(draft_id: str, body: FindingsRequest):
        """The findings check: the model's probability of each CT-RATE finding in each drafted section,
        with omission (unreported, p >= threshold) and contradiction (reported, p < contradiction_below)
        flags."""
        d = finished_draft(draft_id, "the findings check")
        for name in ("threshold", "contradiction_below"):
            value = getattr(body, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise HTTPException(422, f"{name} must be a probability between 0 and 1, got {value}")
        result = dataclasses.replace(d.result)            # the check is stored on the result: not the kept one
        check = explaining(lambda: engine.finding_check(result, body.threshold, body.contradiction_below))
        return check.to_dict()

    return Guard(app, token, max_body_bytes, read_timeout_s)


# ---- the command ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reg2rg-serve",
        description="Serve the Reg2RG report engine over HTTP for the viewer and reg2rg-generate --server "
                    "(bearer-token authentication, batched decoding across readers). The embedded demo model "
                    "is trained on synthetic phantoms: not for clinical use.")
    m = p.add_argument_group("model (choose one)")
    m.add_argument("--model", metavar="DIR", help="model folder")
    m.add_argument("--published", metavar="FILE", help="the published Reg2RG checkpoint (needs --llm)")
    m.add_argument("--llm", metavar="DIR", help="local LLaMA-2-7B-chat folder (published checkpoint or LoRA model)")
    m.add_argument("--demo", action="store_true", help="the embedded demo model")
    m.add_argument("--device", default="auto", help="auto (CUDA if available, else the CPU), cpu, cuda, cuda:1")
    m.add_argument("--precision", "--dtype", dest="dtype", default=None, metavar="PRECISION",
                   choices=("auto", "fp32", "bf16", "reference", "fp16", "float32", "bfloat16", "float16"),
                   help="auto (default): fp32 on the CPU; on CUDA reference for --published, else bf16")
    n = p.add_argument_group("network and security")
    n.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 for every interface)")
    n.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    n.add_argument("--token-file", metavar="F",
                   help="file holding the bearer token (default: $REG2RG_SERVER_TOKEN, else "
                        f"{default_token_file()}, created with a random token if missing)")
    n.add_argument("--ssl-keyfile", metavar="PEM", help="TLS private key (serve https; with --ssl-certfile)")
    n.add_argument("--ssl-certfile", metavar="PEM", help="TLS certificate chain")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-batch", type=int, default=8, help="drafts decoded together per step (1: one at a time)")
    lim.add_argument("--max-queue", type=int, default=64, help="drafts running or queued before 503 busy")
    lim.add_argument("--max-body-mb", type=float, default=256, help="largest request body, MB (default 256)")
    lim.add_argument("--max-new-tokens", type=int, default=2048, help="largest max_new_tokens a request may ask")
    lim.add_argument("--read-timeout", type=float, default=60, help="seconds to receive a request body")
    lim.add_argument("--draft-timeout", type=float, default=900, help="seconds a draft may run before it is stopped")
    lim.add_argument("--keep-drafts", type=int, default=32,
                     help="finished drafts kept for fetch and explanation requests (15 minutes at most)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``reg2rg-serve``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    if sum(bool(x) for x in (args.model, args.published, args.demo)) != 1:
        print("reg2rg-serve: choose exactly one of --model DIR, --published FILE --llm DIR or --demo", file=sys.stderr)
        return 2
    if args.published and not args.llm:
        print("reg2rg-serve: --published needs --llm (the local LLaMA-2-7B-chat folder)", file=sys.stderr)
        return 2
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        print("reg2rg-serve: --ssl-keyfile and --ssl-certfile go together", file=sys.stderr)
        return 2
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as err:
        print(f"reg2rg-serve: {err.name} is not installed; install the server extra: pip install 'reg2rg-viewer[serve]'",
              file=sys.stderr)
        return 2
    from ..checkpoint import CheckpointError
    from ..generation import EngineOutOfMemory, GenerationError, ModelFolderError, ReportEngine
    from ..model.config import ConfigError
    from ..batching import BatchingEngine

    try:
        token, source = resolve_token(args.token_file, create=True)
        if args.max_batch < 1:
            raise GenerationError(f"--max-batch must be at least 1, got {args.max_batch}")
        if args.published:
            engine = ReportEngine.from_published(args.published, args.llm, args.device, args.dtype)
        else:
            engine = ReportEngine.load(None if args.demo else args.model, args.device, args.dtype, llm_path=args.llm)
        batching = BatchingEngine(engine, max_batch=args.max_batch)
        app = create_app(batching, token, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                         read_timeout_s=args.read_timeout, max_new_tokens=args.max_new_tokens,
                         max_queue=args.max_queue, draft_timeout_s=args.draft_timeout, keep_drafts=args.keep_drafts)
    except (TokenError, GenerationError, ModelFolderError, EngineOutOfMemory, CheckpointError, ConfigError,
            OSError) as err:
        print(f"reg2rg-serve: {err}", file=sys.stderr)
        return 2
    import uvicorn

    tune_malloc()
    scheme = "https" if args.ssl_certfile else "http"
    info = batching.model_info()
    print(f"reg2rg-serve: {info['name']} ({info['digest'][:19]}…) on {scheme}://{args.host}:{args.port} "
          f"(max batch {args.max_batch}); token from {source}", file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.ssl_certfile:
        print("reg2rg-serve: warning: listening beyond this computer without TLS; put it behind an https reverse "
              "proxy or give --ssl-keyfile/--ssl-certfile", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, ssl_keyfile=args.ssl_keyfile,
                    ssl_certfile=args.ssl_certfile, timeout_keep_alive=30)
    finally:
        batching.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
