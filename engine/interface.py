"""The one engine interface the drafting code talks to, wherever the model runs.

`ReportEngine` (the model in this process), `batching.BatchingEngine` (this process, decode steps
shared by concurrent drafts) and `service.client.RemoteEngine` (a ``reg2rg-serve`` over HTTP) all
satisfy `DraftingEngine`: the same `generation.GenerationEvent` stream (`EncodingStarted`,
`EncodingDone`, `TokenEvent`…, `Finished` with a `DraftResult`), the same cancel (a
`threading.Event` checked between tokens), the same explanations (attention and relevance maps,
region dependence, the findings check). The viewer's drafting code and
``reg2rg-generate`` cannot tell them apart.

A remote engine can fail half-way (network loss, server restart, 401, 5xx): it then raises
`EngineUnavailable` carrying the draft so far (``partial``, ``stop_reason == "interrupted"``), so the
caller keeps it, marks it stopped and offers a retry.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - types only
    from .attention import AttentionMap
    from .explain.findings import FindingsCheck
    from .explain.relevance import RegionDependence, RelevanceMap
    from .generation import DraftResult, GenerationEvent, GenerationSettings


class EngineUnavailable(RuntimeError):
    """The engine could not be reached or failed while drafting; the message says what happened in
    the reader's words. ``partial`` is the draft so far (a `DraftResult` whose ``stop_reason`` is
    ``"interrupted"``), or None when no token had arrived. ``retry`` says whether trying again can help
    (False for a refused token or a request the engine rejects)."""

    def __init__(self, message: str, partial: "DraftResult | None" = None, retry: bool = True) -> None:
        super().__init__(message)
        self.partial = partial
        self.retry = retry


@runtime_checkable
class DraftingEngine(Protocol):
    """What the drafting code needs from an engine (see the module docstring)."""

    def generate(self, study, regions: Sequence[str] | None = None,
                 settings: "GenerationSettings" = ...,
                 cancel: threading.Event | None = None) -> "Iterator[GenerationEvent]":
        """Stream the draft of ``study``; ends with `Finished` (also after a cancel)."""
        ...

    def draft(self, study, regions: Sequence[str] | None = None,
              settings: "GenerationSettings" = ...) -> "DraftResult":
        """Generate without streaming."""
        ...

    def attention_map(self, result: "DraftResult", token_indices: Sequence[int] | int,
                      layers: str | Sequence[int] = "all", heads: str | Sequence[int] = "mean") -> "AttentionMap":
        """Where the model looked for the selected generated tokens of ``result`` (shares + CT heatmap)."""
        ...

    def relevance_map(self, result: "DraftResult", token_indices: Sequence[int] | int) -> "RelevanceMap":
        """Gradient × input evidence in the CT for the selected generated tokens (the viewer's default map)."""
        ...

    def region_dependence(self, result: "DraftResult", token_indices: Sequence[int] | int) -> "RegionDependence":
        """How many nats the selection's log-probability loses without each visual group."""
        ...

    def finding_check(self, result: "DraftResult", threshold: float | None = None,
                      contradiction_below: float | None = None) -> "FindingsCheck":
        """Per-finding probabilities and omission/contradiction flags; stored in ``result.findings_check``."""
        ...

    def model_info(self) -> dict:
        """Name, version, digest, model card, ``layers`` and ``heads`` of the model."""
        ...
