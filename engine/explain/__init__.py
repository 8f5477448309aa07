"""Explanations of a draft a radiologist can check: relevance maps and region dependence for a selection
of generated tokens (`relevance`), per-finding probabilities with omission / contradiction alerts
(`findings`). Raw attention maps stay in `reg2rg.engine.attention`. `ReportEngine` offers all of them
as methods (which hold its lock); the viewer never reaches into the model."""

from .findings import DEFAULT_OMISSION_THRESHOLD, FindingProbability, FindingsCheck, SectionFindings
from .relevance import RegionDependence, RelevanceMap

__all__ = ["DEFAULT_OMISSION_THRESHOLD", "FindingProbability", "FindingsCheck", "RegionDependence",
           "RelevanceMap", "SectionFindings"]
