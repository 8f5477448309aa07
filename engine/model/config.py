"""`Reg2RGConfig`: every dimension of the Reg2RG network, saved as JSON beside the weights.

Nothing in the model code hard-codes a published dimension (4096, 32000, 768, 32, 33): they all come
from here. ``Reg2RGConfig.preset("reg2rg-7b")`` holds the published values (docs/reproduction.md §1).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "config.json"

#: Orientation of the volumes the published Reg2RG was trained on (RadGenome-ChestCT, from CT-RATE): axial
#: CT converted from DICOM in ITK voxel order, i.e. nibabel axis code LPS. How this was established, and
#: its limits: docs/reproduction.md ("Orientation of the published training volumes").
PUBLISHED_ORIENTATION = "LPS"


def is_axis_code(code) -> bool:
    """True for a 3-letter orientation code with one letter of each pair L/R, A/P, S/I (e.g. ``"LPS"``)."""
    if not isinstance(code, str) or len(code) != 3:
        return False
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    return sorted(next((i for i, p in enumerate(pairs) if c in p), 9) for c in code.upper()) == [0, 1, 2]


class ConfigError(ValueError):
    """A model configuration is inconsistent or a config file cannot be read."""


@dataclass
class VisionEncoderConfig:
    """A RadFM 3D ViT. ``image_size``/``frames`` size the position tables, not the runtime input."""

    image_size: int = 512
    frames: int = 512
    patch_size: int = 32
    frame_patch_size: int = 4
    dim: int = 768
    depth: int = 12
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 2048
    dropout: float = 0.1
    emb_dropout: float = 0.1
    channels: int = 3

    @property
    def table_sizes(self) -> tuple[int, int, int]:
        """Entries of the row, column and depth position tables."""
        return (self.image_size // self.patch_size, self.image_size // self.patch_size,
                self.frames // self.frame_patch_size)

    def grid(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Patch grid (h, w, d) for an input of spatial size (H, W, D)."""
        h, w, d = input_size
        return (h // self.patch_size, w // self.patch_size, d // self.frame_patch_size)

    def validate(self, input_size: tuple[int, int, int], what: str) -> None:
        if self.dim % 3:
            raise ConfigError(f"{what}: dim {self.dim} must be divisible by 3 (three position tables)")
        h, w, d = input_size
        if h % self.patch_size or w % self.patch_size or d % self.frame_patch_size:
            raise ConfigError(f"{what}: input {input_size} is not a multiple of the patch "
                              f"({self.patch_size}, {self.patch_size}, {self.frame_patch_size})")
        for n, table in zip(self.grid(input_size), self.table_sizes):
            if n > table or table % n:
                raise ConfigError(f"{what}: runtime grid {self.grid(input_size)} does not subsample "
                                  f"the position tables {self.table_sizes}")


@dataclass
class PerceiverConfig:
    """Flamingo perceiver resampler (the number of latents is `Reg2RGConfig.num_latents`)."""

    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4


@dataclass
class LoraSettings:
    """PEFT LoRA settings; ``target_modules=None`` means PEFT's default for LLaMA (q_proj, v_proj)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] | None = None


def _mask_encoder_published() -> VisionEncoderConfig:
    return VisionEncoderConfig(image_size=256, frames=64, patch_size=32, frame_patch_size=16, dim=255,
                               depth=3, heads=8, dim_head=64, mlp_dim=512, channels=1)


@dataclass
class Reg2RGConfig:
    """All dimensions and switches of one Reg2RG model.

    ``train_llm``: ``"lora"`` (published: LoRA on a frozen LLaMA), ``"full"`` (the small demo LLM is
    trained from scratch), ``"frozen"`` (no LLM training). ``llm_path`` is a local HF folder; else
    ``llm_config`` is a dict of ``LlamaConfig`` arguments for a freshly initialised LLM.
    ``vocab_size`` is the text vocabulary V (rows of the LLM input embedding); it is filled from the
    tokenizer when the model is built and must match it afterwards.

    ``finding_labels`` (not in the published model; empty there) adds a linear *finding head* to the
    fusion layer: per region, the mean of its RMS-normalised projected tokens -> one logit per label
    (for the global image: of the global tokens). Training adds ``finding_loss_weight`` x its binary
    cross-entropy to the language-model loss (deep supervision of the visual tokens); the head's
    probabilities are also available at inference (`Reg2RG.finding_probabilities`).

    ``orientation`` names the voxel-axis orientation of the volumes the model was trained on (nibabel's
    axis code, e.g. ``"LPS"``: axis 0 towards the patient's left, 1 posterior, 2 superior). It is
    required: the engine reorients every study to it before pre-processing (flips and transposes only,
    mapped back exactly by `preprocess.Geometry`), so a RAS copy of an LPS study reaches the model as
    the same volume instead of mirrored. The published checkpoint's value and how it was established:
    docs/reproduction.md ("Orientation of the published training volumes").
    ``finding_head_input`` chooses what the head reads: ``"tokens"`` (above) or ``"patches"``: each of the
    volume's ViT patch features, RMS-normalised, through the linear head, then the maximum over patches (a
    multiple-instance detector: a lesion that fills a few patches is not averaged away by the rest of the
    region; the head is then named ``finding_patch_head``), or ``"latents"``: a *detector* per region on what
    the frozen encoders give for that region — its perceiver latents, flattened, and its mask feature — one
    logistic regression per region and label, fitted by ``reg2rg-train`` on the training studies (the
    encoders frozen and run once, as for ``projector_norm``; `train.features.fit_finding_detector`) and
    saved as buffers (``finding_latent_weight`` / ``_bias``). Its calls are binary: a label is called in a
    region when its probability passes that region's threshold (``finding_threshold``); a region's label
    whose detector did not reach the fitting's F1 bar on held-out training studies is never called
    (threshold +inf) — the model passes on only the findings its detector was shown to see.

    ``finding_conditioning`` (not published; needs ``finding_labels``) gives the LLM the head's calls: each
    region's tokens get ``sum_k p_k e_k`` added, with ``p_k`` the head's probability of label k for that
    region (read from the region's own visual tokens) and ``e_k`` a learned vector per label. The small
    within-region differences a finding makes in the visual tokens are thus turned into a large, explicit
    signal in the tokens the LLM reads (the LLM otherwise reads only the region's identity; see the demo
    model card). In training, ``finding_teacher_forcing`` is the share of regions whose calls are their true
    labels instead of the head's (the head's probabilities are detached: its calls are learned by its own
    loss from the image only). Label names may include ``"Left side"`` / ``"Right side"``: the side named by
    the region's abnormal sentences. ``finding_conditioning_tokens``: ``"all"`` the region's tokens get the
    calls, ``"mask"`` only its mask token (the latent tokens keep the region's appearance and identity intact).
    With a fitted detector, teacher forcing gives the true labels of the labels it may call only (a finding it
    never calls is then written, or not, from the LLM's own reading of the tokens and its prior);
    ``finding_calls_only`` gives every label's truth, so the LLM learns that a finding it is not told of is
    absent: it reports only what the detector calls (no finding written from the prior alone).

    ``finding_density`` (not published: False; needs ``finding_head_input="latents"``): the detector also reads
    each region crop's densitometry (`engine.model.density`: its attenuation histograms, plain and after a grey
    erosion, and the mask's share of its box) — what quantitative CT reads for emphysema, consolidation or
    calcium, and what a frozen encoder trained on reports alone may not separate. The fitting chooses, per region
    and label, the encoders' output, the densitometry or both, by held-out F1 (`train.features`).

    ``projector_norm`` (not published: ``"none"``): ``"region"`` standardises ``fc``'s input, the perceiver's
    latents, per anatomical region: (x - mean) / std with the mean and std of each feature at each latent
    position over the training volumes of that region (one row for the global image, one per region; buffers
    saved with the weights, fitted by ``reg2rg-train`` with the encoders frozen). Within-region differences —
    the findings — are about ten times smaller than the differences between regions, and a from-scratch LLM
    learns the regions' identity first and then reads nothing else; standardised, each region's tokens are
    its deviation from the average region of its kind (the identity stays in the mask token and the slot).
    Every caller then passes each region's index in `REGIONS` (``region_ids``).
    """

    name: str = "custom"
    input_size: tuple[int, int, int] = (256, 256, 64)
    orientation: str | None = None          # axis code of the training volumes ("LPS"); required, see below
    num_regions: int = 10
    num_latents: int = 32                   # tokens per region = num_latents + 1 (mask token)
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    mask_encoder: VisionEncoderConfig = field(default_factory=_mask_encoder_published)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    llm_path: str | None = None
    llm_config: dict[str, Any] | None = None
    vocab_size: int | None = None
    train_llm: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    max_length: int = 2048
    freeze_vision_encoder: bool = True
    finding_labels: tuple[str, ...] = ()
    finding_loss_weight: float = 0.0
    token_focal_gamma: float = 0.0          # > 0: focal language-model loss in training (published: 0)
    lm_loss_weight: float = 1.0             # weight of the LM loss; 0: visual-only stage (LLM not run)
    finding_head_input: str = "tokens"      # "tokens" (projected tokens, mean), "patches" (ViT patches, max)
    #                                         or "latents" (fitted per-region detector on the frozen encoders' output)
    finding_conditioning: bool = False      # the head's calls added to each region's tokens (not published)
    finding_teacher_forcing: float = 0.0    # training: share of regions conditioned on their true labels
    finding_conditioning_tokens: str = "all"  # which of a region's tokens get the calls: "all" or "mask"
    finding_calls_only: bool = False        # training: teacher forcing gives every label, callable or not (below)
    projector_norm: str = "none"            # "none" (published) or "region": fc's input standardised per region
    finding_density: bool = False           # the latent detector also reads each crop's densitometry (not published)

    @property
    def frozen_encoders(self) -> bool:
        """The encoders (ViT, perceiver, mask encoder) stay frozen and ``reg2rg-train`` runs them once per study:
        fitted statistics or a fitted detector describe their output (``projector_norm``, ``finding_head_input``)."""
        return self.projector_norm == "region" or (bool(self.finding_labels) and self.finding_head_input == "latents")

    def __post_init__(self) -> None:
        self.input_size = tuple(int(s) for s in self.input_size)  # type: ignore[assignment]
        self.finding_labels = tuple(str(s) for s in self.finding_labels)  # type: ignore[assignment]
        for name, cls in (("vision", VisionEncoderConfig), ("mask_encoder", VisionEncoderConfig),
                          ("perceiver", PerceiverConfig), ("lora", LoraSettings)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def tokens_per_region(self) -> int:
        return self.num_latents + 1

    @property
    def num_visual_tokens(self) -> int:
        """Rows of the per-sample special table: 4 markers + global tokens + all region slots."""
        return 4 + self.num_latents + self.num_regions * self.tokens_per_region

    @property
    def hidden_size(self) -> int | None:
        """LLM hidden size when known without reading the LLM folder."""
        return None if self.llm_config is None else int(self.llm_config["hidden_size"])

    def validate(self, require_llm: bool = True) -> None:
        """Raise `ConfigError` when the dimensions cannot work together."""
        self.vision.validate(self.input_size, "vision encoder")
        self.mask_encoder.validate(self.input_size, "mask encoder")
        if self.train_llm not in ("lora", "full", "frozen"):
            raise ConfigError(f"train_llm must be 'lora', 'full' or 'frozen', got {self.train_llm!r}")
        if len(set(self.finding_labels)) != len(self.finding_labels):
            raise ConfigError(f"finding_labels are named twice: {list(self.finding_labels)}")
        if self.finding_loss_weight < 0 or (self.finding_loss_weight and not self.finding_labels):
            raise ConfigError("finding_loss_weight must be >= 0 and needs finding_labels")
        if not is_axis_code(self.orientation):
            raise ConfigError(f"'orientation' is {self.orientation!r}: the config must name the orientation of the "
                              "volumes the model was trained on, as an axis code such as \"LPS\" (axis 0 towards the "
                              "patient's Left, 1 Posterior, 2 Superior; one letter of L/R, A/P and S/I each)")
        if self.finding_head_input not in ("tokens", "patches", "latents"):
            raise ConfigError(f"finding_head_input must be 'tokens', 'patches' or 'latents', got "
                              f"{self.finding_head_input!r}")
        if self.finding_conditioning_tokens not in ("all", "mask"):
            raise ConfigError(f"finding_conditioning_tokens must be 'all' or 'mask', got "
                              f"{self.finding_conditioning_tokens!r}")
        if self.finding_conditioning and not self.finding_labels:
            raise ConfigError("finding_conditioning needs finding_labels (the head whose calls it passes on)")
        if self.finding_density and self.finding_head_input != "latents":
            raise ConfigError("finding_density is read by the fitted detector: it needs finding_head_input 'latents'")
        if self.projector_norm not in ("none", "region"):
            raise ConfigError(f"projector_norm must be 'none' or 'region', got {self.projector_norm!r}")
        if not 0.0 <= self.finding_teacher_forcing <= 1.0:
            raise ConfigError(f"finding_teacher_forcing must lie in [0, 1], got {self.finding_teacher_forcing}")
        if require_llm and self.llm_path is None and self.llm_config is None:
            raise ConfigError(f"preset {self.name!r}: set llm_path (a local LLaMA folder) or llm_config")

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "Reg2RGConfig":
        """``"reg2rg-7b"`` (published dims; set ``llm_path`` before building), ``"tiny"`` (tests),
        ``"demo"`` (the small model trained on CPU)."""
        if name == "reg2rg-7b":
            return cls(name=name, orientation=PUBLISHED_ORIENTATION)
        if name == "tiny":
            return cls(
                name=name, input_size=(32, 32, 16), num_latents=4,
                vision=VisionEncoderConfig(image_size=64, frames=32, patch_size=8, frame_patch_size=4,
                                           dim=48, depth=2, heads=2, dim_head=16, mlp_dim=96),
                mask_encoder=VisionEncoderConfig(image_size=32, frames=16, patch_size=8, frame_patch_size=8,
                                                 dim=30, depth=1, heads=2, dim_head=8, mlp_dim=40, channels=1),
                perceiver=PerceiverConfig(depth=2, heads=2, dim_head=16, ff_mult=2),
                llm_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
                train_llm="lora", gradient_checkpointing=False, max_length=512,
                orientation="RAS",            # the tests' synthetic studies are stored RAS
            )
        if name == "demo":
            return cls(
                name=name, input_size=(64, 64, 32), num_latents=8,
                vision=VisionEncoderConfig(image_size=128, frames=64, patch_size=16, frame_patch_size=4,
                                           dim=144, depth=3, heads=4, dim_head=32, mlp_dim=288),
                mask_encoder=VisionEncoderConfig(image_size=64, frames=32, patch_size=16, frame_patch_size=8,
                                                 dim=48, depth=1, heads=4, dim_head=16, mlp_dim=96, channels=1),
                perceiver=PerceiverConfig(depth=2, heads=4, dim_head=32, ff_mult=2),
                llm_config=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
                train_llm="full", gradient_checkpointing=False, max_length=1024,
                freeze_vision_encoder=False,
                orientation="LPS",            # the phantoms' stored orientation (engine/phantom.py)
            )
        raise ConfigError(f"unknown preset {name!r}; choose 'reg2rg-7b', 'tiny' or 'demo'")

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        data["finding_labels"] = list(self.finding_labels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Reg2RGConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``config.json`` into ``directory``; returns its path."""
        from ..fileio import atomic_write, ensure_folder

        ensure_folder(directory)
        path = os.path.join(directory, CONFIG_NAME)
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Reg2RGConfig":
        """Read ``config.json`` from ``directory`` (or a path to the JSON file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: model config file not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_dict(data)
        except (TypeError, ConfigError) as err:
            raise ConfigError(f"{path}: {err}") from err
