"""Published dimensions (meta device), position subsampling, perceiver attention, config round trip."""

import torch

from reg2rg.engine.model.config import ConfigError, Reg2RGConfig
from reg2rg.engine.model.perceiver import PerceiverResampler
from reg2rg.engine.model.position import PositionEmbeddingLearned3d, subsample_indices
from reg2rg.engine.model.reg2rg import Reg2RG
from reg2rg.engine.model.vit3d import ViT3D

import pytest

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def count(module, pred=lambda n: True):
    return sum(p.numel() for n, p in module.named_parameters() if pred(n))


def test_reg2rg_7b_preset_has_published_parameter_counts():
    config = Reg2RGConfig.preset("reg2rg-7b")
    assert config.input_size == (256, 256, 64) and config.tokens_per_region == 33
    config.llm_config, config.vocab_size = LLAMA2_7B, 32000   # no 7B weights here: same dims on meta
    with torch.device("meta"):
        model = Reg2RG.from_config(config)
    layer = model.embedding_layer
    assert count(layer.vision_encoder) == 66_208_000
    assert count(layer.perceiver) == 37_802_496
    assert count(model.lang_model, lambda n: "lora_" in n) == 4_194_304
    assert {n.split(".")[-4] for n, _ in model.lang_model.named_parameters() if "lora_A" in n} == {"q_proj", "v_proj"}
    assert tuple(layer.fc.weight.shape) == (4096, 768) and tuple(layer.mask_fc.weight.shape) == (4096, 255)
    assert tuple(layer.weight.shape) == (32000, 4096)
    assert layer.vision_encoder.config.grid(config.input_size) == (8, 8, 16)
    assert layer.mask_encoder.config.grid(config.input_size) == (8, 8, 4)
    assert not any(p.requires_grad for p in layer.vision_encoder.parameters())
    assert model.special.end == 32366


def test_position_subsampling_matches_published_rule():
    assert subsample_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert subsample_indices(128, 16).tolist() == list(range(7, 128, 8))
    assert subsample_indices(4, 4).tolist() == [0, 1, 2, 3]
    pos = PositionEmbeddingLearned3d(5, 16, 16, 128)
    code = pos(8, 8, 16)                                     # (8*8*16, 15), depth fastest
    assert code.shape == (1024, 15)
    i, j, k = 3, 5, 9
    row = code[(i * 8 + j) * 16 + k]
    torch.testing.assert_close(row[:5], pos.row_embed.weight[(i + 1) * 2 - 1])
    torch.testing.assert_close(row[5:10], pos.col_embed.weight[(j + 1) * 2 - 1])
    torch.testing.assert_close(row[10:], pos.dep_embed.weight[(k + 1) * 8 - 1])


def test_patch_order_depth_fastest_channel_fastest():
    config = Reg2RGConfig.preset("tiny").vision
    vit = ViT3D(config)
    x = torch.arange(2 * 3 * 16 * 16 * 8, dtype=torch.float32).reshape(2, 3, 16, 16, 8)
    patches = vit.to_patch_embedding[0](x)                   # (2, 2*2*2, 8*8*4*3)
    p, pf = config.patch_size, config.frame_patch_size
    # patch (h=1, w=0, f=1) is index (1*2+0)*2+1 = 5; inside a patch channel varies fastest
    expected = x[1, :, p:2 * p, 0:p, pf:2 * pf].permute(1, 2, 3, 0).reshape(-1)
    torch.testing.assert_close(patches[1, 5], expected)


def test_perceiver_attention_is_the_softmax_it_uses():
    torch.manual_seed(0)
    perceiver = PerceiverResampler(dim=24, num_latents=3, depth=2, heads=2, dim_head=8).eval()
    media = torch.randn(2, 10, 24)
    plain = perceiver(media)
    out, attention = perceiver(media, return_attention=True)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)
    assert len(attention) == 2 and attention[0].shape == (2, 2, 3, 10)
    # the media part of a softmax over (media + latents) keys: rows sum to < 1, all positive
    assert (attention[0] > 0).all() and (attention[0].sum(-1) < 1).all()


def test_config_json_round_trip(tmp_path):
    config = Reg2RGConfig.preset("demo")
    config.vocab_size = 1234
    config.save(tmp_path)
    again = Reg2RGConfig.load(tmp_path)
    assert again == config and again.input_size == (64, 64, 32)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        Reg2RGConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        Reg2RGConfig.preset("huge")
    bad = Reg2RGConfig.preset("tiny")
    bad.vision.dim = 50
    with pytest.raises(ConfigError, match="divisible by 3"):
        bad.validate()


def test_patch_embedding_of_repeated_channels_reads_one_channel_with_the_same_numbers():
    """The pre-processing repeats one channel three times: at inference the patch LayerNorm + Linear are folded
    over the channels (a third of the work); the tokens equal the published three-channel path's."""
    from reg2rg.engine.model.config import Reg2RGConfig
    from reg2rg.engine.model.vit3d import ViT3D

    torch.manual_seed(0)
    config = Reg2RGConfig.preset("tiny").vision
    vit = ViT3D(config).eval()
    with torch.no_grad():
        for module in vit.modules():                     # affine LayerNorms, so the folding has something to fold
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_()
                module.bias.normal_()
    size = Reg2RGConfig.preset("tiny").input_size
    one = torch.randn(3, 1, *size)
    repeated = one.expand(3, config.channels, *size).contiguous()
    with torch.no_grad():
        folded = vit.embed_patches(repeated)
        published = vit.to_patch_embedding(repeated)
        h, w, d = config.grid(size)
        published = published + vit.pos_embedding(h, w, d)
        different = repeated.clone()
        different[:, 1] += 0.5                            # channels that differ take the published path
        assert torch.equal(vit.embed_patches(different), vit.to_patch_embedding(different) + vit.pos_embedding(h, w, d))
    assert torch.allclose(folded, published, atol=1e-5, rtol=1e-5)
    assert not torch.equal(folded, vit.embed_patches(different))
