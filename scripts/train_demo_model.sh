#!/usr/bin/env bash
# Train the embedded demo model (issue 5) from nothing, on a CPU, with the project's own commands:
#
#   1. phantom studies with reg2rg-phantom, split by seed: train / validation / test, plus the
#      abnormal-rich fine-tuning set (reg2rg-phantom --abnormal-fraction, new seeds)
#   2. a small BPE tokenizer trained on the stage-1 training reports and the prompt (engine.tokens.train_tokenizer)
#   3. stage 1: reg2rg-train --config demo from scratch (one process; resumable)
#   4. stage 2, opt-in (the shipped model is stage 1; MODEL_CARD.md gives the measured experiments), on the
#      abnormal-rich set mixed with part of the stage-1 set, same tokenizer, resumable:
#      a. VIS_STEPS > 0: visual-only training of the encoders with the finding head (model.finding_labels:
#         the 13 CT-RATE abnormalities the phantom plants; model.lm_loss_weight 0, the LLM is not run),
#         from the stage-1 weights -> WORK/run_vis
#      b. FT_STEPS > 0: fine-tuning of the whole model from the weights of 4a (or of stage 1), with the
#         finding head's loss (weight FT_FINDING_WEIGHT; 0 = no head) and the focal report loss (gamma
#         FT_FOCAL; 0 = the published cross-entropy) -> WORK/FT_DIR. The first stage-2 experiment (no head):
#         FT_FINDING_WEIGHT=0 FT_FOCAL=0 FT_STEPS=900 FT_LR=5e-4 FT_SCHEDULER=constant_with_warmup FT_WARMUP=20 FT_DIR=run_ft
#      d. DET_STEPS > 0 (the shipped model, issue 12): a finding detector per region fitted on the frozen stage-1
#         encoders' output (model.finding_head_input "latents"), its calls given to the LLM through each region's
#         tokens; the LLM, fc and mask_fc trained to read them (teacher forcing 1) -> WORK/run_det. The shipped run:
#         DET_STEPS=900 FT_CHUNKS="2000:150 2150:150 2300:150 2450:150 2600:150" FT_MIX=1000 scripts/train_demo_model.sh
#      e. DENSITY=1 (the shipped model since 2026-12-02, issue 12): the stage-4d model's detector fitted again with
#         the crops' densitometry (model.finding_density; per region and label the encoders' output, the
#         densitometry or both, by held-out F1) on the stage-4d studies and the DENSITY_CHUNKS abnormal-rich
#         phantoms; no training step (train.max_steps 0): the LLM, fc and mask_fc are stage 4d's -> WORK/run_dens.
#         The shipped run: the stage-4d command above plus
#         DENSITY=1 DENSITY_CHUNKS="2750:250 3000:250 3250:250 3500:250 3750:250 4000:250 4250:250 4500:250"
#         The shipped model since 2026-12-03: the same stage 4e on more phantoms (seeds 2000-8999 without the
#         validation seeds 5000-5099), from the previous shipped model (DENSITY_FROM: its LLM, fc and mask_fc are
#         stage 4d's, so stages 1-4d are not run again), each call at least 80 % precise on held-out studies:
#         DENSITY_MIN_PRECISION=0.8 DET_STEPS=900 FT_CHUNKS="2000:150 2150:150 2300:150 2450:150 2600:150" FT_MIX=1000 DENSITY=1 \
#         DENSITY_FROM=resources/demo_model DENSITY_CHUNKS="2750:250 3000:250 3250:250 3500:250 3750:250 4000:250 \
#         4250:250 4500:250 4750:250 5100:50 5150:400 5550:400 5950:400 6350:400 6750:375 7125:375 7500:375 \
#         7875:375 8250:375 8625:375" scripts/train_demo_model.sh
#   5. export the final model to resources/demo_model/ with its configs, training logs and seeds
#   6. held-out evaluation on the test phantoms, with a blind control (scripts/eval_demo_model.py);
#      the numbers go to resources/demo_model/eval_summary.json (quoted in its MODEL_CARD.md)
#
# Usage:  scripts/train_demo_model.sh [WORK_DIR]        (default: runs/demo_model)
# Knobs (environment): TRAIN_CHUNKS FT_CHUNKS FT_MIX FT_ABNORMAL N_VAL N_TEST SEED STEPS THREADS
#                      VIS_STEPS VIS_LR PROJ_LR FT_STEPS FT_LR FT_HEAD_LR FT_SCHEDULER FT_WARMUP FT_FINDINGS
#                      FT_FINDING_WEIGHT FT_FOCAL FT_DIR
#                      NORM_STEPS NORM_LR NORM_PROJ_LR NORM_BATCH NORM_SCHEDULER NORM_VALIDATE NORM_EXTRA (stage n)
#                      DET_STEPS DET_LR DET_PROJ_LR DET_BATCH DET_TOKENS DET_CALLS_ONLY DET_LABELS DET_EXTRA (stage 4d, the shipped model)
#                      EXTRA / FT_EXTRA (more --key value overrides of stage 1 / stage 2)
# Re-running is safe: finished stages are skipped, training resumes. Delete WORK_DIR to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
WORK=${1:-runs/demo_model}
# stage-1 training phantoms, written in chunks "first_seed:count" (two at a time). The shipped model was
# trained without chunk 1240:40 (reg2rg-phantom then aborted at seed 1249; it now redraws such a study).
TRAIN_CHUNKS=${TRAIN_CHUNKS:-"1000:160 1160:40 1200:40 1280:40"}
# stage-2 (fine-tuning) phantoms: new seeds, 85% abnormal studies with 2-4 findings each, mixed with the
# stage-1 chunks in FT_MIX (normal sentences stay right)
FT_CHUNKS=${FT_CHUNKS:-"2000:180 2180:180"}
FT_ABNORMAL=${FT_ABNORMAL:-0.85}
FT_MIX=${FT_MIX-"1000"}     # (set it empty for no stage-1 chunks)
VIS_STEPS=${VIS_STEPS:-0}          # stage 4a (0: skipped); the measured experiment: 3000
VIS_LR=${VIS_LR:-1e-3}              # 4a: ViT and mask encoder lr
PROJ_LR=${PROJ_LR:-3e-3}            # 4a: perceiver, fc and mask_fc lr
FT_STEPS=${FT_STEPS:-0}            # stage 4b (0: skipped)
FT_DIR=${FT_DIR:-run_aux}          # stage-4b run folder under WORK_DIR
FT_LR=${FT_LR:-3e-4}
FT_HEAD_LR=${FT_HEAD_LR:-0.1}         # the fresh finding head learns at its own, larger lr
FT_FOCAL=${FT_FOCAL:-2}             # focal language-model loss (0: the published cross-entropy)
FT_SCHEDULER=${FT_SCHEDULER:-cosine_with_warmup}
FT_WARMUP=${FT_WARMUP:-30}
FT_FINDING_WEIGHT=${FT_FINDING_WEIGHT:-10}
FT_FINDINGS=${FT_FINDINGS:-'["Lung nodule","Lung opacity","Consolidation","Emphysema","Atelectasis","Pleural effusion","Pericardial effusion","Cardiomegaly","Arterial wall calcification","Coronary artery wall calcification","Lymphadenopathy","Hiatal hernia","Medical material","Left side","Right side"]'}
HEAD_STEPS=${HEAD_STEPS:-0}        # stage 4c (0: skipped)
HEAD_INPUT=${HEAD_INPUT:-patches}   # 4c: what the re-fitted finding head reads
HEAD_LR=${HEAD_LR:-0.01}
READ_STEPS=${READ_STEPS:-0}        # stage 4d (0: skipped)
READ_LR=${READ_LR:-1e-3}
NORM_STEPS=${NORM_STEPS:-0}        # stage n, per-region standardisation (0: skipped; measured, not shipped: MODEL_CARD.md)
NORM_LR=${NORM_LR:-5e-4}
NORM_PROJ_LR=${NORM_PROJ_LR:-2e-3}  # fc / mask_fc: their input changed scale, they learn faster
NORM_BATCH=${NORM_BATCH:-8}
NORM_SCHEDULER=${NORM_SCHEDULER:-cosine_with_warmup}
NORM_VALIDATE=${NORM_VALIDATE:-true}
DET_STEPS=${DET_STEPS:-0}          # stage 4d, the detector's calls read by the LLM (the shipped model: 900)
DET_LR=${DET_LR:-1e-3}
DET_PROJ_LR=${DET_PROJ_LR:-2e-3}    # fc / mask_fc / the calls' embeddings
DET_TOKENS=${DET_TOKENS:-all}       # which of a region's tokens get its calls ("mask": read too slowly, MODEL_CARD.md)
DET_BATCH=${DET_BATCH:-8}
DET_CALLS_ONLY=${DET_CALLS_ONLY:-true}  # the LLM reports only what the detector calls (model.finding_calls_only)
DENSITY=${DENSITY:-0}              # stage 4e (0: skipped), the detector refitted with the crops' densitometry
DENSITY_CHUNKS=${DENSITY_CHUNKS:-}  # 4e: more abnormal-rich phantoms "first_seed:count ..." for the detector only
DENSITY_FROM=${DENSITY_FROM:-}      # 4e: refit this finished model's detector instead of WORK/run_det/final's (its
                                    # LLM, fc and mask_fc must be stage 4d's); stages 1-4d and the tokenizer are not run
DENSITY_MIN_PRECISION=${DENSITY_MIN_PRECISION:-0}  # 4e: held-out precision a label's calls also need (model.detector_min_precision)
EXPORT=${EXPORT:-1}                # 0: stop after training (select on validation first), re-run with 1 to export and test
DET_LABELS=${DET_LABELS:-'["Medical material","Arterial wall calcification","Cardiomegaly","Pericardial effusion","Coronary artery wall calcification","Hiatal hernia","Lymphadenopathy","Emphysema","Atelectasis","Lung nodule","Lung opacity","Pleural effusion","Consolidation","Left side","Right side"]'}
FT_CONDITION=${FT_CONDITION:-true}  # 4b: the head's calls condition the LLM (model.finding_conditioning)
FT_TF=${FT_TF:-0.5}                 # 4b: share of regions conditioned on their true labels in training
N_VAL=${N_VAL:-16}
N_TEST=${N_TEST:-40}
SEED=${SEED:-42}                 # training seed (init, data order, region shuffles)
VAL_SEED0=${VAL_SEED0:-5000}
TEST_SEED0=${TEST_SEED0:-9000}
STEPS=${STEPS:-1400}
THREADS=${THREADS:-2}
VOCAB=${VOCAB:-1024}
OUT=resources/demo_model
export OMP_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK"

phantoms() {  # folder (under $WORK) n seed0 [more reg2rg-phantom options]
  local dir="$WORK/$1"
  if [ ! -f "$dir/manifest.json" ]; then
    rm -rf "$dir"
    "$BIN/reg2rg-phantom" --out "$dir" --n "$2" --seed "$3" "${@:4}" > "$dir.log" 2>&1 \
      || echo "reg2rg-phantom failed for $1 (see $dir.log); its studies are left out"
  fi
}
echo "== 1/6 phantom studies"
mkdir -p "$WORK/data"
STAGE1_DONE=0
[ -d "$WORK/run/final" ] && [ -f "$WORK/tokenizer/tokenizer.json" ] && STAGE1_DONE=1
if [ -n "$DENSITY_FROM" ]; then
  [ "$DENSITY" = 1 ] || { echo "DENSITY_FROM needs DENSITY=1"; exit 2; }
  [ -f "$DENSITY_FROM/finding_detector.json" ] || { echo "$DENSITY_FROM: not a model with a finding detector"; exit 2; }
  STAGE1_DONE=1
fi
S1_CHUNKS=$TRAIN_CHUNKS
mixed_chunks() {  # the stage-1 chunks whose first seed is in FT_MIX
  local c m
  for c in $TRAIN_CHUNKS; do for m in $FT_MIX; do if [ "${c%%:*}" = "$m" ]; then echo "$c"; fi; done; done
}
[ "$STAGE1_DONE" = 1 ] && S1_CHUNKS=$(mixed_chunks)
running=0
for chunk in $S1_CHUNKS; do
  phantoms "data/train_${chunk%%:*}" "${chunk##*:}" "${chunk%%:*}" &
  running=$((running + 1))
  if [ $running -ge 2 ]; then wait; running=0; fi
done
wait
[ "$FT_STEPS" -gt 0 ] || [ "$VIS_STEPS" -gt 0 ] || [ "$NORM_STEPS" -gt 0 ] || [ "$DET_STEPS" -gt 0 ] || FT_CHUNKS=""
[ "$DENSITY" = 1 ] || DENSITY_CHUNKS=""
for chunk in $FT_CHUNKS $DENSITY_CHUNKS; do     # ft_* (not train_*): stage 1 and the tokenizer never see them
  phantoms "data/ft_${chunk%%:*}" "${chunk##*:}" "${chunk%%:*}" --abnormal-fraction "$FT_ABNORMAL" &
done
wait
phantoms data/val "$N_VAL" "$VAL_SEED0"
phantoms test "$N_TEST" "$TEST_SEED0"       # outside data/: never seen by training
csv_list() {  # prefix chunks... -> comma-separated reports.csv paths, validation last
  local prefix=$1; shift
  for c in "$@"; do echo "$WORK/data/${prefix}${c%%:*}/reports.csv"; done | paste -sd, -
}
REPORTS="$(csv_list train_ $TRAIN_CHUNKS),$WORK/data/val/reports.csv"
MIX_CHUNKS=$(mixed_chunks)
FT_REPORTS=$( (csv_list ft_ $FT_CHUNKS; if [ -n "$MIX_CHUNKS" ]; then csv_list train_ $MIX_CHUNKS; fi; echo "$WORK/data/val/reports.csv") | paste -sd, -)

echo "== 2/6 tokenizer"
if [ -n "$DENSITY_FROM" ]; then
  echo "stage 4e from $DENSITY_FROM: its tokenizer is kept"
elif [ ! -f "$WORK/tokenizer/tokenizer.json" ]; then
  "$PY" - "$WORK" "$VOCAB" <<'EOF'
import csv, sys
from reg2rg.engine.tokens import PROMPT_INSTRUCTION, PROMPT_GLOBAL, PROMPT_REGION, TARGET_REGION, train_tokenizer
from reg2rg.engine.regions import REGIONS
work, vocab = sys.argv[1], int(sys.argv[2])
texts = []
import glob
for path in sorted(glob.glob(f"{work}/data/train_*/reports.csv")):   # stage-1 chunks only
    with open(path, newline="", encoding="utf-8") as f:
        texts += [row["Sentence"] for row in csv.DictReader(f)]
# the prompt and target frame are part of every example: give them whole-word tokens
frame = [PROMPT_GLOBAL, PROMPT_INSTRUCTION] + [PROMPT_REGION.format(index=i) for i in range(10)]
frame += [TARGET_REGION.format(index=i, area=r, report="") for i in range(10) for r in REGIONS]
train_tokenizer(texts + frame * 20, vocab, f"{work}/tokenizer")
print(f"tokenizer: vocab {vocab}, trained on {len(texts)} report sentences")
EOF
fi

echo "== 3/6 stage 1: reg2rg-train --config demo (from scratch)"
if [ -n "$DENSITY_FROM" ]; then
  echo "stage 1: $DENSITY_FROM's (DENSITY_FROM): skipped"
elif [ "$STAGE1_DONE" = 1 ]; then
  echo "stage 1 is done ($WORK/run/final and $WORK/tokenizer exist): skipped"
else
"$BIN/reg2rg-train" --config demo --resume \
  --tokenizer "$WORK/tokenizer" \
  --data.root "$WORK/data" \
  --data.reports "[$REPORTS]" \
  --data.val_split "$WORK/data/val/reports.csv" \
  --data.cache_dir "$WORK/cache" \
  --output.dir "$WORK/run" \
  --train.seed "$SEED" --train.max_steps "$STEPS" --train.threads "$THREADS" ${EXTRA:-}
fi

echo "== 4/6 stage 2 (opt-in): a. visual-only (VIS_STEPS=$VIS_STEPS), b. whole model (FT_STEPS=$FT_STEPS)"
STAGE2_DATA=(--tokenizer "$WORK/tokenizer" --data.root "$WORK/data" --data.reports "[$FT_REPORTS]"
             --data.val_split "$WORK/data/val/reports.csv" --data.cache_dir "$WORK/cache"
             --train.seed "$SEED" --train.threads "$THREADS")
if [ "$VIS_STEPS" -gt 0 ]; then
  "$BIN/reg2rg-train" --config demo --resume "${STAGE2_DATA[@]}" \
    --model.overrides "{\"finding_labels\": $FT_FINDINGS, \"finding_loss_weight\": 1.0, \"lm_loss_weight\": 0.0}" \
    --model.init_from "$WORK/run/final" --output.dir "$WORK/run_vis" --output.save_steps 260 \
    --train.lr "$VIS_LR" --train.finding_head_lr "$FT_HEAD_LR" --train.projector_lr "$PROJ_LR" \
    --train.scheduler cosine_with_warmup --train.warmup_steps 30 --train.max_steps "$VIS_STEPS"
  FT_INIT="$WORK/run_vis/final"
else
  FT_INIT="$WORK/run/final"
fi
FT_MODEL='{"lm_loss_weight": 1.0, "finding_loss_weight": 0.0, "token_focal_gamma": 0.0}'   # (init_from's config is the base: reset the objective)
[ "$FT_FINDING_WEIGHT" != 0 ] && FT_MODEL="{\"finding_labels\": $FT_FINDINGS, \"finding_loss_weight\": $FT_FINDING_WEIGHT, \"token_focal_gamma\": $FT_FOCAL, \"lm_loss_weight\": 1.0, \"finding_conditioning\": $FT_CONDITION, \"finding_teacher_forcing\": $FT_TF}"
[ "$FT_STEPS" -gt 0 ] && "$BIN/reg2rg-train" --config demo --resume \
  --model.overrides "$FT_MODEL" \
  --model.init_from "$FT_INIT" \
  --tokenizer "$WORK/tokenizer" \
  --data.root "$WORK/data" \
  --data.reports "[$FT_REPORTS]" \
  --data.val_split "$WORK/data/val/reports.csv" \
  --data.cache_dir "$WORK/cache" \
  --output.dir "$WORK/$FT_DIR" \
  --train.lr "$FT_LR" --train.finding_head_lr "$FT_HEAD_LR" --train.scheduler "$FT_SCHEDULER" --train.warmup_steps "$FT_WARMUP" \
  --train.seed "$SEED" --train.max_steps "$FT_STEPS" --train.threads "$THREADS" ${FT_EXTRA:-}

#   c. READ_STEPS > 0: the LLM taught to read the calls: every region conditioned on its true labels (teacher
#      forcing 1), the finding head fixed (finding loss 0), the ViT frozen, lr READ_LR -> WORK/run_read
if [ "$READ_STEPS" -gt 0 ]; then
  "$BIN/reg2rg-train" --config demo --resume "${STAGE2_DATA[@]}" \
    --model.overrides '{"finding_loss_weight": 0.0, "lm_loss_weight": 1.0, "finding_teacher_forcing": 1.0}' \
    --model.init_from "$WORK/$FT_DIR/final" --model.train_vit false --output.dir "$WORK/run_read" \
    --train.lr "$READ_LR" --train.scheduler constant_with_warmup --train.warmup_steps 20 --train.max_steps "$READ_STEPS"
fi

#   d. HEAD_STEPS > 0: the finding head re-fitted alone on the final encoder (everything else frozen: lr 0,
#      ViT frozen, the LLM not run), reading the ViT patches (HEAD_INPUT=patches: max over patches) -> WORK/run_head
HEAD_INIT="$WORK/$FT_DIR/final"
[ "$READ_STEPS" -gt 0 ] && HEAD_INIT="$WORK/run_read/final"
if [ "$HEAD_STEPS" -gt 0 ]; then
  "$BIN/reg2rg-train" --config demo --resume "${STAGE2_DATA[@]}" \
    --model.overrides "{\"finding_head_input\": \"$HEAD_INPUT\", \"finding_loss_weight\": 1.0, \"lm_loss_weight\": 0.0}" \
    --model.init_from "$HEAD_INIT" --model.train_vit false --output.dir "$WORK/run_head" --output.save_steps 250 \
    --train.lr 0.0 --train.finding_head_lr "$HEAD_LR" --train.scheduler cosine_with_warmup --train.warmup_steps 30 \
    --train.max_steps "$HEAD_STEPS"
fi

#   n. NORM_STEPS > 0 (issue 12; the fourth round of MODEL_CARD.md, not shipped): from the stage-1 weights, fc's input standardised per region
#      (model.projector_norm "region": statistics fitted on the training studies, the encoders frozen and run once
#      per study), then fc, mask_fc, the markers and the LLM trained on the abnormal-rich mix -> WORK/run_norm
if [ "$NORM_STEPS" -gt 0 ]; then
  "$BIN/reg2rg-train" --config demo --resume "${STAGE2_DATA[@]}" \
    --model.overrides '{"projector_norm": "region", "finding_labels": [], "finding_loss_weight": 0.0, "lm_loss_weight": 1.0, "token_focal_gamma": 0.0, "finding_conditioning": false, "finding_teacher_forcing": 0.0}' \
    --model.init_from "$WORK/run/final" --model.train_vit false --output.dir "$WORK/run_norm" \
    --output.save_steps 250 --output.save_every_epoch false --train.validate_every_epoch "$NORM_VALIDATE" \
    --train.micro_batch_size "$NORM_BATCH" --train.lr "$NORM_LR" --train.projector_lr "$NORM_PROJ_LR" \
    --train.scheduler "$NORM_SCHEDULER" --train.warmup_steps 30 --train.max_steps "$NORM_STEPS" ${NORM_EXTRA:-}
fi

#   4d. DET_STEPS > 0 (issue 12, the shipped model): from the stage-1 weights, the per-region finding detector fitted
#       on the frozen encoders' output (which region/labels it may call: WORK/run_det/finding_detector.json), then
#       fc, mask_fc, the calls' embeddings and the LLM trained with every region given its true (callable) labels
if [ "$DET_STEPS" -gt 0 ] && [ -n "$DENSITY_FROM" ]; then
  echo "stage 4d: $DENSITY_FROM's (DENSITY_FROM): skipped"
elif [ "$DET_STEPS" -gt 0 ] && [ -d "$WORK/run_det/final" ]; then
  echo "stage 4d is done ($WORK/run_det/final exists): skipped"
elif [ "$DET_STEPS" -gt 0 ]; then
  "$BIN/reg2rg-train" --config demo --resume "${STAGE2_DATA[@]}" \
    --model.overrides "{\"finding_labels\": $DET_LABELS, \"finding_head_input\": \"latents\", \"finding_conditioning\": true, \"finding_conditioning_tokens\": \"$DET_TOKENS\", \"finding_teacher_forcing\": 1.0, \"finding_calls_only\": $DET_CALLS_ONLY, \"finding_loss_weight\": 0.0, \"lm_loss_weight\": 1.0, \"token_focal_gamma\": 0.0, \"projector_norm\": \"none\"}" \
    --model.init_from "$WORK/run/final" --model.train_vit false --output.dir "$WORK/run_det" \
    --output.save_steps 100 --output.save_every_epoch false --train.validate_every_epoch true \
    --train.micro_batch_size "$DET_BATCH" --train.lr "$DET_LR" --train.projector_lr "$DET_PROJ_LR" \
    --train.scheduler cosine_with_warmup --train.warmup_steps 30 --train.max_steps "$DET_STEPS" ${DET_EXTRA:-}
fi

#   4e. DENSITY=1: the stage-4d model's detector fitted again, reading the crops' densitometry too, on the stage-4d
#       studies and the DENSITY_CHUNKS phantoms; no step (the rest of the model is stage 4d's) -> WORK/run_dens
if [ "$DENSITY" = 1 ] && [ -d "$WORK/run_dens/final" ]; then
  echo "stage 4e is done ($WORK/run_dens/final exists): skipped"
elif [ "$DENSITY" = 1 ]; then
  DENSITY_REPORTS=$( (csv_list ft_ $FT_CHUNKS $DENSITY_CHUNKS; if [ -n "$MIX_CHUNKS" ]; then csv_list train_ $MIX_CHUNKS; fi
                      echo "$WORK/data/val/reports.csv") | paste -sd, -)
  # (each study is read once, to be encoded: no pre-processing cache)
  "$BIN/reg2rg-train" --config demo --resume --data.root "$WORK/data" --data.reports "[$DENSITY_REPORTS]" \
    --data.val_split "$WORK/data/val/reports.csv" --data.use_cache false \
    --train.seed "$SEED" --train.threads "$THREADS" \
    --model.overrides '{"finding_density": true}' --model.init_from "${DENSITY_FROM:-$WORK/run_det/final}" \
    --model.refit_detector true --model.detector_min_precision "$DENSITY_MIN_PRECISION" --model.train_vit false \
    --output.dir "$WORK/run_dens" --output.save_every_epoch false --train.max_steps 0
fi

if [ "$EXPORT" != 1 ]; then
  echo "EXPORT=$EXPORT: stopped before the export (the model is in $WORK); re-run with EXPORT=1 to export and test"
  exit 0
fi
echo "== 5/6 export to $OUT"
"$PY" - "$WORK" "$OUT" "$SEED" "$TRAIN_CHUNKS" "$VAL_SEED0" "$TEST_SEED0" "$N_VAL" "$N_TEST" \
  "$FT_CHUNKS" "$FT_MIX" "$FT_ABNORMAL" "$FT_STEPS" "$FT_DIR" "$VIS_STEPS" "$HEAD_STEPS" "$READ_STEPS" "$NORM_STEPS" \
  "$DET_STEPS" "$DENSITY" "$DENSITY_CHUNKS" "$DENSITY_FROM" <<'EOF'
import json, os, re, shutil, sys
work, out, seed, chunks, s_val, s_test, n_val, n_test, ft_chunks, ft_mix, ft_abnormal, ft_steps, ft_dir, vis_steps, head_steps, read_steps, norm_steps, det_steps, density, density_chunks, density_from = sys.argv[1:]
last = ("run_dens" if density == "1" else "run_det" if int(det_steps) > 0 else "run_norm" if int(norm_steps) > 0 else "run_head" if int(head_steps) > 0 else "run_read" if int(read_steps) > 0 else ft_dir if int(ft_steps) > 0
        else "run_vis" if int(vis_steps) > 0 else "run")
final = f"{work}/{last}/final"
if not os.path.isdir(final):      # stage 2 stopped early: its newest checkpoint in the engine's format
    import subprocess
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "reg2rg-train"), "export",
                    f"{work}/{last}", final], check=True)
tmp = out + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
shutil.copytree(final, tmp)
for keep in ("MODEL_CARD.md", "eval_summary_stage2_experiment.json",   # hand-written / measured elsewhere
             "eval_summary_stage2_findings_experiment.json", "eval_summary_projector_norm_experiment.json",
             "eval_summary_calls_for_callable_labels_experiment.json",
             "train_log_stage1.jsonl", "train_config_stage1.yaml"):      # stage 1's own (its run folder keeps final/ only)
    if os.path.isfile(os.path.join(out, keep)):
        shutil.copy(os.path.join(out, keep), os.path.join(tmp, keep))
shutil.copy(f"{work}/{last}/train_config.yaml", os.path.join(tmp, "train_config.yaml"))
if os.path.isfile(f"{work}/{last}/train_log.jsonl"):           # a fit-only stage (4e) takes no step
    shutil.copy(f"{work}/{last}/train_log.jsonl", os.path.join(tmp, "train_log.jsonl"))
if os.path.isfile(f"{work}/{last}/finding_detector.json"):      # what the detector may call, and its held-out F1
    shutil.copy(f"{work}/{last}/finding_detector.json", os.path.join(tmp, "finding_detector.json"))
if last != "run":
    for stage, folder in (("stage1", "run"), ("stage2a", "run_vis"), ("stage2b", ft_dir), ("stage2c", "run_read"),
                          ("stage4d", "run_det")):
        if folder != last and os.path.isfile(f"{work}/{folder}/train_log.jsonl"):
            shutil.copy(f"{work}/{folder}/train_config.yaml", os.path.join(tmp, f"train_config_{stage}.yaml"))
            shutil.copy(f"{work}/{folder}/train_log.jsonl", os.path.join(tmp, f"train_log_{stage}.jsonl"))
if density_from:                  # stage 4e from a finished model: its stages' configs and logs are this model's too
    for name in os.listdir(density_from):
        if re.fullmatch(r"train_(config|log)_stage\w+\.(yaml|jsonl)", name) and not os.path.exists(os.path.join(tmp, name)):
            shutil.copy(os.path.join(density_from, name), os.path.join(tmp, name))
span = lambda c: [int(c.split(":")[0]), int(c.split(":")[0]) + int(c.split(":")[1]) - 1]
mix = [span(c) for c in chunks.split() if c.split(":")[0] in ft_mix.split()]
seeds = {"train_seed": int(seed),
         "phantom_splits": {"train": [span(c) for c in chunks.split()],
                            **({"finetune": {"abnormal_fraction": float(ft_abnormal), "steps": int(ft_steps), "visual_only_steps": int(vis_steps),
                                             "head_refit_steps": int(head_steps), "reading_steps": int(read_steps),
                                             "projector_norm_steps": int(norm_steps), "detector_steps": int(det_steps),
                                             "new": [span(c) for c in ft_chunks.split()], "mixed_in": mix,
                                             **({"detector_refit_with_densitometry": [span(c) for c in density_chunks.split()],
                                                 **({"detector_refit_from": density_from} if density_from else {})}
                                                if density == "1" else {})}}
                               if last != "run" else {}),
                            "validation": [int(s_val), int(s_val) + int(n_val) - 1],
                            "test": [int(s_test), int(s_test) + int(n_test) - 1]},
         "command": "scripts/train_demo_model.sh"}
with open(os.path.join(tmp, "seeds.json"), "w") as f:
    json.dump(seeds, f, indent=2)
shutil.rmtree(out, ignore_errors=True)
os.replace(tmp, out)
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
print(f"demo model in {out}: {size / 1e6:.1f} MB")
EOF

echo "== 6/6 held-out evaluation (model and blind control)"
"$PY" scripts/eval_demo_model.py --model "$OUT" --test "$WORK/test" --out "$WORK/eval" --threads "$THREADS"
cp "$WORK/eval/summary.json" "$OUT/eval_summary.json"
