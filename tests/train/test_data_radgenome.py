"""Training data: RadGenome layout indexing, bad samples, the pre-processing cache, draw order, collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phantom_dataset import add_bad_samples, read_report_texts, write_phantom_dataset
from reg2rg.engine.preprocess import preprocess
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.studyio import read_study
from reg2rg.engine.tokens import IGNORE_INDEX, add_special_tokens, train_tokenizer
from reg2rg.train.cache import PreprocessCache, UncachedLoader, build_cache
from reg2rg.train.data import (DatasetError, RegionReportDataset, SkipLog, collate_regions, epoch_batches,
                               index_studies, read_reports, read_split_names, resolve_splits)

INPUT_SIZE = (32, 32, 16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("radgenome")
    csv_path, names = write_phantom_dataset(root / "data", [11, 12, 13], mask_root=root / "masks")
    bad = add_bad_samples(root / "data", csv_path, root / "masks", names[0])
    tok = train_tokenizer(read_report_texts(csv_path), 400, root / "tok")
    special = add_special_tokens(tok, num_latents=4, num_regions=10)
    return {"root": root, "csv": csv_path, "names": names, "bad": bad, "tok": tok, "special": special}


def test_reports_csv_groups_rows_by_volume_and_region(dataset):
    reports = read_reports(dataset["csv"])
    name = dataset["names"][0]
    assert set(reports[name]) == set(REGIONS) | {""}      # "" = whole-study report
    assert reports[name]["lung"]


def test_missing_report_csv_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nope.csv: report CSV not found"):
        read_reports(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("Volume,Text\nx,y\n")
    with pytest.raises(DatasetError, match=r"bad.csv: missing column\(s\) Volumename, Anatomy, Sentence \(the header has Volume, Text\)"):
        read_reports(bad)


def test_index_skips_rows_without_volume_volumes_without_report_and_missing_masks(dataset):
    skips = SkipLog(log=False)
    records = index_studies(dataset["root"] / "data", dataset["csv"], mask_root=dataset["root"] / "masks", skips=skips)
    names = {r.name for r in records}
    assert set(dataset["names"]) <= names
    assert {"empty_1_a_1", "broken_1_a_1"} <= names        # found only when read
    reasons = dict(skips.entries)
    for name in ("ghost_1_a_1", "noreport_1_a_1", "nomask_1_a_1"):
        assert reasons[name].startswith(dataset["bad"][name]), reasons
    assert skips.counts() == {"no volume": 1, "no report": 1, "no masks": 1}
    assert "3 samples skipped" in skips.summary()


def test_splits_from_csvs_and_split_file(dataset, tmp_path):
    train_csv, val_csv = tmp_path / "train.csv", tmp_path / "val.csv"
    train_csv.write_text("Volumename\n" + "\n".join(f"{n}.nii.gz" for n in dataset["names"][:2]) + "\n")
    val_csv.write_text("Volumename\n" + f"{dataset['names'][2]}.nii.gz\n")
    assert resolve_splits(str(train_csv), str(val_csv), None, []) == (dataset["names"][:2], dataset["names"][2:])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": dataset["names"][1:], "val": [dataset["names"][0]]}))
    assert resolve_splits(None, None, str(split), []) == (dataset["names"][1:], dataset["names"][:1])
    # without split files, the validation CSV is held out of the training set
    train, val = resolve_splits(None, str(val_csv), None, dataset["names"])
    assert dataset["names"][2] not in train and val == [dataset["names"][2]]
    # a header-less split file: every line is a name
    bare = tmp_path / "bare.csv"
    bare.write_text("".join(f"{n}.nii.gz\n" for n in dataset["names"][:2]))
    assert read_split_names(bare) == dataset["names"][:2]


def test_split_csv_is_read_strictly(tmp_path):
    """A malformed row would silently move a study between the splits: the file is refused, lines named."""
    bad = tmp_path / "val.csv"
    bad.write_text('Volumename\nv_1_a_1.nii.gz\n"v_2_a_1.nii.gz\nv_3_a_1.nii.gz\n')
    with pytest.raises(DatasetError, match=r"val.csv: 1 malformed row\(s\) in the split file: line 3: a quote "
                                           r"opened on line 3 is not closed \(line 4 starts a new row\)"):
        read_split_names(bad)
    bad.write_bytes("Volumename\nv_\u00e9.nii.gz\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="val.csv: not UTF-8 text \\(line 2 has the byte 0xe9\\)"):
        read_split_names(bad)


def _records(dataset):
    return index_studies(dataset["root"] / "data", dataset["csv"], mask_root=dataset["root"] / "masks",
                         skips=SkipLog(log=False))


def test_cache_matches_the_engine_and_is_keyed_by_content_and_settings(dataset, tmp_path):
    records = {r.name: r for r in _records(dataset)}
    record = records[dataset["names"][0]]
    cache = PreprocessCache(tmp_path / "cache", INPUT_SIZE)
    info = build_cache(cache, [record, records["broken_1_a_1"]], workers=1)
    assert "not" in info["broken_1_a_1"]["error"] or info["broken_1_a_1"]["error"]
    cached = cache.load(record)
    # independent reference: the engine's reader and pre-processing called directly
    ref = preprocess(read_study(record.volume, record.masks), INPUT_SIZE)
    assert torch.equal(cached.image, ref.image) and cached.image.shape == (3, *INPUT_SIZE)
    assert set(cached.regions) == set(ref.regions) == set(REGIONS)
    for region in REGIONS:
        assert torch.equal(cached.regions[region], ref.regions[region])
        assert torch.equal(cached.masks[region], ref.masks[region])
    assert tuple(cached.geometry["box"][0]) == tuple(ref.geometry.box[0])
    # another input size, or another file content, is another entry
    other = PreprocessCache(tmp_path / "cache", (32, 32, 8))
    assert other.key(record) != cache.key(record) and other.info(record) is None
    changed = _records(dataset)[0]
    key_before = PreprocessCache(tmp_path / "c2", INPUT_SIZE).key(changed)
    volume = Path(changed.volume)
    data = volume.read_bytes()
    try:
        volume.write_bytes(data + b"\0")
        assert PreprocessCache(tmp_path / "c2", INPUT_SIZE).key(changed) != key_before
    finally:
        volume.write_bytes(data)


def test_cache_build_in_parallel_processes(dataset, tmp_path):
    records = [r for r in _records(dataset) if r.name in dataset["names"]]
    cache = PreprocessCache(tmp_path / "cache", INPUT_SIZE)
    info = build_cache(cache, records, workers=2)
    assert set(info) == set(dataset["names"]) and all("error" not in v for v in info.values())
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(records)


def test_region_order_is_shuffled_per_draw_and_reproducible(dataset):
    records = [r for r in _records(dataset) if r.name in dataset["names"]]
    ds = RegionReportDataset(records, dataset["tok"], dataset["special"], UncachedLoader(INPUT_SIZE), 1024, seed=5)
    orders = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        orders.append(ds.region_order(0, REGIONS))
    assert len({tuple(o) for o in orders}) > 1                      # reshuffled each epoch
    assert all(sorted(o) == sorted(REGIONS) for o in orders)
    ds.set_epoch(2)
    again = RegionReportDataset(records, dataset["tok"], dataset["special"], None, 1024, seed=5)
    again.set_epoch(2)
    assert again.region_order(0, REGIONS) == orders[2]             # same seed/epoch/index -> same order


def test_epoch_batches_split_evenly_over_ranks():
    one = epoch_batches(10, 2, seed=1, epoch=0)
    assert sorted(i for b in one for i in b) == list(range(10))
    assert one != epoch_batches(10, 2, seed=1, epoch=1)
    r0, r1 = (epoch_batches(11, 2, seed=1, epoch=0, rank=r, world_size=2) for r in (0, 1))
    flat0, flat1 = [i for b in r0 for i in b], [i for b in r1 for i in b]
    assert len(flat0) == len(flat1) == 5 and not set(flat0) & set(flat1)
    assert len(r0) == len(r1)                                        # ranks stay in step


def test_collator_flattens_regions_without_padding_regions(dataset):
    records = {r.name: r for r in _records(dataset)}
    first = records[dataset["names"][0]]
    # a sample with only 3 reported regions next to a full one
    partial = type(first)(first.name + "_p", first.volume, first.masks,
                          {r: first.reports[r] for r in ("heart", "lung", "bone")})
    chosen = [first, partial, records["empty_1_a_1"]]
    ds = RegionReportDataset(chosen, dataset["tok"], dataset["special"], UncachedLoader(INPUT_SIZE), 1024, seed=0)
    batch = collate_regions([ds[0], ds[1], ds[2]], pad_id=0)
    assert batch["skipped"] == [("empty_1_a_1", "empty masks: no region has both a report and a non-empty mask")]
    assert batch["images"].shape == (2, 3, *INPUT_SIZE)
    assert batch["region_images"].shape == (13, 3, *INPUT_SIZE)       # 10 + 3, no padding regions
    assert batch["region_masks"].shape == (13, 1, *INPUT_SIZE)
    assert batch["region_sample"].tolist() == [0] * 10 + [1] * 3
    assert batch["region_slot"].tolist() == list(range(10)) + list(range(3))
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] > lengths[1] and batch["input_ids"].shape[1] == int(lengths.max())
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # slot j's region image is the pre-processed image of the region named in slot j of the target
    ref = preprocess(read_study(first.volume, first.masks), INPUT_SIZE)
    for j, region in enumerate(batch["regions"][1]):
        assert torch.equal(batch["region_images"][10 + j], ref.regions[region])
    text = dataset["tok"].decode(batch["input_ids"][1][batch["labels"][1] != IGNORE_INDEX])
    assert [text.index(f"The region {j} is {r}:") for j, r in enumerate(batch["regions"][1])] == sorted(
        text.index(f"The region {j} is {r}:") for j, r in enumerate(batch["regions"][1]))
    assert collate_regions([ds[2]]) == {"skipped": batch["skipped"]}
