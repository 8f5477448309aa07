"""Load and fault test of reg2rg-serve on loopback (bounded: 16 clients x 5 drafts, ~1 minute on 2 cores).

Clients cancel at random; the server is killed (SIGKILL) and restarted on the same port mid-run.
Every draft must end as one of: a complete draft identical to the lone greedy draft, a cancelled
draft that is a prefix of it, or a clear `EngineUnavailable` whose partial draft (if any) is marked
"interrupted" and is a prefix too. No draft is reported complete when it is not; nothing is left in
the batch; the restarted server's memory after the run is back near the first server's warm baseline.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from reg2rg.engine.generation import Finished, GenerationSettings, ReportEngine, TokenEvent
from reg2rg.engine.interface import EngineUnavailable
from reg2rg.engine.phantom import demo_study
from reg2rg.engine.service.client import RemoteEngine

from serve_fixtures import ServerProcess, rss_mb

CLIENTS, DRAFTS, TOKENS = 16, 5, 16


def test_sixteen_clients_random_cancels_and_a_server_restart(tmp_path):
    torch.set_num_threads(1)
    study = demo_study()
    present = study.regions_present
    region_sets = [tuple(present[:2]), tuple(present[3:5]), tuple(present[6:8])]
    settings = GenerationSettings(max_new_tokens=TOKENS)
    local = ReportEngine.load(None, "cpu")
    reference = {rs: local.draft(study, list(rs), settings).token_ids for rs in region_sets}
    del local

    srv = ServerProcess(tmp_path / "srv", "--max-new-tokens", "64", "--keep-drafts", "8", "--log-level", "warning")
    srv.start()
    try:
        warm = RemoteEngine(srv.url, token_file=str(srv.token_file), timeout=60)
        for rs in region_sets:
            assert warm.draft(study, list(rs), settings).token_ids == reference[rs]
        # the warm baseline: the idle server after one burst of CLIENTS concurrent drafts (its steady state)
        burst = [threading.Thread(target=lambda rs=rs: warm.draft(study, list(rs), settings))
                 for rs in region_sets * (CLIENTS // len(region_sets) + 1)][:CLIENTS]
        for t in burst:
            t.start()
        for t in burst:
            t.join(300)
        time.sleep(1.0)
        baseline = rss_mb(srv.proc.pid)

        outcomes: list[tuple[str, int, str]] = []       # (kind, client, detail)
        problems: list[str] = []
        lock = threading.Lock()
        finished_count = [0]
        restarted = threading.Event()

        def record(kind, i, detail=""):
            with lock:
                outcomes.append((kind, i, detail))
                finished_count[0] += 1

        def client(i: int) -> None:
            rng = random.Random(i)
            engine = RemoteEngine(srv.url, token_file=str(srv.token_file), timeout=60)
            for _ in range(DRAFTS):
                rs = rng.choice(region_sets)
                ref = reference[rs]
                stop_at = rng.randrange(1, TOKENS - 2) if rng.random() < 0.3 else None
                cancel = threading.Event()
                try:
                    result = None
                    for ev in engine.generate(study, list(rs), settings, cancel):
                        if isinstance(ev, TokenEvent) and stop_at is not None and ev.index == stop_at:
                            cancel.set()
                        if isinstance(ev, Finished):
                            result = ev.result
                    if result is None:
                        problems.append(f"client {i}: the stream ended without a result or an error")
                    elif result.complete:
                        if result.token_ids != ref:
                            problems.append(f"client {i}: a draft reported complete differs from the lone draft")
                        record("complete", i)
                    elif result.stop_reason == "cancelled":
                        if stop_at is None or result.token_ids != ref[:len(result.token_ids)]:
                            problems.append(f"client {i}: a cancelled draft that was not cancelled or not a prefix")
                        record("cancelled", i)
                    else:
                        problems.append(f"client {i}: unexpected stop reason {result.stop_reason}")
                except EngineUnavailable as err:
                    msg = str(err)
                    if not msg or "\n" in msg or "Traceback" in msg or srv.token in msg:
                        problems.append(f"client {i}: unclear error {msg!r}")
                    p = err.partial
                    if p is not None and (p.complete or p.stop_reason != "interrupted"
                                          or p.token_ids != ref[:len(p.token_ids)]):
                        problems.append(f"client {i}: a partial draft not marked interrupted or not a prefix")
                    record("error", i, msg)
                    # as a reader pressing Retry: wait until the server answers again (bounded)
                    deadline = time.time() + 90
                    while not engine.health() and time.time() < deadline:
                        time.sleep(0.5)
                except Exception as err:  # noqa: BLE001 - anything else is a failure of the test
                    problems.append(f"client {i}: {type(err).__name__}: {err}")
                    record("crash", i, str(err))
            engine.close()

        def killer() -> None:
            while finished_count[0] < 20:
                time.sleep(0.05)
            srv.kill()
            time.sleep(1.0)
            srv.start(timeout=600)
            restarted.set()

        t0 = time.time()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        k = threading.Thread(target=killer, daemon=True)
        k.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        k.join(300)
        elapsed = time.time() - t0
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert restarted.is_set(), "the server was not restarted"
        assert not problems, "\n".join(problems[:20])
        kinds = [o[0] for o in outcomes]
        assert len(outcomes) == CLIENTS * DRAFTS
        assert "crash" not in kinds
        assert kinds.count("error") >= 1, "the kill went unnoticed"
        assert kinds.count("complete") >= CLIENTS, kinds
        errors = {o[2].split(" (")[0] for o in outcomes if o[0] == "error"}
        # nothing left running on the restarted server, memory back near the warm baseline
        after = RemoteEngine(srv.url, token_file=str(srv.token_file), timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline:
            ready = after._get("/v1/ready", "ready")
            if ready["active"] == 0 and ready["waiting"] == 0:
                break
            time.sleep(0.2)
        assert ready["active"] == 0 and ready["waiting"] == 0
        time.sleep(1.0)
        end = rss_mb(srv.proc.pid)
        print(f"\nload: {CLIENTS}x{DRAFTS} drafts in {elapsed:.1f} s: {kinds.count('complete')} complete, "
              f"{kinds.count('cancelled')} cancelled, {kinds.count('error')} clear errors {sorted(errors)}; "
              f"RSS warm baseline {baseline:.0f} MB, restarted server after the run {end:.0f} MB")
        assert end < baseline * 1.15 + 32, f"server memory {end:.0f} MB vs warm baseline {baseline:.0f} MB"
    finally:
        srv.stop()
    assert "Traceback" not in srv.logs()
    assert srv.token not in srv.logs()


pytestmark = pytest.mark.timeout(1200)      # bounded; ~2 min on an idle 2-core machine
