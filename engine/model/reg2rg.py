"""`Reg2RG`: the fusion layer (``embedding_layer``) feeding ``inputs_embeds`` to LLaMA (``lang_model``).

The two child names are the published ones, so ``state_dict()`` names match the published checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..tokens import IGNORE_INDEX, SpecialIds, add_special_tokens
from .config import ConfigError, Reg2RGConfig
from .embedding import EncoderFeatures, RegionFusionEmbedding, VisualTokens
from .llm import base_llama, build_language_model


@dataclass
class Reg2RGOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor                       # (B, T, V)
    token_accuracy: torch.Tensor | None = None     # correct / labelled next tokens
    sequence_accuracy: torch.Tensor | None = None  # the reference's logged "Accuracy": whole sequences right
    lm_loss: torch.Tensor | None = None            # the language-model part of ``loss``
    finding_loss: torch.Tensor | None = None       # the finding head's BCE (unweighted), when trained
    finding_logits: torch.Tensor | None = None     # (B + N, K): global volumes, then regions


class Reg2RG(nn.Module):
    """Reg2RG. Inputs are flat over the batch: ``region_images`` (N,C,H,W,D) and ``region_masks``
    (N,1,H,W,D) hold every region of every sample, ``region_sample`` (N,) says whose it is and
    ``region_slot`` (N,) which prompt slot j it fills."""

    def __init__(self, config: Reg2RGConfig, lang_model: nn.Module, vocab_size: int):
        super().__init__()
        self.config = config
        self.special = SpecialIds(vocab_size, config.num_latents, config.num_regions)
        hidden = base_llama(lang_model).config.hidden_size
        self.lang_model = lang_model
        self.embedding_layer = RegionFusionEmbedding(config, hidden, vocab_size)
        # Tie: the text rows of the fusion table ARE the LLM input embedding (same tensor, not resized).
        self.embedding_layer.weight = self.lang_model.get_input_embeddings().weight

    @classmethod
    def from_config(cls, config: Reg2RGConfig, tokenizer=None, dtype: torch.dtype | None = None,
                    llm_path: str | None = None) -> "Reg2RG":
        """Build the model (LLM from ``llm_path``/``config.llm_path`` or fresh from ``config.llm_config``).

        The text vocabulary V comes from ``tokenizer`` (its special tokens are added if missing) or,
        without one, from ``config.vocab_size``. ``config.vocab_size`` is filled in.
        """
        if tokenizer is not None:
            vocab = add_special_tokens(tokenizer, config.num_latents, config.num_regions).vocab_size
            if config.vocab_size is not None and config.vocab_size != vocab:
                raise ConfigError(f"the config says vocab_size {config.vocab_size}, the tokenizer has {vocab}")
            config.vocab_size = vocab
        elif config.vocab_size is None:
            raise ConfigError("give a tokenizer or set config.vocab_size")
        config.validate(require_llm=llm_path is None)
        lang_model = build_language_model(config, config.vocab_size, dtype, llm_path)
        model = cls(config, lang_model, config.vocab_size)
        if dtype is not None:
            model.embedding_layer.to(dtype)
        return model

    # ---- pieces used by generation and attention maps ----------------------------------------------
    def encode_visual(self, images: torch.Tensor, region_images: torch.Tensor, region_masks: torch.Tensor,
                      return_attention: bool = False, patch_tokens: torch.Tensor | None = None,
                      mask_patch_tokens: torch.Tensor | None = None,
                      region_ids: torch.Tensor | None = None) -> VisualTokens:
        """Global + all regions in one batched ViT + perceiver pass; masks through the mask encoder.
        ``patch_tokens``, ``mask_patch_tokens``, ``region_ids``: see `RegionFusionEmbedding.encode_visual`."""
        return self.embedding_layer.encode_visual(images, region_images, region_masks, return_attention,
                                                  patch_tokens, mask_patch_tokens, region_ids)

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor, region_images: torch.Tensor,
                     region_masks: torch.Tensor, region_sample: torch.Tensor, region_slot: torch.Tensor,
                     visual: VisualTokens | None = None, region_calls: torch.Tensor | None = None,
                     region_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs_embeds`` (B, T, hidden); pass ``visual`` to reuse an encoding. With
        ``config.finding_conditioning`` the regions' tokens carry the finding head's calls (or
        ``region_calls`` (N, K), given in training for teacher forcing)."""
        if visual is None:
            visual = self.encode_visual(images, region_images, region_masks, region_ids=region_ids)
        visual = self.embedding_layer.condition_on_findings(visual, region_calls)
        table = self.embedding_layer.special_table(visual, region_sample, region_slot)
        # the LLM takes its inputs in its own dtype (it differs from the vision path's in mixed precision)
        return self.embedding_layer.embed(input_ids, table).to(self.lang_model.get_input_embeddings().weight.dtype)

    def set_precision(self, llm_dtype: torch.dtype, vision_dtype: torch.dtype,
                      device: torch.device | str | None = None) -> "Reg2RG":
        """Run the LLM (with the tied text embedding) in ``llm_dtype`` and the vision path (ViT, perceiver,
        fc, mask encoder, mask_fc, marker weights, finding head) in ``vision_dtype``; optionally move to
        ``device``. ``embedding_layer.to()`` would also cast the tied table, hence part by part."""
        self.lang_model.to(device=device, dtype=llm_dtype)
        layer = self.embedding_layer
        for child in layer.children():
            child.to(device=device, dtype=vision_dtype)
        for name, param in layer.named_parameters(recurse=False):
            if name != "weight":
                param.data = param.data.to(device=device, dtype=vision_dtype)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, images: torch.Tensor | None = None,
                region_images: torch.Tensor | None = None, region_masks: torch.Tensor | None = None,
                region_sample: torch.Tensor | None = None, region_slot: torch.Tensor | None = None,
                finding_targets: torch.Tensor | None = None,
                global_finding_targets: torch.Tensor | None = None, region_ids: torch.Tensor | None = None,
                global_latents: torch.Tensor | None = None, region_latents: torch.Tensor | None = None,
                mask_features: torch.Tensor | None = None, region_density: torch.Tensor | None = None) -> Reg2RGOutput:
        """Causal-LM loss exactly as the reference (HF shift, mean over labels != -100) and accuracies.

        With a finding head (``config.finding_labels``) and targets — ``finding_targets`` (N, K) for the
        regions, ``global_finding_targets`` (B, K) for the global images, 0/1 — ``loss`` adds
        ``config.finding_loss_weight`` x the mean binary cross-entropy of the head over all B + N volumes.
        With ``config.token_focal_gamma`` > 0 the language-model part of ``loss`` is the focal loss
        (`focal_token_loss`); ``lm_loss`` stays the published cross-entropy. The language-model part is
        weighted by ``config.lm_loss_weight``; at 0 (a visual-only stage) with finding targets the LLM is
        not run: ``loss`` is the weighted finding loss, ``logits`` None and the language numbers NaN.

        ``region_ids`` (N,): each region's index in `REGIONS` (needed with ``config.projector_norm``).
        ``global_latents`` (B, L, dim), ``region_latents`` (N, L, dim), ``mask_features`` (N, mask dim): the
        encoders' output (`RegionFusionEmbedding.encoder_features`) computed beforehand, in place of the
        volumes — training with frozen encoders reuses them instead of encoding every study again; with
        ``config.finding_density`` also ``region_density`` (N, DENSITY_FEATURES), the crops' densitometry."""
        if global_latents is not None:
            features = EncoderFeatures(global_latents, region_latents, mask_features, density=region_density)
            visual = self.embedding_layer.project(features, region_ids)
        else:
            if images is None:
                raise ValueError("Reg2RG.forward needs the global images (B, C, H, W, D) or their encoder features")
            if region_images is None:
                region_images = images.new_zeros(0, *images.shape[1:])
                region_masks = images.new_zeros(0, 1, *images.shape[2:])
                region_sample = region_slot = torch.zeros(0, dtype=torch.long, device=images.device)
            visual = self.encode_visual(images, region_images, region_masks, region_ids=region_ids)
        token_acc = seq_acc = finding_loss = finding_logits = None
        if self.config.lm_loss_weight == 0 and finding_targets is not None:
            # visual-only stage: the finding head's loss alone, the LLM is not run
            out = None
            loss = visual.global_tokens.new_zeros((), dtype=torch.float32)
        else:
            embeds = self.embed_inputs(input_ids, images, region_images, region_masks, region_sample,
                                       region_slot, visual=visual,
                                       region_calls=self._teacher_forced_calls(visual, finding_targets))
            # The training/scoring pass never reuses a KV cache (and caching clashes with checkpointing).
            out = self.lang_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                                  use_cache=False)
            loss = out.loss
        if out is not None and labels is not None:
            token_acc, seq_acc = next_token_accuracy(out.logits, labels)
            if self.config.token_focal_gamma:
                loss = focal_token_loss(out.logits, labels, self.config.token_focal_gamma)
        if out is not None and loss is not None and self.config.lm_loss_weight != 1.0:
            loss = self.config.lm_loss_weight * loss
        if finding_targets is not None and global_finding_targets is not None:
            finding_logits = torch.cat(self.embedding_layer.finding_logits(visual))
            targets = torch.cat([global_finding_targets, finding_targets]).to(finding_logits)
            finding_loss = nn.functional.binary_cross_entropy_with_logits(finding_logits, targets)
            if loss is not None and self.config.finding_loss_weight:
                loss = loss + self.config.finding_loss_weight * finding_loss
        if out is None:
            nan = torch.tensor(float("nan"))
            return Reg2RGOutput(loss, None, nan, nan, nan, finding_loss, finding_logits)
        return Reg2RGOutput(loss, out.logits, token_acc, seq_acc, out.loss, finding_loss, finding_logits)

    def _teacher_forced_calls(self, visual: VisualTokens, finding_targets: torch.Tensor | None) -> torch.Tensor | None:
        """Training with finding conditioning: each region's calls are its true labels with probability
        ``finding_teacher_forcing`` (those the fitted detector may call), else the head's own calls (detached).
        None (the head's own) otherwise."""
        share = self.config.finding_teacher_forcing
        if not (self.training and self.config.finding_conditioning and share > 0 and finding_targets is not None):
            return None
        layer = self.embedding_layer
        head = layer.region_calls(visual)
        targets = finding_targets.to(head)
        enabled = layer.finding_enabled(visual)
        if enabled is not None and not self.config.finding_calls_only:   # labels it never calls: not given
            targets = targets * enabled.to(head)
        forced = torch.rand(head.shape[0], 1, device=head.device) < share
        return torch.where(forced, targets, head)

    @torch.no_grad()
    def finding_probabilities(self, visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """The finding head's probabilities: global (B, K) and per region (N, K), in ``config.finding_labels`` order."""
        global_logits, region_logits = self.embedding_layer.finding_logits(visual)
        return global_logits.sigmoid(), region_logits.sigmoid()


def focal_token_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean over labelled next tokens of ``-(1 - p)^gamma * log p`` (focal loss, Lin et al. 2017), with
    the HF shift; gamma 0 is the published cross-entropy. It moves the weight of the loss from tokens the
    text alone predicts to the uncertain ones, such as the first word that says normal or abnormal."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    labelled = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[labelled], dim=-1).gather(-1, target[labelled][:, None])[:, 0]
    weight = (1.0 - logp.exp()).clamp(min=0.0) ** gamma
    return -(weight * logp).sum() / labelled.sum().clamp(min=1)


@torch.no_grad()
def next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token accuracy over labelled positions, fraction of sequences with every label right)."""
    predictions = logits[:, :-1].argmax(dim=-1)
    target = labels[:, 1:]
    labelled = target != IGNORE_INDEX
    correct = (predictions == target) & labelled
    token_acc = correct.sum() / labelled.sum().clamp(min=1)
    seq_acc = ((predictions == target) | ~labelled).all(dim=-1).float().mean()
    return token_acc, seq_acc
