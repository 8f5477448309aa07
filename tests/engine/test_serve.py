"""reg2rg-serve on loopback (a real server in a child process) and RemoteEngine, its client.

Security (401 on every route but /health, oversize and malformed payloads answered 4xx with a reason
while the server keeps serving, no token or identifier in its logs), streaming and cancel over the
network, remote drafts equal to drafts in this process, concurrent drafts equal to lone ones."""

from __future__ import annotations

import dataclasses
import json
import struct
import threading
import zlib

import httpx
import numpy as np
import pytest
import torch

from reg2rg.engine.generation import Finished, GenerationError, GenerationSettings, ReportEngine, TokenEvent
from reg2rg.engine.interface import DraftingEngine, EngineUnavailable
from reg2rg.engine.phantom import demo_study
from reg2rg.engine.preprocess import preprocess
from reg2rg.engine.service.client import RemoteEngine
from reg2rg.engine.service.wire import CONTENT_TYPE, MAGIC, decode_request, encode_request, with_selection

from serve_fixtures import ServerProcess, free_port

PATIENT = "DOE^JANE"
MRN = "MRN-20931-77"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("serve"), "--max-body-mb", "4", "--max-new-tokens", "400").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local():
    torch.set_num_threads(1)
    return ReportEngine.load(None, "cpu")


@pytest.fixture(scope="module")
def study():
    s = demo_study()
    return dataclasses.replace(s, name=f"{PATIENT} {MRN}", metadata={**s.metadata, "PatientName": PATIENT,
                                                                    "PatientID": MRN})


@pytest.fixture(scope="module")
def remote(server):
    engine = RemoteEngine(server.url, token_file=str(server.token_file), timeout=120)
    yield engine
    engine.close()


def _body(local, study, regions=None, settings=GenerationSettings(max_new_tokens=8)):
    chosen = local.select_regions(study, regions)
    inputs = preprocess(study, local.config.input_size, local.config.orientation, chosen)
    return encode_request(inputs, chosen, settings)


# ---- security -----------------------------------------------------------------------------------------
def test_every_route_but_health_needs_the_token(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    with server.client() as c:
        schema = c.get("/openapi.json").json()
    routes = [(method.upper(), path.replace("{draft_id}", "0123abcd")) for path, ops in schema["paths"].items()
              for method in ops]
    routes += [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/nonexistent")]
    assert ("POST", "/v1/drafts") in routes and ("GET", "/metrics") in routes
    for explanation in ("attention", "relevance", "dependence", "findings"):
        assert ("POST", f"/v1/drafts/0123abcd/{explanation}") in routes, explanation
    bad_headers = [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {server.token}"},
                   {"Authorization": f"Bearer {server.token}x"}, {"Authorization": server.token}]
    for method, path in routes:
        if path == "/health":
            continue
        for headers in bad_headers:
            r = httpx.request(method, f"{server.url}{path}", headers=headers, content=b"x" if method == "POST" else None)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["detail"] == "missing or wrong bearer token"
            assert r.headers["www-authenticate"].startswith("Bearer")


def test_oversize_and_malformed_payloads_get_4xx_with_a_reason(server, local, study):
    good = _body(local, study)
    assert decode_request(good, local.config.input_size, 10).regions == study.regions_present
    head_len = struct.unpack(">I", good[len(MAGIC):len(MAGIC) + 4])[0]
    header = json.loads(good[len(MAGIC) + 4:len(MAGIC) + 4 + head_len])
    blobs = good[len(MAGIC) + 4 + head_len:]

    def rebuild(h, b=blobs):
        raw = json.dumps(h).encode()
        return MAGIC + struct.pack(">I", len(raw)) + raw + b

    def edited(**changes):
        return rebuild({**header, **changes})

    bomb_h = json.loads(json.dumps(header))
    zeros = zlib.compress(bytes(4 * 64 * 64 * 32 * 4), 9)         # inflates to 4x the image's size
    bomb_h["tensors"][0]["nbytes"] = len(zeros)
    first = header["tensors"][0]["nbytes"]
    nan_h = json.loads(json.dumps(header))
    nan_blob = zlib.compress(np.full((64, 64, 32), np.nan, dtype="<f4").tobytes(), 1)
    nan_h["tensors"][0]["nbytes"] = len(nan_blob)
    cases = {
        "garbage": (b"\x00\x01garbage" * 50, 422, "not a reg2rg study payload"),
        "truncated header": (MAGIC + b"\x00\x00", 422, "ends before its header"),
        "header not json": (MAGIC + struct.pack(">I", 5) + b"{oops" + blobs, 422, "not JSON"),
        "wrong grid": (edited(input_size=[32, 32, 32]), 422, "does not match the model"),
        "unknown region": (edited(regions=["spleen"]), 422, "unknown regions ['spleen']"),
        "region twice": (edited(regions=["heart", "heart"]), 422, "named twice"),
        "bad strategy": (edited(settings={"strategy": "telepathy"}), 422, "unknown decoding strategy"),
        "too many tokens": (edited(settings={"max_new_tokens": 100000}), 422, "above this server's limit"),
        "unknown setting": (edited(settings={"rm_rf": 1}), 422, "unknown settings"),
        "wrong dtype": (rebuild({**header, "tensors": [{**header["tensors"][0], "dtype": "float64"}, *header["tensors"][1:]]}),
                        422, "dtype"),
        "cut short": (good[:-1000], 422, "follow the header"),
        "zip bomb": (rebuild(bomb_h, zeros + blobs[first:]), 422, "decompresses to more"),
        "not finite": (rebuild(nan_h, nan_blob + blobs[first:]), 422, "NaN"),
        "oversize": (good + b"\0" * (4 << 20), 413, "above this server's limit"),
    }
    with server.client() as c:
        for name, (body, status, reason) in cases.items():
            r = c.post("/v1/drafts", content=body, headers={"Content-Type": CONTENT_TYPE})
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert reason in detail, (name, detail)
            assert "\n" not in detail and "Traceback" not in detail, name
        # a body streamed without Content-Length is counted as it arrives
        r = c.post("/v1/drafts", content=iter([b"\0" * (1 << 20)] * 5), headers={"Content-Type": CONTENT_TYPE})
        assert r.status_code == 413
        r = c.post("/v1/drafts", content=good, headers={"Content-Type": "application/json"})
        assert r.status_code == 415
        r = c.post("/v1/drafts/0123/attention", json={"token_indices": "all"})
        assert r.status_code == 422
        assert c.get("/v1/drafts/nope").status_code == 404
        # still serving: ready, and a draft goes through
        assert c.get("/v1/ready").json()["ready"] is True
        with c.stream("POST", "/v1/drafts", content=good, headers={"Content-Type": CONTENT_TYPE}) as r:
            text = "".join(r.iter_text())
        assert r.status_code == 200 and "event: finished" in text


def test_the_wire_carries_no_identifier(local, study):
    body = _body(local, study)
    for secret in (PATIENT, MRN, study.name, "PatientName"):
        assert secret.encode() not in body
    assert len(body) < 2_000_000            # the demo study: ~1.2 MB (zlib float32 model-grid tensors)


# ---- drafting over the network ---------------------------------------------------------------------------------
def test_remote_draft_streams_and_equals_the_local_draft(remote, local, study):
    assert isinstance(remote, DraftingEngine)
    settings = GenerationSettings(max_new_tokens=60)
    events = list(remote.generate(study, None, settings))
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["EncodingStarted", "EncodingDone"] and kinds[-1] == "Finished"
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    result = events[-1].result
    expected = local.draft(study, None, settings)
    assert [t.token_id for t in tokens] == expected.token_ids == result.token_ids
    assert "".join(t.text for t in tokens) == expected.text == result.text
    assert result.stop_reason == expected.stop_reason and result.complete
    assert [s.to_dict() for s in result.sections] == [s.to_dict() for s in expected.sections]
    assert result.region_accuracy == expected.region_accuracy
    assert result.study_name == study.name          # kept on this computer, never sent
    # attention: computed by the server, mapped onto this computer's CT with its own geometry
    am, al = remote.attention_map(result, [0, 1, 2, 3]), local.attention_map(expected, [0, 1, 2, 3])
    assert am.shares.keys() == al.shares.keys()
    assert all(abs(am.shares[k] - al.shares[k]) < 1e-5 for k in al.shares)
    assert am.heatmap.shape == study.voxels.shape
    assert np.allclose(am.heatmap, al.heatmap, atol=1e-6)
    info = remote.model_info()
    assert info["digest"].startswith("sha256:") and info["layers"] >= 1 and info["name"]
    with pytest.raises(Exception, match="outside"):
        remote.attention_map(result, [10_000])


# ---- explanations over the network ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafted(remote, local, study):
    """(remote result, local result) of the same draft."""
    settings = GenerationSettings(max_new_tokens=40)
    result, expected = remote.draft(study, None, settings), local.draft(study, None, settings)
    assert result.token_ids == expected.token_ids and result.remote_draft
    return result, expected


def test_remote_relevance_map_equals_the_local_one(remote, local, study, drafted):
    result, expected = drafted
    for selection in ([3, 4, 5], list(range(len(result.tokens)))):
        rm, lm = remote.relevance_map(result, selection), local.relevance_map(expected, selection)
        assert type(rm) is type(lm) and rm.method == lm.method == "gradient_x_input"
        assert rm.token_indices == lm.token_indices == tuple(selection)
        # computed by the server, projected onto this computer's CT with its own geometry
        assert rm.heatmap.shape == study.voxels.shape and rm.heatmap.max() > 0
        assert np.allclose(rm.heatmap, lm.heatmap, rtol=1e-5, atol=1e-12)
        assert rm.peak_voxel == lm.peak_voxel
        np.testing.assert_allclose(rm.affine, lm.affine)
        assert rm.patch_relevance.keys() == lm.patch_relevance.keys()
        assert rm.group_relevance == pytest.approx(lm.group_relevance, rel=1e-5)
        assert rm.log_prob == pytest.approx(lm.log_prob, abs=1e-5)
    # a draft whose request body this client no longer holds: its tensors are encoded again, same map
    remote._bodies.clear()
    again = remote.relevance_map(result, [3, 4, 5])
    assert np.allclose(again.heatmap, local.relevance_map(expected, [3, 4, 5]).heatmap, rtol=1e-5, atol=1e-12)
    with pytest.raises(GenerationError, match="outside"):
        remote.relevance_map(result, [10_000])


def test_remote_region_dependence_and_findings_check_equal_the_local_ones(remote, local, drafted):
    result, expected = drafted
    rd, ld = remote.region_dependence(result, [3, 4, 5]), local.region_dependence(expected, [3, 4, 5])
    assert rd.token_indices == ld.token_indices and list(rd.drops) == list(ld.drops)      # global, then slot order
    assert rd.drops == pytest.approx(ld.drops, abs=1e-4) and rd.strongest == ld.strongest
    assert rd.log_prob == pytest.approx(ld.log_prob, abs=1e-5)
    rf, lf = remote.finding_check(result, 0.3), local.finding_check(expected, 0.3)
    assert result.findings_check is rf and rf.threshold == 0.3
    assert [(s.slot, s.region) for s in rf.sections] == [(s.slot, s.region) for s in lf.sections]
    for a, b in zip(rf.sections, lf.sections):
        assert [(f.finding, f.stated, f.flag, f.reason) for f in a.findings] == \
               [(f.finding, f.stated, f.flag, f.reason) for f in b.findings]
        assert [f.probability for f in a.findings] == pytest.approx([f.probability for f in b.findings], abs=1e-5)
    with pytest.raises(GenerationError, match="outside"):
        remote.region_dependence(result, [10_000])


def test_explanation_requests_get_404_and_422_with_reasons(server, remote, local, study, drafted):
    result, _ = drafted
    draft = result.remote_draft
    body = remote._bodies.get(draft) or encode_request(result.inputs, result.prepared.slots, result.settings)
    good = with_selection(body, [1, 2])
    other = _body(local, study, study.regions_present[:3])         # another study: other regions
    image = result.inputs.image.clone()
    image[:, 10, 10, 10] += 0.25                                   # one voxel of the draft's study changed
    altered = with_selection(encode_request(dataclasses.replace(result.inputs, image=image), result.prepared.slots,
                                            result.settings), [1])
    study_type = {"Content-Type": CONTENT_TYPE}
    with server.client() as c:
        for route, kwargs in (("relevance", {"content": good, "headers": study_type}),
                              ("dependence", {"json": {"token_indices": [1]}}), ("findings", {"json": {}}),
                              ("attention", {"json": {"token_indices": [1]}})):
            r = c.post(f"/v1/drafts/0123abcd/{route}", **kwargs)
            assert r.status_code == 404, (route, r.text)
            assert "no finished draft 0123abcd" in r.json()["detail"] and "regenerate" in r.json()["detail"]
        cases = {
            "relevance: not a study": ("relevance", {"content": b"{}", "headers": study_type}, 422, "not a reg2rg study"),
            "relevance: json": ("relevance", {"json": {"token_indices": [1]}}, 415, CONTENT_TYPE),
            "relevance: no selection": ("relevance", {"content": body, "headers": study_type}, 422, "give the selection"),
            "relevance: bad selection": ("relevance", {"content": with_selection(body, []), "headers": study_type}, 422,
                                         "token_indices must be a list of 1 to 4096"),
            "relevance: outside": ("relevance", {"content": with_selection(body, [10_000]), "headers": study_type}, 422,
                                   "outside"),
            "relevance: another study": ("relevance", {"content": with_selection(other, [1]), "headers": study_type},
                                         422, f"not the one draft {draft} was drafted from"),
            "relevance: another tensor": ("relevance", {"content": altered, "headers": study_type}, 422,
                                          "not the one draft"),
            "dependence: empty": ("dependence", {"json": {"token_indices": []}}, 422, "give 1 to 4096"),
            "dependence: outside": ("dependence", {"json": {"token_indices": [10_000]}}, 422, "outside"),
            "dependence: not a list": ("dependence", {"json": {"token_indices": "all"}}, 422, ""),
            "findings: threshold": ("findings", {"json": {"threshold": 2}}, 422, "between 0 and 1"),
            "findings: contradiction": ("findings", {"json": {"contradiction_below": -0.5}}, 422, "between 0 and 1"),
        }
        for name, (route, kwargs, status, reason) in cases.items():
            r = c.post(f"/v1/drafts/{draft}/{route}", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert reason in str(detail), (name, detail)
            assert "Traceback" not in str(detail), name
            if isinstance(detail, str):
                assert "\n" not in detail, name
        # still serving: the good request goes through
        r = c.post(f"/v1/drafts/{draft}/relevance", content=good, headers=study_type)
        assert r.status_code == 200 and r.json()["token_indices"] == [1, 2]


def test_cancel_over_the_network(remote, local, study):
    cancel = threading.Event()
    result = None
    for ev in remote.generate(study, None, GenerationSettings(max_new_tokens=300), cancel):
        if isinstance(ev, TokenEvent) and ev.index == 3:
            cancel.set()
        if isinstance(ev, Finished):
            result = ev.result
    assert result is not None and result.stop_reason == "cancelled" and not result.complete
    assert 4 <= len(result.tokens) < 300
    prefix = local.draft(study, None, GenerationSettings(max_new_tokens=len(result.tokens)))
    assert result.token_ids == prefix.token_ids
    # the finished draft can be fetched by id
    fetched = remote.fetch(result.remote_draft)
    assert fetched["state"] == "finished" and fetched["result"]["stop_reason"] == "cancelled"


def test_concurrent_remote_drafts_equal_lone_drafts(remote, local, study):
    present = study.regions_present
    jobs = [(None, 30), (present[:3], 20), (present[4:9], 40), (present[-2:], 10)]
    out = [None] * len(jobs)

    def run(i):
        out[i] = remote.draft(study, jobs[i][0], GenerationSettings(max_new_tokens=jobs[i][1]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (regions, n), got in zip(jobs, out):
        assert got is not None
        assert got.token_ids == local.draft(study, regions, GenerationSettings(max_new_tokens=n)).token_ids


def test_client_errors_are_one_clear_line(server, study):
    wrong = RemoteEngine(server.url, token="not-the-token")
    with pytest.raises(EngineUnavailable, match="refused the token") as err:
        list(wrong.generate(study))
    assert err.value.retry is False and "not-the-token" not in str(err.value)
    nobody = RemoteEngine(f"http://127.0.0.1:{free_port()}", token="x", timeout=5)
    with pytest.raises(EngineUnavailable, match="cannot reach the engine server") as err:
        nobody.draft(study)
    assert err.value.retry is True and err.value.partial is None
    with server.client() as c:
        assert c.get("/v1/ready").status_code == 200
        metrics = c.get("/metrics").text
    for series in ("reg2rg_queue_length", "reg2rg_active_drafts", "reg2rg_generated_tokens_total",
                   "reg2rg_tokens_per_second", "reg2rg_time_to_first_token_seconds_bucket",
                   "reg2rg_decode_batch_size_bucket", "reg2rg_draft_seconds_bucket"):
        assert series in metrics, series


def test_logs_hold_no_token_or_identifier(server, remote, study):
    remote.draft(study, None, GenerationSettings(max_new_tokens=5))
    logs = server.logs()
    assert "POST /v1/drafts" in logs                 # the log is really captured
    for secret in (server.token, PATIENT, MRN, "PatientName"):
        assert secret not in logs, secret


def test_generate_cli_drafts_on_the_server(server, local, tmp_path, capsys):
    from reg2rg.engine.cli import main

    out = tmp_path / "out"
    code = main(["--demo", "--server", server.url, "--token-file", str(server.token_file), "--max-new-tokens", "20",
                 "--attention", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "report.json").read_text())
    expected = local.draft(demo_study(), None, GenerationSettings(max_new_tokens=20))
    assert data["text"] == expected.text
    # the server explains as the engine of this computer: relevance maps, region dependence, findings check
    assert (out / "relevance_report.nii.gz").is_file() and not data["notes"]
    entry = data["attention"]["relevance_report.nii.gz"]
    assert entry["method"] == "relevance" and entry["region_dependence"]["drops_nats"]
    assert data["findings_check"]["sections"] is not None
    # a wrong token and a server that is not there: one line each, exit status non-zero, no traceback
    bad = tmp_path / "bad_token"
    bad.write_text("nope\n")
    assert main(["--demo", "--server", server.url, "--token-file", str(bad), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "refused the token" in err and "Traceback" not in err and "nope" not in err
    assert main(["--demo", "--server", f"http://127.0.0.1:{free_port()}", "--token-file", str(bad),
                 "--out", str(tmp_path / "y")]) == 1
    assert "cannot reach the engine server" in capsys.readouterr().err
    assert main(["--demo", "--server", server.url, "--token-file", str(tmp_path / "missing")]) == 2
    assert "cannot read the token file" in capsys.readouterr().err


def test_queued_events_go_out_as_one_chunk_and_the_end_is_seen():
    """The stream writes every event already queued in one chunk: a behind reader gets them together,
    in order, and the end marker stops the stream even when it is queued behind events."""
    import asyncio

    from reg2rg.engine.service.server import _sse, take_ready

    async def run():
        q: asyncio.Queue = asyncio.Queue()
        events = [_sse("token", {"index": i}) for i in range(4)]
        for ev in events[1:]:
            q.put_nowait(ev)
        chunk, end = take_ready(events[0], q)
        assert chunk == b"".join(events) and not end and q.empty()
        q.put_nowait(events[1])
        q.put_nowait(None)
        q.put_nowait(events[2])                    # nothing after the end is sent
        assert take_ready(events[0], q) == (events[0] + events[1], True)
        assert take_ready(None, q) == (b"", True)
        lines = chunk.decode().splitlines()
        assert [json.loads(x[6:])["index"] for x in lines if x.startswith("data: ")] == [0, 1, 2, 3]

    asyncio.run(run())
