"""The published inference procedure, re-stated for benchmarks (docs/reproduction.md §2, §5, §7).

Each volume goes through the ViT + perceiver one after another, the prompt is embedded by a one-hot
matrix times a (V + 4 + L + R(L+1)) x hidden table, and the text comes from HF
``generate(inputs_embeds=…, max_new_tokens=…, top_k=30)``. That call lets the LLaMA's generation config
decide whether to sample; the benchmarks' random models have the default config, so it decodes greedily
here, as our engine does by default. Same weights as our engine, so the two procedures can be timed
against each other in one run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def reference_embeds(model, prompt_ids: list[int], images, region_images, region_masks) -> torch.Tensor:
    """(1, T, hidden) prompt embeddings the reference way: sequential encoding + one-hot product."""
    emb = model.embedding_layer
    L, R = model.config.num_latents, model.config.num_regions
    rows = [emb.weight, emb.image_token_weight, emb.region_token_weight]
    rows.append(emb.fc(emb.perceiver(emb.vision_encoder(images)))[0])              # (L, hidden)
    for j in range(R):
        if j < region_images.shape[0]:
            tokens = emb.fc(emb.perceiver(emb.vision_encoder(region_images[j:j + 1])))[0]      # (L, hidden)
            mask = emb.mask_fc(emb.mask_encoder(region_masks[j:j + 1]).mean(1))               # (1, hidden)
            rows.append(torch.cat([tokens, mask], 0))                                          # (L+1, hidden)
        else:
            rows.append(emb.weight.new_zeros(L + 1, emb.weight.shape[1]))
    table = torch.cat([r.to(emb.weight.dtype) for r in rows], 0)                  # (V + 4 + L + R(L+1), hidden)
    ids = torch.tensor([prompt_ids], device=table.device)
    one_hot = F.one_hot(ids, table.shape[0]).to(table.dtype)                       # (1, T, rows)
    return one_hot @ table


@torch.no_grad()
def reference_generate(model, prompt_ids, images, region_images, region_masks, max_new_tokens: int,
                       eos_token_id: int = 2) -> list[int]:
    """Generated ids of the published procedure (greedy with the default generation config of a model built
    from a config; the published run sampled, because Llama-2-7b-chat's generation_config.json says so)."""
    embeds = reference_embeds(model, prompt_ids, images, region_images, region_masks)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out = model.lang_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    top_k=30, eos_token_id=eos_token_id, pad_token_id=0)
    return out[0].tolist()


def stack_inputs(inputs, slot_regions: dict[int, str], device, dtype):
    """(images, region_images, region_masks) batched tensors from `ModelInputs` in slot order."""
    slots = [slot_regions[j] for j in sorted(slot_regions)]
    images = inputs.image[None].to(device, dtype)
    region_images = torch.stack([inputs.regions[r] for r in slots]).to(device, dtype)
    region_masks = torch.stack([inputs.masks[r] for r in slots]).to(device, dtype)
    return images, region_images, region_masks
