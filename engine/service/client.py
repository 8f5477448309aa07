"""`RemoteEngine`: a ``reg2rg-serve`` used exactly like a `ReportEngine` (`interface.DraftingEngine`).

The study is pre-processed here (the geometry, the study's name and every header stay on this
computer), sent in the `wire` format, and the server's events come back as the same
`GenerationEvent`s; the `DraftResult` is rebuilt with the engine's own `result_from_tokens`, so
sections, grounding and confidences are computed by the same code. The explanations the viewer asks
for are computed by the server and rebuilt here as the same objects: attention and relevance maps come
back as patch-grid maps projected onto the local CT with the local geometry (a relevance request sends
the draft's study tensors again: the server keeps none after a draft), region dependence and the
findings check as their numbers.

Failures become `interface.EngineUnavailable` with one line for the reader and, when tokens had
arrived, the draft so far (``stop_reason == "interrupted"``): connection refused or lost, the server
restarting, 401 (token), 4xx (the request), 5xx (the server).
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from ..attention import AttentionMap, grid_maps_to_ct
from ..explain.findings import FindingsCheck
from ..explain.relevance import RegionDependence, RelevanceMap, relevance_from_patches
from ..confidence import TokenConfidence
from ..generation import (DraftResult, EncodingDone, EncodingStarted, Finished, GenerationError, GenerationEvent,
                          GenerationSettings, PreparedStudy, TokenEvent, run_to_draft, finish_result, result_from_tokens, select_regions,
                          study_orientation_for)
from ..interface import EngineUnavailable
from ..preprocess import preprocess
from .server import API, resolve_token
from .wire import CONTENT_TYPE, encode_request, with_selection

logger = logging.getLogger("reg2rg.engine.service.client")


def _token_from_dict(d: dict) -> TokenConfidence:
    top = d.get("top") or []
    return TokenConfidence(index=int(d["index"]), token_id=int(d["token_id"]), text=d["text"], start=int(d["start"]),
                           end=int(d["end"]), prob=float(d["prob"]), entropy=float(d["entropy"]),
                           top=tuple((t["text"], float(t["prob"])) for t in top),
                           top_ids=tuple(int(t["token_id"]) for t in top))


def _detail(response) -> str:
    try:
        return str(response.json().get("detail", "")) or response.reason_phrase
    except (ValueError, AttributeError):
        return response.reason_phrase


def _array(m: dict) -> np.ndarray:
    """A base64 float32 array of a server answer."""
    return np.frombuffer(base64.b64decode(m["data"]), dtype="<f4").reshape(m["shape"])


def _local_prepared(inputs, slot_regions: dict, prompt_ids, findings) -> PreparedStudy:
    """What this computer keeps of a remote draft's study: its pre-processed inputs and geometry (the
    encoding itself stays on the server, so ``prompt_embeds`` is None and only the server explains)."""
    return PreparedStudy(inputs=inputs, slot_regions=dict(slot_regions), prompt_ids=list(prompt_ids),
                         prompt_embeds=None, latent_patch={}, patch_grid=(0, 0, 0), finding_probabilities=findings)


class RemoteEngine:
    """A report engine on a ``reg2rg-serve`` at ``url`` (``http(s)://host:port``).

    ``token``: the bearer token (default: ``token_file``, else ``REG2RG_SERVER_TOKEN``, else the
    file a local ``reg2rg-serve`` writes). ``timeout``: seconds to connect and between two events.
    ``verify``: TLS certificate check (True, False or a CA bundle path)."""

    def __init__(self, url: str, token: str | None = None, token_file: str | None = None, timeout: float = 120.0,
                 verify=True) -> None:

        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise GenerationError(f"{url}: the server URL must start with http:// or https://")
        self.token = token if token else resolve_token(token_file, create=False)[0]
        self.timeout = timeout
        self._verify = verify
        self._http = self._new_http()
        self._info: dict | None = None
        # the request bodies of the last finished drafts: a relevance request sends the study again
        self._bodies: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def _new_http(self):
        import httpx

        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
                            timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)), verify=self._verify)

    def __repr__(self) -> str:                  # never shows the token
        return f"RemoteEngine({self.url!r})"

    # what callers read off an engine
    @property
    def model_dir(self):
        return None

    def describe(self) -> str:
        """A short name for the panel: the model's name and the server."""
        info = self._info or {}
        return f"{info.get('name', 'model')} on {self.url}"

    def close(self) -> None:
        self._http.close()

    # ---- requests ---------------------------------------------------------------------------------------
    def _fail(self, exc, what: str, partial: DraftResult | None = None) -> EngineUnavailable:
        import httpx

        kept = f"; the draft so far ({len(partial.tokens)} tokens) is kept, marked stopped" if partial and partial.tokens else ""
        if isinstance(exc, httpx.TransportError):
            # pooled connections to a server that went away are dead: the next try starts afresh
            old, self._http = self._http, self._new_http()
            old.close()
        if isinstance(exc, httpx.ConnectError):
            msg, retry = f"cannot reach the engine server at {self.url} ({what}): is reg2rg-serve running?", True
        elif isinstance(exc, httpx.TimeoutException):
            msg, retry = f"the engine server at {self.url} did not answer in {self.timeout:.0f} s ({what})", True
        elif isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            msg, retry = f"the connection to the engine server at {self.url} was lost ({what}): it may have restarted", True
        elif isinstance(exc, httpx.HTTPError):
            msg, retry = f"the engine server at {self.url} failed ({what}): {type(exc).__name__}", True
        else:
            raise exc
        return EngineUnavailable(msg + kept + ("; try again" if retry else ""), partial, retry)

    def _status_error(self, response, what: str, partial: DraftResult | None = None) -> EngineUnavailable:
        code = response.status_code
        detail = _detail(response)
        kept = f"; the draft so far ({len(partial.tokens)} tokens) is kept, marked stopped" if partial and partial.tokens else ""
        if code == 401:
            return EngineUnavailable(f"the engine server at {self.url} refused the token (401): check --token-file or "
                                     f"REG2RG_SERVER_TOKEN{kept}", partial, retry=False)
        if code in (503, 502, 504):
            return EngineUnavailable(f"the engine server at {self.url} is busy or restarting ({code}: {detail}){kept}; "
                                     f"try again", partial, retry=True)
        if 400 <= code < 500:
            return EngineUnavailable(f"the engine server at {self.url} rejected the {what} ({code}: {detail}){kept}",
                                     partial, retry=False)
        return EngineUnavailable(f"the engine server at {self.url} failed ({code}: {detail}){kept}; try again",
                                 partial, retry=True)

    def _get(self, path: str, what: str):
        import httpx

        try:
            r = self._http.get(path)
        except httpx.HTTPError as exc:
            raise self._fail(exc, what) from None
        if r.status_code != 200:
            raise self._status_error(r, what)
        return r.json()

    def health(self) -> bool:
        """True when ``GET /health`` answers (no token needed)."""
        import httpx

        try:
            return self._http.get("/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def model_info(self) -> dict:
        """``GET /v1/model`` (cached): name, version, digest, model card, layout and server limits."""
        if self._info is None:
            self._info = self._get(f"{API}/model", "model information request")
        return dict(self._info)

    @property
    def layout(self) -> tuple[int, int]:
        """(layers, heads) of the served language model (what ``attention_map`` indexes)."""
        info = self.model_info()
        return int(info["layers"]), int(info["heads"])

    def attention_layout(self) -> tuple[int, int]:
        return self.layout

    def model_identity(self) -> dict:
        """The served model's identity for a draft's provenance (`report.provenance.provenance_for`)."""
        info = self.model_info()
        return {k: info.get(k, "") for k in ("name", "version", "digest", "validated", "validation", "path")}

    def cancel_draft(self, draft_id: str) -> None:
        """``POST /v1/drafts/{id}/cancel`` (errors ignored: a lost server has stopped the draft anyway)."""
        import httpx

        try:
            self._http.post(f"{API}/drafts/{draft_id}/cancel")
        except httpx.HTTPError:
            pass

    # ---- drafting -------------------------------------------------------------------------------------------
    def generate(self, study, regions: Sequence[str] | None = None,
                 settings: GenerationSettings = GenerationSettings(),
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """As `ReportEngine.generate`, the model on the server. Raises `EngineUnavailable` (with the
        draft so far) when the server cannot be reached or fails half-way."""
        settings.validate()
        info = self.model_info()
        chosen = select_regions(study, regions, int(info["num_regions"]))
        yield EncodingStarted(tuple(chosen))
        t0 = time.perf_counter()
        orientation = info.get("orientation")
        inputs = preprocess(study, tuple(info["input_size"]), study_orientation_for(study, orientation), chosen)
        placed = [r for r in chosen if r in inputs.regions]
        body = encode_request(inputs, placed, settings)
        for event in self._stream(body, inputs, placed, settings, cancel, study, t0):
            if isinstance(event, Finished):
                finish_result(event.result, study, inputs, chosen, orientation)
            yield event

    def _stream(self, body: bytes, inputs, chosen, settings, cancel, study, t0) -> Iterator[GenerationEvent]:
        import httpx

        state = {"id": None, "done": False}
        streamed: list[TokenConfidence] = []
        text_parts: list[str] = []
        slot_regions = {j: r for j, r in enumerate(chosen)}

        def partial() -> DraftResult | None:
            if not streamed:
                return None
            r = result_from_tokens("".join(text_parts), streamed, slot_regions, settings, "interrupted",
                                   study_name=study.name, prepared=_local_prepared(inputs, slot_regions, [], None),
                                   affine=np.asarray(study.affine, dtype=np.float64))
            finish_result(r, study, inputs, list(slot_regions.values()), (self._info or {}).get("orientation"))
            return r

        def watch() -> None:             # Stop while the server encodes (no event arrives then) still cancels
            while not state["done"]:
                if cancel is not None and cancel.wait(0.1):
                    if state["id"] is not None:
                        self.cancel_draft(state["id"])
                        return
                elif cancel is None:
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with self._http.stream("POST", f"{API}/drafts", content=body,
                                   headers={"Content-Type": CONTENT_TYPE}) as response:
                if response.status_code != 200:
                    response.read()
                    raise self._status_error(response, "draft request")
                event = None
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                        continue
                    if not line.startswith("data:"):
                        continue
                    data = json.loads(line[5:])
                    if event == "accepted":
                        state["id"] = data["id"]
                    elif event == "encoding_done":
                        slot_regions = {int(k): v for k, v in data["slot_regions"].items()}
                        yield EncodingDone(int(data["prompt_tokens"]), time.perf_counter() - t0, dict(slot_regions))
                    elif event == "token":
                        start = sum(len(t) for t in text_parts)
                        text_parts.append(data["text"])
                        top = tuple((t, float(p)) for t, p in data["top"])
                        streamed.append(TokenConfidence(len(streamed), int(data["token_id"]), data["text"], start,
                                                        start + len(data["text"]), float(data["prob"]),
                                                        float(data["entropy"]), top))
                        yield TokenEvent(int(data["index"]), int(data["token_id"]), data["text"], float(data["prob"]),
                                         float(data["entropy"]), top)
                    elif event == "finished":
                        self._keep_body(state["id"], body)
                        yield Finished(self._result(data, study, inputs, settings, state["id"], t0))
                        return
                    elif event == "error":
                        code = int(data.get("status", 500))
                        p = partial()
                        kept = f"; the draft so far ({len(p.tokens)} tokens) is kept, marked stopped" if p else ""
                        raise EngineUnavailable(f"the engine server at {self.url} could not draft this study "
                                                f"({code}: {data.get('detail', '')}){kept}", p, retry=code >= 500)
                # the stream ended without "finished": the server went away mid-draft
                raise EngineUnavailable(f"the engine server at {self.url} closed the draft before it was finished "
                                        f"(it may have restarted); the draft so far is kept, marked stopped; try again",
                                        partial(), retry=True)
        except httpx.HTTPError as exc:
            raise self._fail(exc, "while drafting", partial()) from None
        finally:
            state["done"] = True

    def _result(self, data: dict, study, inputs, settings, draft_id, t0) -> DraftResult:
        tokens = [_token_from_dict(t) for t in data["tokens"]]
        slot_regions = {int(k): v for k, v in data["slot_regions"].items()}
        timings = dict(data.get("timings") or {})
        timings["round_trip_s"] = time.perf_counter() - t0
        result = result_from_tokens(data["text"], tokens, slot_regions, settings, data["stop_reason"],
                                    seed=data.get("seed"), study_name=study.name,
                                    prompt_ids=list(data.get("prompt_ids") or []), timings=timings,
                                    prepared=_local_prepared(inputs, slot_regions, data.get("prompt_ids") or [],
                                                             data.get("finding_probabilities")),
                                    affine=np.asarray(study.affine, dtype=np.float64), remote_draft=draft_id)
        return result

    def draft(self, study, regions: Sequence[str] | None = None,
              settings: GenerationSettings = GenerationSettings()) -> DraftResult:
        """Generate without streaming; returns the `DraftResult`."""
        return run_to_draft(self.generate(study, regions, settings))

    def fetch(self, draft_id: str) -> dict:
        """``GET /v1/drafts/{id}``: the state of a draft and, once finished, its data."""
        return self._get(f"{API}/drafts/{draft_id}", "draft fetch")

    # ---- explanations ---------------------------------------------------------------------------------------
    KEEP_BODIES = 4

    def _keep_body(self, draft_id: str | None, body: bytes) -> None:
        if draft_id is None:
            return
        self._bodies[draft_id] = body
        while len(self._bodies) > self.KEEP_BODIES:
            self._bodies.popitem(last=False)

    @staticmethod
    def _draft_of(result: DraftResult) -> str:
        if result.remote_draft is None or result.geometry is None:
            raise GenerationError("this result carries no finished draft of this server: regenerate it to explain it")
        return result.remote_draft

    @staticmethod
    def _selection(token_indices: Sequence[int] | int) -> list[int]:
        return [int(token_indices)] if isinstance(token_indices, int) else [int(i) for i in token_indices]

    def _explain(self, result: DraftResult, route: str, what: str, **request) -> dict:
        """POST ``/v1/drafts/{id}/<route>`` for ``result``'s server draft; a selection the server cannot
        explain (422) is a `GenerationError`, every other failure an `EngineUnavailable`, one line each."""
        import httpx

        path = f"{API}/drafts/{self._draft_of(result)}/{route}"
        try:
            r = self._http.post(path, **request)
        except httpx.HTTPError as exc:
            raise self._fail(exc, what) from None
        if r.status_code == 422:
            raise GenerationError(_detail(r))
        if r.status_code != 200:
            raise self._status_error(r, what)
        return r.json()

    def attention_map(self, result: DraftResult, token_indices: Sequence[int] | int,
                      layers: str | Sequence[int] = "all", heads: str | Sequence[int] = "mean") -> AttentionMap:
        """As `ReportEngine.attention_map`: the server computes the attention, this computer maps it
        onto its own CT (the geometry never left it)."""
        payload = {"token_indices": self._selection(token_indices),
                   "layers": layers if isinstance(layers, str) else [int(x) for x in layers],
                   "heads": heads if isinstance(heads, str) else [int(x) for x in heads]}
        d = self._explain(result, "attention", "attention request", json=payload)
        maps = {g: _array(m) for g, m in d["grid_maps"].items()}
        heatmap = grid_maps_to_ct(maps, result.geometry)
        return AttentionMap(token_indices=tuple(d["token_indices"]), layers=tuple(d["layers"]),
                            heads=d["heads"] if isinstance(d["heads"], str) else tuple(d["heads"]),
                            shares={k: float(v) for k, v in d["shares"].items()}, other_share=float(d["other_share"]),
                            heatmap=heatmap, affine=result.affine if result.affine is not None else np.eye(4),
                            visual_weights={g: np.asarray(w, dtype=np.float32) for g, w in d["visual_weights"].items()})

    def relevance_map(self, result: DraftResult, token_indices: Sequence[int] | int) -> RelevanceMap:
        """As `ReportEngine.relevance_map`: the server runs the model's forward and backward pass on the
        draft's study tensors (sent again: it keeps none) and answers each patch's relevance; this
        computer projects it onto its own CT (`explain.relevance.relevance_from_patches`)."""
        t0 = time.perf_counter()
        draft_id = self._draft_of(result)
        idx = self._selection(token_indices)
        body = self._bodies.get(draft_id)
        if body is None:            # an older draft: encode its tensors again (the same bytes)
            body = encode_request(result.inputs, result.prepared.slots, result.settings)
        d = self._explain(result, "relevance", "relevance request", content=with_selection(body, idx),
                          headers={"Content-Type": CONTENT_TYPE})
        patches = {g: _array(m) for g, m in d["patch_relevance"].items()}
        return relevance_from_patches(d["token_indices"], patches, result.inputs, result.affine, d["log_prob"],
                                      time.perf_counter() - t0)

    def region_dependence(self, result: DraftResult, token_indices: Sequence[int] | int) -> RegionDependence:
        """As `ReportEngine.region_dependence`, computed by the server."""
        d = self._explain(result, "dependence", "region dependence request",
                          json={"token_indices": self._selection(token_indices)})
        return RegionDependence.from_dict(d)

    def finding_check(self, result: DraftResult, threshold: float | None = None,
                      contradiction_below: float | None = None) -> FindingsCheck:
        """As `ReportEngine.finding_check`, computed by the server; also stored in ``result.findings_check``."""
        d = self._explain(result, "findings", "findings check request",
                          json={"threshold": threshold, "contradiction_below": contradiction_below})
        check = FindingsCheck.from_dict(d)
        result.findings_check = check
        return check


def connect(url: str, token_file: str | None = None, timeout: float = 120.0) -> RemoteEngine:
    """A `RemoteEngine` for ``url`` with the token from ``token_file`` / ``REG2RG_SERVER_TOKEN`` / the
    local server's file; checks the server and the token at once (``GET /v1/model``)."""
    engine = RemoteEngine(url, token_file=token_file, timeout=timeout)
    engine.model_info()
    return engine


__all__ = ["RemoteEngine", "connect", "EngineUnavailable"]
