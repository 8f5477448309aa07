"""Controls for measuring whether a model's words come from the image.

The **blind control** is the same model with every global-image and region token of the prompt replaced
by zeros (the text, the markers and the slot structure stay): what it writes, it writes from the text
alone. A finding the model names and its blind control does not is one the model read from the image.

For a model whose ``fc`` input is standardised per region (``projector_norm="region"``), zero tokens are far
outside what it was trained on (every input it saw was ``fc`` of a standardised feature), and so is a zero
*standardised* input (``fc``'s bias in every latent row: rows of norm ~1 where real ones have ~15): measured on
the demo model, both blind drafts are not text ("mm Heart Heart …", " mm area. mm area …"). Its blind control
gives ``fc`` standardised latents drawn at random, N(0, 1) per feature from a fixed seed — a draw from the average
region's distribution that carries nothing of this study — and keeps the mask tokens, which come from the region
masks, not from the CT. That control is conservative for findings that change a mask (an enlarged heart enlarges
the heart mask): what the model names and this control does not, it read from the CT voxels.
"""

from __future__ import annotations

import torch

from .generation import ReportEngine

NOISE_SEED = 0      # the blind control's random standardised latents (the same draw for every study)


class BlindReportEngine(ReportEngine):
    """`ReportEngine` whose prompt embeddings have the visual rows (``<image{k}>`` and ``<region{n}>``
    tokens, after any finding conditioning) zeroed; with ``projector_norm="region"``, the latent rows are ``fc``
    of random standardised latents and the mask-token rows are kept (see the module docstring)."""

    def prepare(self, study, regions=None):
        prepared = super().prepare(study, regions)
        ids = torch.tensor(prepared.prompt_ids)
        visual = ids >= self.special.first_image_token                   # <image{k}> and <region{n}> rows
        embeds = prepared.prompt_embeds.clone()                            # (1, P, hidden)
        if self.config.projector_norm == "region":
            masks = {self.special.region_tokens(j)[-1] for j in range(self.special.num_regions)}
            latent = visual & ~torch.tensor([i in masks for i in prepared.prompt_ids])
            fc = self.model.embedding_layer.fc
            noise = torch.randn(int(latent.sum()), fc.in_features, generator=torch.Generator().manual_seed(NOISE_SEED))
            with torch.no_grad():
                embeds[0, latent.to(embeds.device)] = fc(noise.to(fc.weight)).to(embeds)
        else:
            embeds[0, visual.to(embeds.device)] = 0.0
        prepared.prompt_embeds = embeds
        return prepared
