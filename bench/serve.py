"""reg2rg-serve throughput: batched decoding across readers vs the same server one request at a time.

Starts ``reg2rg-serve --demo`` on loopback twice (``--max-batch 8`` and ``--max-batch 1``), and for
1 / 4 / 8 concurrent clients sends the demo study (pre-processed once, the same wire body every
time) and reads the streamed tokens. Prints tokens/s, drafts/min, p50/p95 time to first token
(request sent -> first token event, encoding included) and the batched/one-at-a-time throughput ratio.
``--wire`` prints the bytes per study of each wire codec instead (demo grid and published grid).

    .venv/bin/python bench/serve.py [--clients 1 4 8] [--drafts 3] [--tokens 96] [--threads 1]
    .venv/bin/python bench/serve.py --wire
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))


def wire_sizes() -> None:
    from reg2rg.engine.generation import GenerationSettings
    from reg2rg.engine.phantom import demo_study
    from reg2rg.engine.preprocess import preprocess
    from reg2rg.engine.service.wire import CODECS, decode_request, encode_request

    study = demo_study()
    print(f"demo study: {study.voxels.shape} int16 = {study.voxels.nbytes / 1e6:.2f} MB of voxels, "
          f"{len(study.regions_present)} regions")
    for size in ((64, 64, 32), (256, 256, 64)):
        inputs = preprocess(study, size, None, study.regions_present)
        for codec in CODECS:
            t = time.perf_counter()
            body = encode_request(inputs, study.regions_present, GenerationSettings(), codec)
            enc = time.perf_counter() - t
            t = time.perf_counter()
            decode_request(body, size, 10)
            dec = time.perf_counter() - t
            print(f"grid {size}: {codec:13s} {len(body) / 1e6:8.2f} MB per study  (encode {enc:.2f} s, "
                  f"decode+validate {dec:.2f} s)")


def run_clients(url: str, token: str, body: bytes, clients: int, drafts: int) -> dict:
    import httpx

    from reg2rg.engine.service.wire import CONTENT_TYPE

    ttft, tokens, errors = [], [0], []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {token}"}) as http:
            for _ in range(drafts):
                t0 = time.perf_counter()
                first = None
                n = 0
                with http.stream("POST", "/v1/drafts", content=body, headers={"Content-Type": CONTENT_TYPE}) as r:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                        continue
                    for line in r.iter_lines():
                        if line.startswith("event: token"):
                            n += 1
                            if first is None:
                                first = time.perf_counter() - t0
                with lock:
                    tokens[0] += n
                    if first is not None:
                        ttft.append(first)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttft, n=20) if len(ttft) >= 2 else [ttft[0]] * 19
    return {"tokens_s": tokens[0] / wall, "drafts_min": clients * drafts / wall * 60, "p50": statistics.median(ttft),
            "p95": q[18], "tokens": tokens[0], "wall": wall, "errors": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--drafts", type=int, default=3, help="drafts per client")
    p.add_argument("--tokens", type=int, default=96, help="max_new_tokens per draft")
    p.add_argument("--threads", type=int, default=1, help="server torch threads (OMP_NUM_THREADS)")
    p.add_argument("--wire", action="store_true", help="print bytes per study of each wire codec and exit")
    args = p.parse_args(argv)
    if args.wire:
        wire_sizes()
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from serve_fixtures import ServerProcess

    from reg2rg.engine.generation import GenerationSettings, ReportEngine
    from reg2rg.engine.phantom import demo_study
    from reg2rg.engine.preprocess import preprocess
    from reg2rg.engine.service.wire import encode_request

    study = demo_study()
    engine = ReportEngine.load(None, "cpu")
    chosen = engine.select_regions(study)
    inputs = preprocess(study, engine.config.input_size, engine.config.orientation, chosen)
    body = encode_request(inputs, chosen, GenerationSettings(max_new_tokens=args.tokens))
    lone = engine.draft(study, None, GenerationSettings(max_new_tokens=args.tokens))
    del engine
    print(f"demo model, demo study ({len(chosen)} regions, {len(lone.tokens)} tokens per draft, stop: "
          f"{lone.stop_reason}), {args.drafts} drafts per client, server threads {args.threads}, "
          f"load average before {os.getloadavg()[0]:.1f}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # both servers up, measured in turns at each client count: load changes on a shared machine hit both
        servers = {b: ServerProcess(Path(tmp) / f"b{b}", "--max-batch", str(b), "--log-level", "warning")
                   for b in (8, 1)}
        try:
            for srv in servers.values():
                srv.start()
                run_clients(srv.url, srv.token, body, 1, 1)           # warm-up
            for n in args.clients:
                for max_batch, srv in servers.items():
                    r = run_clients(srv.url, srv.token, body, n, args.drafts)
                    results[(max_batch, n)] = r
                    print(f"max-batch {max_batch}  clients {n}: {r['tokens_s']:7.1f} tokens/s  "
                          f"{r['drafts_min']:6.1f} drafts/min  TTFT p50 {r['p50']:.2f} s  p95 {r['p95']:.2f} s  "
                          f"({r['tokens']} tokens in {r['wall']:.1f} s, load {os.getloadavg()[0]:.1f}"
                          f"{', errors ' + str(r['errors']) if r['errors'] else ''})", flush=True)
        finally:
            for srv in servers.values():
                srv.stop()
    print(f"load average after {os.getloadavg()[0]:.1f}")
    for n in args.clients:
        b, s = results[(8, n)], results[(1, n)]
        print(f"clients {n}: throughput ratio batched/one-at-a-time = {b['tokens_s'] / s['tokens_s']:.2f}x  "
              f"(TTFT p50 {b['p50']:.2f} s vs {s['p50']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
