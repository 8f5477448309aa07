"""Controls for measuring whether a model's words come from the image.

The **blind control** is the same model with every global-image and region token of the prompt replaced
by zeros (the text, the markers and the slot structure stay): what it writes, it writes from the text
alone. A finding the model names and its blind control does not is one the model read from the image.

For a model whose ``fc`` input is standardised per region (``projector_norm="region"``), zero tokens would be
far outside what it was trained on (every input it saw was ``fc`` of a standardised feature: measured, such a
blind draft is not text at all — "mm Heart Heart …"). Its blind control gives ``fc`` a zero *standardised* input
instead — the average volume of each region's kind, i.e. ``fc``'s bias — for the global and region latent tokens,
and keeps the mask tokens, which come from the region masks, not from the CT: it reads the anatomy's outline but
no CT intensity. That control is conservative for findings that change a mask (an enlarged heart enlarges the
heart mask): what the model names and this control does not, it read from the CT voxels.
"""

from __future__ import annotations

import torch

from .generation import ReportEngine


class BlindReportEngine(ReportEngine):
    """`ReportEngine` whose prompt embeddings have the visual rows (``<image{k}>`` and ``<region{n}>``
    tokens, after any finding conditioning) zeroed; with ``projector_norm="region"``, the latent rows set to
    ``fc``'s bias and the mask-token rows kept (see the module docstring)."""

    def prepare(self, study, regions=None):
        prepared = super().prepare(study, regions)
        ids = torch.tensor(prepared.prompt_ids)
        visual = ids >= self.special.first_image_token                   # <image{k}> and <region{n}> rows
        embeds = prepared.prompt_embeds.clone()                            # (1, P, hidden)
        if self.config.projector_norm == "region":
            masks = {self.special.region_tokens(j)[-1] for j in range(self.special.num_regions)}
            latent = visual & ~torch.tensor([i in masks for i in prepared.prompt_ids])
            embeds[0, latent.to(embeds.device)] = self.model.embedding_layer.fc.bias.to(embeds)
        else:
            embeds[0, visual.to(embeds.device)] = 0.0
        prepared.prompt_embeds = embeds
        return prepared
