"""``reg2rg-generate``: draft reports headlessly with the same engine the viewer uses.

Three ways to name the studies:

* ``--volume CT --masks MASKS``: one study; files go straight into ``--out``. Without masks it stops
  (Reg2RG needs its region masks) unless ``--segment`` makes them with TotalSegmentator (`segment`) or
  ``--allow-no-masks`` drafts anyway, marked in report.txt/report.json as outside the training distribution;
* ``--demo``: the embedded demo study (with the demo model unless ``--model`` is given);
* ``--dataset ROOT --masks MASK_ROOT --reports CSV``: every volume of a RadGenome-style dataset
  (``ROOT/<patient>/<accession>/<volume>.nii.gz``, masks in ``MASK_ROOT/seg_<volume>/<region>.nii.gz``,
  reports ``Volumename, Anatomy, Sentence``) that has a report; files go into ``--out/<volume>/`` and
  one row per study is appended to ``--out/predictions.csv`` as soon as it is done, so an interrupted
  run resumes where it stopped (studies already in the CSV are skipped).

Per study: ``report.txt`` (the draft), ``report.json`` (sections with grounding, sentences, every token
with probability, entropy and alternatives, confidence per region; regions asked for but not written, under
``not_drafted``, also listed in report.txt; the findings check: each drafted region's per-finding
probabilities with omission/contradiction flags) and, with ``--attention``, one relevance map NIfTI
(``--attention-method raw``: raw attention) per region section plus one for the whole report, aligned with
the CT (same affine), with its region dependence.

``--export pdf,txt,json,sr,fhir`` renders the report document (`reg2rg.engine.report`: identification,
technique, findings in reading order with their state and flags, impression, provenance, the AI-draft
statement) as ``report.pdf``, ``report.txt``, ``report.json`` (the engine's own JSON kept under
``engine_result``), ``report.sr.dcm`` (DICOM Comprehensive SR) and ``report.fhir.json`` (FHIR
DiagnosticReport). Nobody has reviewed a draft written here: every export says so.

``predictions.csv`` columns: ``AccNum, GT_combined_report, Pred_combined_report, Region_slots``
(the JSON ``{"slot": "true region"}`` that ``reg2rg-eval --by-region`` grades the named areas against).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("reg2rg.engine.cli")

PREDICTIONS = "predictions.csv"
COLUMNS = ("AccNum", "GT_combined_report", "Pred_combined_report", "Region_slots")


class CliError(ValueError):
    """A problem with the command line or its inputs; printed as is, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reg2rg-generate",
        description="Draft region-by-region chest CT reports with Reg2RG (no GUI). "
                    "The embedded demo model is trained on synthetic phantoms: not for clinical use.")
    src = p.add_argument_group("studies (choose one)")
    src.add_argument("--volume", help="CT volume (NIfTI file or DICOM series folder)")
    p.add_argument("--series", metavar="NUMBER_OR_UID",
                   help="with a DICOM folder holding several series: the one to read (default: the largest CT series)")
    src.add_argument("--demo", action="store_true", help="the embedded demo study")
    src.add_argument("--dataset", metavar="ROOT", help="RadGenome-style data root (needs --masks and --reports)")
    p.add_argument("--masks", help="region masks: a folder of per-region NIfTIs or a label map "
                                   "(with --dataset: the root holding seg_<volume>/ folders)")
    p.add_argument("--segment", action="store_true",
                   help="with --volume and no --masks: make the region masks with TotalSegmentator first "
                        "(as reg2rg-segment; needs the [segment] extra and its weights; cached per study)")
    p.add_argument("--segment-fast", action="store_true", help="with --segment: TotalSegmentator's fast 'total' model")
    p.add_argument("--allow-no-masks", action="store_true",
                   help="draft a study without region masks anyway (the draft is marked as outside the model's "
                        "training distribution)")
    p.add_argument("--reports", metavar="CSV", help="with --dataset: reference reports (Volumename, Anatomy, Sentence)")
    p.add_argument("--limit", type=int, default=None, help="with --dataset: at most this many new studies")
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="DIR", help="model folder (default: the embedded demo model)")
    model.add_argument("--published", metavar="FILE", help="the published Reg2RG checkpoint (needs --llm)")
    model.add_argument("--llm", metavar="DIR", help="local LLaMA-2-7B-chat folder (published checkpoint or LoRA model)")
    model.add_argument("--non-strict", action="store_true",
                       help="with --published: load a checkpoint whose keys do not match the model (missing weights "
                            "stay random; for inspecting a damaged or foreign file, not for drafting)")
    model.add_argument("--server", metavar="URL",
                       help="draft on a reg2rg-serve at URL (http(s)://host:port) instead of in this process")
    model.add_argument("--token-file", metavar="F",
                       help="with --server: file holding the bearer token (default: $REG2RG_SERVER_TOKEN, else the "
                            "file a local reg2rg-serve writes)")
    model.add_argument("--device", default="auto", help="auto (CUDA if available, else the CPU), cpu, cuda, cuda:1")
    model.add_argument("--precision", "--dtype", dest="dtype", default=None, metavar="PRECISION",
                       choices=("auto", "fp32", "bf16", "reference", "fp16", "float32", "bfloat16", "float16"),
                       help="auto (default): fp32 on the CPU; on CUDA reference for --published, else bf16. "
                            "reference (= fp16): the LLM in fp16, the vision path in fp32, as the published run")
    gen = p.add_argument_group("generation")
    gen.add_argument("--regions", nargs="+", metavar="REGION",
                     help="report on these regions only (default: every region with a mask); quote multi-word names")
    gen.add_argument("--decoding", choices=("greedy", "published"), default="greedy",
                     help="decoding preset: greedy (default; the same draft every time) or published (the LLaMA "
                          "folder's generation_config.json + top-k 30 + seed 20, as the published run); the "
                          "options below override single settings of the preset")
    gen.add_argument("--strategy", choices=("greedy", "sample", "beam"), default=None)
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default 500")
    gen.add_argument("--temperature", type=float, default=None, help="sampling (default 1.0)")
    gen.add_argument("--top-k", type=int, default=None, help="sampling (default 30; 0 = off)")
    gen.add_argument("--top-p", type=float, default=None, help="sampling (default 1.0)")
    gen.add_argument("--seed", type=int, default=None, help="sampling (default: drawn, and recorded in report.json)")
    gen.add_argument("--num-beams", type=int, default=None, help="beam search (default 4)")
    p.add_argument("--attention", action="store_true",
                   help="also write, per region section and for the whole report, a heatmap (NIfTI, CT affine) "
                        "and the region dependence (in report.json)")
    p.add_argument("--attention-method", choices=("relevance", "raw"), default="relevance",
                   help="heatmap: relevance (gradient x input, the evidence; default) or raw attention weights")
    p.add_argument("--omission-threshold", type=float, default=None, metavar="P",
                   help="findings check: flag an unreported finding the model rates at least this likely "
                        "(default: chosen on validation phantoms)")
    p.add_argument("--no-findings-check", action="store_true",
                   help="skip the per-finding probabilities and omission/contradiction flags in report.json")
    p.add_argument("--export", metavar="FORMATS", default="",
                   help="render the report document as these formats, comma-separated: pdf, txt, json, sr "
                        "(DICOM SR), fhir (FHIR DiagnosticReport); files report.pdf, report.txt, report.json, "
                        "report.sr.dcm, report.fhir.json")
    p.add_argument("--seed-impression", action="store_true",
                   help="with --export: start the impression from the sentences that report a finding")
    p.add_argument("--out", default="reg2rg_output", help="output folder (default ./reg2rg_output)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report echo")
    return p


def _settings(args):
    """The decoding preset with the single settings given on the command line applied over it."""
    from dataclasses import replace

    from .presets import decoding_preset, llm_folder_of

    folder = llm_folder_of(None if args.published else args.model, args.llm)
    preset = decoding_preset(args.decoding, folder)
    given = {name: getattr(args, name) for name in ("strategy", "max_new_tokens", "temperature", "top_k", "top_p",
                                                    "seed", "num_beams") if getattr(args, name) is not None}
    changed = {k: v for k, v in given.items() if getattr(preset, k) != v}
    s = replace(preset, **changed, preset=f"{preset.preset}, modified" if changed else preset.preset)
    s.validate()
    return s


def _load_engine(args):
    from .generation import ReportEngine

    if args.quiet:                  # no weight-loading bar either (transformers draws one per model load)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    if args.server:
        if args.model or args.published:
            raise CliError("--server drafts with the server's model: leave out --model/--published")
        try:
            from .service.client import connect
        except ImportError as err:
            raise CliError(f"--server needs {err.name}: pip install 'reg2rg-viewer[serve]'") from None
        return connect(args.server, args.token_file)
    if args.published:
        if not args.llm:
            raise CliError("--published needs --llm (the local LLaMA-2-7B-chat folder)")
        return ReportEngine.from_published(args.published, args.llm, args.device, args.dtype,
                                           strict=not args.non_strict)
    if args.non_strict:
        raise CliError("--non-strict applies to --published only (a model folder is always loaded strictly)")
    return ReportEngine.load(args.model, args.device, args.dtype, llm_path=args.llm)


# ---- writing one study ----------------------------------------------------------------------------
def _slug(region: str) -> str:
    return region.replace(" ", "_")


NO_MASKS_NOTE = ("Drafted without region masks: outside the model's training distribution (Reg2RG reads the CT "
                 "region by region); treat this draft as unreliable.")


def write_outputs(engine, result, out_dir: Path, attention: bool, study=None, formats=(),
                  seed_impression: bool = False, notes: list[str] | tuple = (), method: str = "relevance",
                  findings_check: bool = True, omission_threshold: float | None = None) -> dict:
    """Write report.txt, report.json and (optionally) heatmap NIfTIs for one result; returns the JSON.
    With ``formats`` (and the ``study``) the report document is rendered in those formats too
    (`reg2rg.engine.report.FORMATS`; its TXT and JSON replace the plain ones, the engine's JSON kept inside).

    The files are written under temporary names and renamed into place together once all are complete
    (`fileio.staged_files`): a full or read-only disk leaves the previous outputs or none, never a new
    ``report.txt`` beside a truncated ``report.json``; the error (`fileio.OutputError`) names the file.
    Regions asked for but not written are listed as "not drafted"; ``notes`` (e.g. `NO_MASKS_NOTE`) are
    added to both files.

    ``attention``: per region section (and the whole report) a heatmap — ``method`` ``"relevance"``
    (``relevance_<name>.nii.gz``) or ``"raw"`` attention (``attention_<name>.nii.gz``) — and its region
    dependence. ``findings_check``: the per-finding probabilities and flags (``report.json`` key
    ``findings_check``) at ``omission_threshold`` (None: the default).
    """
    from .fileio import staged_files

    with staged_files(out_dir) as stage:
        return _stage_outputs(engine, result, stage, attention, study, formats, seed_impression, list(notes),
                              method, findings_check, omission_threshold)


def _stage_outputs(engine, result, stage, attention: bool, study=None, formats=(), seed_impression=False,
                   notes: list[str] | None = None, method: str = "relevance", findings_check: bool = True,
                   omission_threshold: float | None = None) -> dict:
    notes = notes or []
    if findings_check and result.tokens and result.prepared is not None:
        engine.finding_check(result, omission_threshold)
    not_drafted = getattr(result, "not_drafted", {}) or {}
    if "txt" not in formats:
        from .report.txt import input_warnings_line

        warnings = (getattr(result, "input", None) or {}).get("warnings", [])
        with stage.open("report.txt") as f:
            if warnings:                  # the input's problems head the file (also in report.json "input")
                f.write(input_warnings_line(warnings) + "\n\n")
            f.write(result.text.strip() + "\n")
            if not_drafted or notes:
                f.write("\n")
            for region, why in not_drafted.items():
                f.write(f"{region}: not drafted ({why})\n")
            for note in notes:
                f.write(f"NOTE: {note}\n")
    data = result.to_dict()
    data["notes"] = notes
    data["outside_training_distribution"] = NO_MASKS_NOTE in notes
    if getattr(engine, "precision", None) is not None:     # with settings.preset: how the draft was made
        data["precision"] = engine.precision.describe()
    if attention and result.tokens:
        maps = {}
        selections = [("report", list(range(len(result.tokens))))]
        for s in result.sections:
            idx = result.token_indices_in_span(s.body_start, s.end)
            if s.slot is not None and s.region is not None and idx:
                selections.append((f"slot{s.slot}_{_slug(s.region)}", idx))
        prefix = "relevance" if method == "relevance" else "attention"
        for name, idx in selections:
            file = f"{prefix}_{name}.nii.gz"
            if file in maps:                      # a repeated slot: the first section wins
                continue
            entry: dict = {"token_indices": [idx[0], idx[-1]], "method": method}
            if method == "relevance":
                rm = engine.relevance_map(result, idx)
                rm.save_nifti(stage.path(file))
                entry.update(peak_voxel=list(rm.peak_voxel), seconds=rm.seconds)
            else:
                am = engine.attention_map(result, idx)
                am.save_nifti(stage.path(file))
                entry.update(shares=am.shares, other_share=am.other_share, peak_voxel=list(am.peak_voxel))
            entry["region_dependence"] = engine.region_dependence(result, idx).to_dict()
            maps[file] = entry
        data["attention"] = maps
    if "json" not in formats:
        with stage.open("report.json") as f:
            json.dump(data, f, indent=1)
    if formats:
        from .report import FORMATS, render_report

        draft = report_document(engine, result, study, seed_impression, notes)
        for fmt in formats:
            payload = render_report(draft, fmt, engine_result=data)
            with stage.open(FORMATS[fmt], "wb") as f:
                f.write(payload)
    return data


def report_document(engine, result, study, seed_impression: bool = False, notes=()):
    """The report document of one result (`reg2rg.engine.report.ReportDraft`), unreviewed: no reader here.
    Regions asked for but not written are "not drafted" sections; ``notes`` (drafted without masks) go
    into the technique line, which every format prints."""
    from .report import ReportDraft
    from .report.provenance import provenance_for

    draft = ReportDraft.from_result(result, study, study_key="", provenance=provenance_for(engine, result.settings),
                                    not_drafted=getattr(result, "not_drafted", None))
    if notes:
        draft.technique = " ".join([draft.technique.strip(), *notes]).strip()
    if seed_impression:
        draft.impression = draft.seed_impression()
    return draft


def _run_one(engine, study, args, settings, out_dir: Path) -> None:
    notes = [] if study.regions_present else [NO_MASKS_NOTE]
    result = engine.draft(study, args.regions, settings)
    write_outputs(engine, result, out_dir, args.attention, study, args.formats, args.seed_impression, notes,
                  args.attention_method, not args.no_findings_check, args.omission_threshold)
    if not args.quiet:
        print(result.text.strip())
        for region, why in result.not_drafted.items():
            print(f"{region}: not drafted ({why})")
        for note in notes:
            print(f"NOTE: {note}")
        acc = "n/a" if result.region_accuracy is None else f"{result.region_accuracy:.2f}"
        print(f"\n[{len(result.tokens)} tokens, stop: {result.stop_reason}, region accuracy {acc}, "
              f"mean token prob {result.confidence.mean_prob:.3f}] -> {out_dir}", file=sys.stderr)


# ---- datasets -------------------------------------------------------------------------------------
def _done_ids(csv_path: Path) -> set[str]:
    """The studies already in ``predictions.csv``, after making it safe to append to: a last row cut off
    by an interruption is removed (its study is drafted again). Any other malformed row refuses the
    resume (`CliError` naming the lines): appending to a damaged file would mix rows."""
    from .csvtable import CsvFormatError, read_csv, repair_torn_tail

    if not csv_path.is_file():
        return set()
    try:
        table = read_csv(csv_path, ("AccNum",))
    except CsvFormatError as err:
        raise CliError(f"{err}; fix or move it to resume") from None
    if table.problems:
        raise CliError(f"{csv_path}: {len(table.problems)} malformed row(s): {table.describe_problems(table.problems)}; "
                       "fix or move the file to resume (appending to it could mix rows)")
    repaired = repair_torn_tail(table)
    if repaired:
        logger.warning("%s", repaired)
    return {row["AccNum"] for _line, row in table.rows if row.get("AccNum")}


def combined_reference(region_reports: dict[str, str], slot_regions: dict[int, str]) -> str:
    """The reference report in the model's slot order, ``The region {i} is {area}: {report} `` per slot
    (slots whose region has no reference sentence are left out)."""
    from .tokens import TARGET_REGION

    return "".join(TARGET_REGION.format(index=slot, area=region, report=region_reports[region])
                   for slot, region in sorted(slot_regions.items()) if region in region_reports)


def run_dataset(engine, args, settings, out: Path) -> int:
    from tqdm import tqdm

    from .dataset import find_mask_folder, read_reports, scan_volumes
    from .errors import StudyError
    from .fileio import ensure_folder
    from .regions import REGIONS
    from .studyio import read_study

    if not args.masks or not args.reports:
        raise CliError("--dataset needs --masks MASK_ROOT and --reports CSV")
    reports = read_reports(args.reports)
    volumes = scan_volumes(args.dataset)
    names = sorted(n for n in volumes if any(reports.get(n, {}).get(r) for r in REGIONS))
    if not names:
        raise CliError(f"{args.dataset}: no volume has a report in {args.reports}")
    csv_path = out / PREDICTIONS
    done = _done_ids(csv_path)
    todo = [n for n in names if n not in done]
    if args.limit is not None:
        todo = todo[: args.limit]
    ensure_folder(out)
    new_file = not csv_path.is_file()
    failures = 0
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(COLUMNS)
        bar = tqdm(todo, desc="reg2rg-generate", unit="study", disable=args.quiet, initial=0,
                   total=len(todo), file=sys.stderr)
        for name in bar:
            bar.set_postfix_str(name)
            try:
                mask_dir = find_mask_folder(Path(args.masks), Path(volumes[name]), name)
                if mask_dir is None:
                    raise FileNotFoundError(f"seg_{name} mask folder not found under {args.masks}")
                study = read_study(volumes[name], mask_dir)
                regions = args.regions
                result = engine.draft(study, regions, settings)
            except (StudyError, ValueError, FileNotFoundError) as err:
                failures += 1
                logger.warning("%s: skipped (%s)", name, err)
                print(f"{name}: skipped ({err})", file=sys.stderr)
                continue
            write_outputs(engine, result, out / name, args.attention, study, args.formats, args.seed_impression,
                          method=args.attention_method, findings_check=not args.no_findings_check,
                          omission_threshold=args.omission_threshold)
            gt = combined_reference(reports[name], result.slot_regions).strip()
            slots = json.dumps({str(k): v for k, v in sorted(result.slot_regions.items())})
            writer.writerow([name, gt, result.text.strip(), slots])
            f.flush()                       # a finished study survives an interruption
    if not args.quiet:
        print(f"{len(todo) - failures} studies written, {len(done)} already done, {failures} skipped -> {csv_path}",
              file=sys.stderr)
    # partial success is success (the skipped studies are listed above); all failing is not
    return 1 if todo and failures == len(todo) else 0


# ---- one volume ------------------------------------------------------------------------------------
NO_MASKS_MESSAGE = ("no region masks: Reg2RG drafts region by region and needs them. Give them with --masks "
                    "MASKS (a folder of <region>.nii.gz or a label map), or make them with --segment "
                    "(TotalSegmentator); --allow-no-masks drafts anyway, marked as outside the training distribution")


def _volume_study(args):
    """The --volume study with its masks: from --masks, made by --segment, or none (--allow-no-masks)."""
    from .studyio import read_study, read_volume

    if not args.segment:
        study = read_study(args.volume, args.masks, series=args.series)
    else:
        from .segment import segment_and_read

        study = read_volume(args.volume, series=args.series)
        last = [""]

        def progress(fraction: float, text: str) -> None:
            if not args.quiet and text != last[0]:
                last[0] = text
                print(f"[segment {100 * fraction:3.0f}%] {text}", file=sys.stderr)

        device = "gpu" if str(args.device).startswith("cuda") else "cpu"
        study = segment_and_read(study, fast=args.segment_fast, device=device, progress=progress)
    if not args.quiet:
        for problem in study.mask_problems:
            print(f"warning: {problem}", file=sys.stderr)
    if not study.regions_present and not args.allow_no_masks:
        raise CliError(f"{args.volume}: {NO_MASKS_MESSAGE}")
    return study


# ---- entry point -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``reg2rg-generate``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .errors import print_warnings_as_lines

    print_warnings_as_lines("reg2rg-generate")       # each input warning once, one line
    chosen = [bool(args.volume), bool(args.demo), bool(args.dataset)]
    if sum(chosen) != 1:
        print("reg2rg-generate: choose exactly one of --volume, --demo or --dataset", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .dataset import DatasetError
    from .errors import StudyError
    from .fileio import OutputError, ensure_folder, output_error
    from .generation import EngineOutOfMemory, GenerationError, ModelFolderError
    from .interface import EngineUnavailable
    from .service.server import TokenError
    from .model.config import ConfigError
    from .segment import SegmentationError
    from .tokens import TokenizerError

    if args.segment and (args.masks or not args.volume):
        print("reg2rg-generate: --segment makes the masks of a --volume that has none; leave out --masks",
              file=sys.stderr)
        return 2
    if args.volume and Path(args.volume).exists() and not args.masks and not args.segment and not args.allow_no_masks:
        print(f"reg2rg-generate: {args.volume}: {NO_MASKS_MESSAGE}", file=sys.stderr)
        return 2
    out = Path(args.out)
    from .report import ExportError, parse_formats

    try:
        args.formats = parse_formats(args.export) if args.export else []
    except ExportError as err:
        print(f"reg2rg-generate: --export: {err}", file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"reg2rg-generate: --out {out} is an existing file; --out names a folder for the report files "
              "(it is created if missing)", file=sys.stderr)
        return 2
    try:
        settings = _settings(args)
        ensure_folder(out)              # an unwritable --out fails now, not after loading the model
        engine = _load_engine(args)
        if args.dataset:
            return run_dataset(engine, args, settings, out)
        if args.demo:
            from .phantom import demo_study

            study = demo_study()
        else:
            study = _volume_study(args)
        _run_one(engine, study, args, settings, out)
        return 0
    except (CliError, StudyError, GenerationError, ModelFolderError, EngineOutOfMemory, CheckpointError,
            ConfigError, DatasetError, OutputError, ExportError, SegmentationError, TokenizerError, TokenError) as err:
        print(f"reg2rg-generate: {err}", file=sys.stderr)
        return 2
    except EngineUnavailable as err:
        print(f"reg2rg-generate: {err} (finished studies are kept; nothing was written for this one)",
              file=sys.stderr)
        return 1
    except OSError as err:          # writing predictions.csv (report files arrive as OutputError above)
        print(f"reg2rg-generate: {output_error(err.filename or out, err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reg2rg-generate: interrupted (finished studies are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
