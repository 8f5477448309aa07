"""The Reg2RG network: config, RadFM ViT, perceiver, fusion layer, LLaMA + LoRA."""

from .config import ConfigError, LoraSettings, PerceiverConfig, Reg2RGConfig, VisionEncoderConfig
from .embedding import RegionFusionEmbedding, VisualTokens
from .reg2rg import Reg2RG, Reg2RGOutput

__all__ = ["ConfigError", "LoraSettings", "PerceiverConfig", "Reg2RGConfig", "VisionEncoderConfig",
           "RegionFusionEmbedding", "VisualTokens", "Reg2RG", "Reg2RGOutput"]
