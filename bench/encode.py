"""Encoding one study (global + 10 regions) at the published ViT/perceiver dims on CPU.

Reference way: the global volume, then each region, one ViT + perceiver pass at a time (docs/reproduction.md §7).
Ours: `RegionFusionEmbedding.encode_visual`, all 11 volumes in one batched pass. Random weights.
Each variant runs in its own subprocess so its peak RSS is its own.
``--channels repeated``: the volumes as the pre-processing gives them (one channel repeated three times), and a
third variant, the batched pass with the published three-channel patch embedding (``FOLD_REPEATED_CHANNELS``
off), against which the folded one (`ViT3D._embed_one_channel`) is compared.

    .venv/bin/python bench/encode.py [--preset reg2rg-7b|demo] [--regions 10] [--repeats 1] [--threads 1] [--channels random|repeated]
"""

from __future__ import annotations

import argparse
import json
import time

from isolated import peak_rss_mb, run_variant_process


def run_variant(mode: str, regions: int, repeats: int, threads: int, preset: str = "reg2rg-7b",
                channels: str = "random") -> dict:
    import torch

    from reg2rg.engine.model import vit3d
    from reg2rg.engine.model.config import Reg2RGConfig
    from reg2rg.engine.model.embedding import RegionFusionEmbedding

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Reg2RGConfig.preset(preset)
    hidden = 4096 if preset == "reg2rg-7b" else int(config.llm_config["hidden_size"])
    layer = RegionFusionEmbedding(config, hidden_size=hidden, vocab_size=32000).eval()
    H, W, D = config.input_size
    if channels == "repeated":
        images = torch.rand(1, 1, H, W, D).expand(1, 3, H, W, D)
        region_images = torch.rand(regions, 1, H, W, D).expand(regions, 3, H, W, D)
    else:
        images = torch.rand(1, 3, H, W, D)
        region_images = torch.rand(regions, 3, H, W, D)
    vit3d.FOLD_REPEATED_CHANNELS = mode != "unfolded"
    region_masks = (torch.rand(regions, 1, H, W, D) > 0.5).float()
    base = peak_rss_mb()
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            if mode in ("batched", "unfolded"):
                out = layer.encode_visual(images, region_images, region_masks)
                checksum = float(out.region_tokens.sum() + out.global_tokens.sum())
            else:
                enc = lambda v: layer.fc(layer.perceiver(layer.vision_encoder(v)))       # noqa: E731
                g = enc(images)
                parts = []
                for r in range(regions):
                    tok = enc(region_images[r:r + 1])
                    m = layer.mask_fc(layer.mask_encoder(region_masks[r:r + 1]).mean(dim=1))
                    parts.append(torch.cat([tok, m[:, None]], dim=1))
                checksum = float(torch.cat(parts).sum() + g.sum())
            times.append(time.perf_counter() - t)
    return {"mode": mode, "seconds": min(times), "peak_rss_mb": peak_rss_mb(), "model_rss_mb": base, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="reg2rg-7b", choices=["reg2rg-7b", "demo"])
    ap.add_argument("--channels", default="random", choices=["random", "repeated"])
    ap.add_argument("--mode", choices=["sequential", "batched", "unfolded"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_variant(args.mode, args.regions, args.repeats, args.threads, args.preset, args.channels)))
        return
    results = {}
    modes = ("sequential", "batched") + (("unfolded",) if args.channels == "repeated" else ())
    for mode in modes:
        results[mode] = run_variant_process(__file__, mode, "--regions", args.regions, "--repeats", args.repeats,
                                            "--threads", args.threads, "--preset", args.preset,
                                            "--channels", args.channels)
    seq, bat = results["sequential"], results["batched"]
    print(f"{args.preset} dims, 1 global + {args.regions} regions, channels {args.channels}, CPU threads={args.threads}")
    for r in results.values():
        print(f"  {r['mode']:>10}: {r['seconds']:.2f} s   peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(model alone {r['model_rss_mb']:.0f} MB, activations ~{r['peak_rss_mb'] - r['model_rss_mb']:.0f} MB)")
    print(f"  speed-up batched vs sequential: {seq['seconds'] / bat['seconds']:.2f}x; "
          f"checksums {seq['checksum']:.4f} / {bat['checksum']:.4f}")
    if "unfolded" in results:
        unf = results["unfolded"]
        print(f"  speed-up of the one-channel patch embedding (batched, folded vs published three-channel): "
              f"{unf['seconds'] / bat['seconds']:.2f}x; checksums {bat['checksum']:.4f} / {unf['checksum']:.4f}")


if __name__ == "__main__":
    main()
