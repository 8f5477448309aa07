"""Building inputs_embeds at published dims: the reference's one-hot x table vs our gather.

32000x4096 text table, 32 global + 10x33 region tokens, a 700-token prompt with 10 regions, one sample.
Reference (docs/reproduction.md §2): cat([text table, 2 marker weights x2, global, regions]) -> (32366, 4096), one-hot
(700, 32366) @ table. Ours: `RegionFusionEmbedding.special_table` + `embed` (gather). Each variant in
its own subprocess so its peak RSS is its own.

    .venv/bin/python bench/embed.py [--tokens 700] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

from isolated import peak_rss_mb, run_variant_process


def run_variant(mode: str, tokens: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from reg2rg.engine.model.config import Reg2RGConfig
    from reg2rg.engine.model.embedding import RegionFusionEmbedding, VisualTokens

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Reg2RGConfig.preset("reg2rg-7b")
    V, hidden, L, R = 32000, 4096, config.num_latents, config.num_regions
    # Only the fusion table parts matter here: skip building the encoders (a tiny stand-in config).
    layer = RegionFusionEmbedding.__new__(RegionFusionEmbedding)
    torch.nn.Module.__init__(layer)
    layer.config, layer.vocab_size, layer.hidden_size, layer.num_latents, layer.num_regions = config, V, hidden, L, R
    layer.image_token_weight = torch.nn.Parameter(torch.randn(2, hidden))
    layer.region_token_weight = torch.nn.Parameter(torch.randn(2, hidden))
    layer.weight = torch.nn.Parameter(torch.randn(V, hidden))
    visual = VisualTokens(torch.randn(1, L, hidden), torch.randn(R, L + 1, hidden))
    sample, slot = torch.zeros(R, dtype=torch.long), torch.arange(R)
    special = list(range(V, V + 4 + L + R * (L + 1)))                       # every special id once
    ids = torch.tensor(special + torch.randint(3, V, (tokens - len(special),)).tolist())[None]
    base = peak_rss_mb()
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            if mode == "gather":
                out = layer.embed(ids, layer.special_table(visual, sample, slot))
            else:
                regions = torch.zeros(1, R * (L + 1), hidden)
                for j in range(R):
                    regions[0, j * (L + 1):(j + 1) * (L + 1)] = visual.region_tokens[j]
                table = torch.cat([layer.weight, layer.image_token_weight, layer.region_token_weight], dim=0)
                table = torch.cat([table[None], visual.global_tokens, regions], dim=1)       # (1, 32366, 4096)
                one_hot = F.one_hot(ids, table.shape[1]).to(table.dtype)                   # (1, 700, 32366)
                out = one_hot @ table
            times.append(time.perf_counter() - t)
            checksum = float(out.double().sum())
    return {"mode": mode, "seconds": min(times), "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=700)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=["onehot", "gather"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_variant(args.mode, args.tokens, args.repeats, args.threads)))
        return
    res = {}
    for mode in ("onehot", "gather"):
        res[mode] = run_variant_process(__file__, mode, "--tokens", args.tokens, "--repeats", args.repeats,
                                        "--threads", args.threads)
    one, gat = res["onehot"], res["gather"]
    print(f"32000x4096 table, {args.tokens}-token prompt, 10 regions x 33 + 32 global, CPU threads={args.threads}")
    for r in (one, gat):
        print(f"  {r['mode']:>7}: {r['seconds'] * 1000:.1f} ms   peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(inputs alone {r['base_rss_mb']:.0f} MB, extra ~{r['peak_rss_mb'] - r['base_rss_mb']:.0f} MB)")
    print(f"  speed-up gather vs one-hot: {one['seconds'] / gat['seconds']:.0f}x; "
          f"checksums {one['checksum']:.3f} / {gat['checksum']:.3f}")


if __name__ == "__main__":
    main()
