"""RadGenome-ChestCT training data: index the folder, read and pre-process through `engine`, draw samples.

The layout (docs/reproduction.md §3)::

    <root>/<patient>/<accession>/<volume>.nii.gz
    <mask_root>/seg_<volume>/<region>.nii.gz
    reports CSV: Volumename, Anatomy, Sentence      (empty Anatomy = the whole-study report)

Nothing here reads NIfTI or resizes a volume itself: `reg2rg.engine.studyio.read_study` and
`reg2rg.engine.preprocess.preprocess` do (through `train.cache`). This module decides *which* studies
and regions are usable, the order in which they are drawn, and how a batch is laid out for
`Reg2RG.forward` (regions flattened over the batch, no padding regions).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from reg2rg.engine.dataset import (DatasetError, find_mask_folder, read_reports, scan_volumes,  # noqa: F401
                                   volume_key)
from reg2rg.engine.regions import REGIONS

from .labeller import ABNORMALITIES, SIDE_LABELS, finding_sides, label_report

if TYPE_CHECKING:
    from .features import StudyFeatures

logger = logging.getLogger("reg2rg.train.data")



@dataclass
class StudyRecord:
    """One volume of the dataset with everything needed to read it and its region reports."""

    name: str                                   # volume name without extension (the CSV's key)
    volume: str                                 # path of the .nii.gz
    masks: str | None                           # seg_<volume> folder, None when missing
    reports: dict[str, str] = field(default_factory=dict)   # canonical region -> report sentence(s)
    report: str = ""                            # whole-study report (empty Anatomy rows)


class SkipLog:
    """Bad samples: one logged line each (rank 0 only), and a summary count by reason."""

    def __init__(self, log: bool = True):
        self.entries: list[tuple[str, str]] = []
        self._seen: set[tuple[str, str]] = set()
        self.log = log

    def add(self, name: str, reason: str) -> None:
        if (name, reason) in self._seen:
            return
        self._seen.add((name, reason))
        self.entries.append((name, reason))
        if self.log:
            logger.warning("skipped %s: %s", name, reason)

    def counts(self) -> Counter:
        """Number of skipped samples by reason category (the text before the first ':')."""
        return Counter(reason.split(":")[0] for _, reason in self.entries)

    def summary(self) -> str:
        if not self.entries:
            return "no samples skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts().items()))
        return f"{len(self.entries)} samples skipped ({parts})"


def read_split_names(path: str | os.PathLike) -> list[str]:
    """Volume names from a split CSV (a ``Volumename`` column, or the first column). Read strictly
    (`reg2rg.engine.csvtable.read_csv`): a malformed row refuses the file with its lines named, since
    leaving it out would silently move a study between the splits."""
    from reg2rg.engine.csvtable import CsvFormatError, read_csv

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: split file not found")
    if not Path(path).read_bytes().strip():
        return []
    try:
        table = read_csv(path)
    except CsvFormatError as err:
        raise DatasetError(str(err)) from None
    if table.all_problems:
        raise DatasetError(f"{path}: {len(table.all_problems)} malformed row(s) in the split file: "
                           f"{table.describe_problems()}")
    if "Volumename" in table.header:
        column, names = "Volumename", []
    else:                                      # no header: the first line is a name too
        column, names = table.header[0], [table.header[0]]
    names += [row[column] for _line, row in table.rows]
    return list(dict.fromkeys(volume_key(n) for n in names if n.strip()))


def resolve_splits(train_split: str | None, val_split: str | None, split_file: str | None,
                   available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Train and validation volume names from two CSVs, or a JSON ``{"train": [...], "val": [...]}``;
    without any, every available volume is training data and there is no validation set."""
    if split_file:
        try:
            with open(split_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetError(f"{split_file}: cannot read split file ({err})") from err
        if not isinstance(data, dict) or "train" not in data:
            raise DatasetError(f"{split_file}: expected a JSON object with a 'train' list (and 'val')")
        val = data.get("val", data.get("validation", []))
        return [volume_key(n) for n in data["train"]], [volume_key(n) for n in val]
    train = read_split_names(train_split) if train_split else sorted(available)
    val = read_split_names(val_split) if val_split else []
    if not train_split:
        held_out = set(val)
        train = [n for n in train if n not in held_out]
    return train, val


def index_studies(root: str | os.PathLike, reports_csv, names: Sequence[str] | None = None,
                  mask_root: str | os.PathLike | None = None, skips: SkipLog | None = None) -> list[StudyRecord]:
    """Match volumes, mask folders and reports; skip (and log) what cannot be a training sample.

    Skipped here: CSV rows without a volume file, volumes without any region report, volumes without a
    ``seg_<volume>`` mask folder. Unreadable volumes and empty masks are found when the study is read.
    """
    skips = skips if skips is not None else SkipLog()
    mask_root = Path(mask_root) if mask_root else Path(root)
    volumes = scan_volumes(root)
    reports = read_reports(reports_csv)
    wanted = list(names) if names is not None else sorted(set(volumes) | set(reports))
    records: list[StudyRecord] = []
    for name in wanted:
        if name not in volumes:
            skips.add(name, "no volume: named in the report CSV or split but no .nii.gz found"
                      if name in reports else "no volume: named in the split but no .nii.gz found")
            continue
        entry = reports.get(name, {})
        region_reports = {r: s for r, s in entry.items() if r and s}
        if not region_reports:
            skips.add(name, "no report: the volume has no region rows in the report CSV")
            continue
        mask_dir = find_mask_folder(mask_root, Path(volumes[name]), name)
        if mask_dir is None:
            skips.add(name, f"no masks: seg_{name} folder not found under {mask_root}")
            continue
        records.append(StudyRecord(name=name, volume=volumes[name], masks=str(mask_dir),
                                   reports=region_reports, report=entry.get("", "")))
    return records


# ---- drawing samples --------------------------------------------------------------------------------

def draw_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one draw of one sample: depends only on (seed, epoch, index), so a resumed
    run, any worker count and any rank reproduce the same region order."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def epoch_batches(num_samples: int, micro_batch: int, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's micro-batches for one epoch: a seeded permutation split evenly over ranks.

    Every rank gets the same number of samples (the remainder of the permutation is dropped so that
    ranks stay in step); the last micro-batch may be short.
    """
    order = np.random.default_rng([int(seed), int(epoch), 7919]).permutation(num_samples)
    per_rank = num_samples // world_size
    mine = order[rank::world_size][:per_rank].tolist()
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


@dataclass
class StudyTensors:
    """A pre-processed study (what `preprocess` returns, in tensors), as cached on disk."""

    image: torch.Tensor                           # (3, H, W, D)
    regions: dict[str, torch.Tensor]             # region -> (3, H, W, D)
    masks: dict[str, torch.Tensor]               # region -> (1, H, W, D)
    geometry: dict[str, Any] = field(default_factory=dict)


class RegionReportDataset(torch.utils.data.Dataset):
    """Samples for `Reg2RG.forward`: one study, its usable regions in a freshly shuffled slot order,
    and the tokenized prompt + target.

    A region is usable when it has both a report and a non-empty mask. A study with none is skipped
    (see ``__getitem__``). Call `set_epoch` before each epoch.

    With ``finding_labels`` (names among the labeller's `ABNORMALITIES` and `SIDE_LABELS`), each sample also carries the
    targets of the model's finding head: per region, the labels `label_report` reads in that region's
    own report sentence, and for the global image their union over the study's regions.
    """

    def __init__(self, records: Sequence[StudyRecord], tokenizer, special, load_study, max_length: int,
                 seed: int = 42, shuffle_regions: bool = True, finding_labels: Sequence[str] = (),
                 features: Mapping[str, StudyFeatures] | None = None):
        self.records = list(records)
        self.features = features                  # study name -> its frozen encoders' output (see train.features)
        self.tokenizer = tokenizer
        self.special = special
        self.load_study = load_study              # StudyRecord -> StudyTensors (raises on bad input)
        self.max_length = max_length
        self.seed = seed
        self.epoch = 0
        self.shuffle_regions = shuffle_regions
        self.finding_labels = tuple(finding_labels)
        unknown = [n for n in self.finding_labels if n not in ABNORMALITIES and n not in SIDE_LABELS]
        if unknown:
            raise ValueError(f"finding labels {unknown} are not labeller abnormalities or side labels")
        self._targets: dict[str, dict[str, torch.Tensor]] = {}

    def finding_targets(self, record: StudyRecord) -> dict[str, torch.Tensor]:
        """Region -> (K,) 0/1 targets of the finding head, plus ``""`` -> the study's union (cached)."""
        if record.name not in self._targets:
            targets = {}
            for region, sentence in record.reports.items():
                labels = label_report(sentence)
                if any(n in SIDE_LABELS for n in self.finding_labels):
                    labels.update(finding_sides(sentence))
                targets[region] = torch.tensor([float(labels[n]) for n in self.finding_labels])
            union = torch.stack(list(targets.values())).amax(dim=0) if targets else torch.zeros(len(self.finding_labels))
            targets[""] = union
            self._targets[record.name] = targets
        return self._targets[record.name]

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def region_order(self, index: int, usable: Sequence[str]) -> list[str]:
        """Slot order of ``usable`` regions for this draw (published: shuffled every draw)."""
        usable = list(usable)
        if not self.shuffle_regions:
            return usable
        perm = draw_rng(self.seed, self.epoch, index).permutation(len(usable))
        return [usable[i] for i in perm]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample, or ``{"skipped": name, "reason": why}`` for a study that cannot be used (the
        collator passes those on so the main process logs them, even from DataLoader workers)."""
        from reg2rg.engine.errors import StudyError
        from reg2rg.engine.tokens import build_example

        record = self.records[index]
        features = self.features.get(record.name) if self.features is not None else None
        tensors = None
        if features is None:
            try:
                tensors = self.load_study(record)
            except (StudyError, OSError, ValueError) as err:
                return {"skipped": record.name, "reason": f"unreadable: {err}"}
        present = features.regions if features is not None else tensors.regions
        usable = [r for r in REGIONS if r in record.reports and r in present]
        if not usable:
            return {"skipped": record.name, "reason": "empty masks: no region has both a report and a non-empty mask"}
        order = self.region_order(index, usable)[: self.special.num_regions]
        example = build_example(self.tokenizer, [(r, record.reports[r]) for r in order],
                                max_length=self.max_length, special=self.special, pad=False)
        sample = {
            "name": record.name,
            "input_ids": example["input_ids"],
            "labels": example["labels"],
            "attention_mask": example["attention_mask"],
            "regions": order,
            "region_ids": torch.tensor([REGIONS.index(r) for r in order], dtype=torch.long),   # (n,)
        }
        if features is not None:
            sample["global_latents"] = features.global_latents                                  # (L, dim)
            sample["region_latents"] = torch.stack([features.regions[r][0] for r in order])   # (n, L, dim)
            sample["mask_features"] = torch.stack([features.regions[r][1] for r in order])    # (n, mask dim)
            if features.density:                                                            # finding_density
                sample["region_density"] = torch.stack([features.density[r] for r in order])  # (n, F)
        else:
            sample["image"] = tensors.image                                                    # (3, H, W, D)
            sample["region_images"] = torch.stack([tensors.regions[r] for r in order])        # (n, 3, H, W, D)
            sample["region_masks"] = torch.stack([tensors.masks[r] for r in order])           # (n, 1, H, W, D)
        if self.finding_labels:
            targets = self.finding_targets(record)
            sample["global_finding_targets"] = targets[""]                      # (K,)
            sample["finding_targets"] = torch.stack([targets[r] for r in order])  # (n, K)
        return sample


def collate_regions(samples: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Batch samples for `Reg2RG.forward`: text right-padded to the longest sample, images stacked,
    regions flattened over the batch with their sample index and slot (no padding regions).

    Skipped samples are left out and listed under ``"skipped"`` as (name, reason); when nothing is
    left the batch has only that key.
    """
    skipped = [(s["skipped"], s["reason"]) for s in samples if "skipped" in s]
    samples = [s for s in samples if "skipped" not in s]
    if not samples:
        return {"skipped": skipped}
    length = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, value: int) -> torch.Tensor:
        out = torch.full((len(samples), length), value, dtype=torch.long)
        for i, s in enumerate(samples):
            out[i, : len(s[key])] = s[key]
        return out

    region_sample = torch.cat([torch.full((len(s["regions"]),), i, dtype=torch.long) for i, s in enumerate(samples)])
    region_slot = torch.cat([torch.arange(len(s["regions"]), dtype=torch.long) for s in samples])
    batch = {
        "input_ids": pad("input_ids", pad_id),                                 # (B, T)
        "labels": pad("labels", -100),                                         # (B, T)
        "attention_mask": pad("attention_mask", 0),                            # (B, T)
        "region_sample": region_sample,                                        # (N,)
        "region_slot": region_slot,                                            # (N,)
        "region_ids": torch.cat([s["region_ids"] for s in samples]),           # (N,) index in REGIONS
        "names": [s["name"] for s in samples],
        "regions": [s["regions"] for s in samples],
        "skipped": skipped,
    }
    if all("global_latents" in s for s in samples):        # the frozen encoders' output (train.features)
        batch["global_latents"] = torch.stack([s["global_latents"] for s in samples])      # (B, L, dim)
        batch["region_latents"] = torch.cat([s["region_latents"] for s in samples])        # (N, L, dim)
        batch["mask_features"] = torch.cat([s["mask_features"] for s in samples])          # (N, mask dim)
        if all("region_density" in s for s in samples):
            batch["region_density"] = torch.cat([s["region_density"] for s in samples])    # (N, F)
    else:
        if any("global_latents" in s for s in samples):
            raise ValueError("a batch mixes encoded studies with volumes; give every study's features or none")
        batch["images"] = torch.stack([s["image"] for s in samples])                       # (B, 3, H, W, D)
        batch["region_images"] = torch.cat([s["region_images"] for s in samples])          # (N, 3, H, W, D)
        batch["region_masks"] = torch.cat([s["region_masks"] for s in samples])            # (N, 1, H, W, D)
    if all("finding_targets" in s for s in samples):
        batch["finding_targets"] = torch.cat([s["finding_targets"] for s in samples])               # (N, K)
        batch["global_finding_targets"] = torch.stack([s["global_finding_targets"] for s in samples])  # (B, K)
    return batch


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "region_sample", "region_slot", "region_ids")
#: Inputs passed on to `Reg2RG.forward` when the batch has them: the volumes or their frozen encoders' output,
#: the finding head's targets.
OPTIONAL_INPUT_KEYS = ("images", "region_images", "region_masks", "global_latents", "region_latents",
                       "mask_features", "region_density", "finding_targets", "global_finding_targets")
