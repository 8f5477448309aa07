#!/usr/bin/env bash
# Train the embedded demo model (issue 5) from nothing, on a CPU, with the project's own commands:
#
#   1. phantom studies with reg2rg-phantom, split by seed: train / validation / test
#   2. a small BPE tokenizer trained on the training reports and the prompt (engine.tokens.train_tokenizer)
#   3. reg2rg-train --config demo  (one process; resumable: re-running continues from the last checkpoint)
#   4. export the final model to resources/demo_model/ with its config, training log and seeds
#   5. held-out evaluation on the test phantoms, with a blind control (scripts/eval_demo_model.py);
#      the numbers go to resources/demo_model/eval_summary.json (quoted in its MODEL_CARD.md)
#
# Usage:  scripts/train_demo_model.sh [WORK_DIR]        (default: runs/demo_model)
# Knobs (environment): TRAIN_CHUNKS N_VAL N_TEST SEED STEPS THREADS EXTRA (more --key value overrides)
# Re-running is safe: finished stages are skipped, training resumes. Delete WORK_DIR to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
WORK=${1:-runs/demo_model}
# training phantoms, written in chunks "first_seed:count" (two at a time); a chunk that reg2rg-phantom
# cannot finish is reported and left out (its studies are then skipped as "no report")
TRAIN_CHUNKS=${TRAIN_CHUNKS:-"1000:160 1160:40 1200:40 1240:40 1280:40"}
N_VAL=${N_VAL:-16}
N_TEST=${N_TEST:-40}
SEED=${SEED:-42}                 # training seed (init, data order, region shuffles)
VAL_SEED0=${VAL_SEED0:-5000}
TEST_SEED0=${TEST_SEED0:-9000}
STEPS=${STEPS:-1200}
THREADS=${THREADS:-2}
VOCAB=${VOCAB:-1024}
OUT=resources/demo_model
export OMP_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK"

phantoms() {  # folder (under $WORK) n seed0
  local dir="$WORK/$1"
  if [ ! -f "$dir/manifest.json" ]; then
    rm -rf "$dir"
    "$BIN/reg2rg-phantom" --out "$dir" --n "$2" --seed "$3" > "$dir.log" 2>&1 \
      || echo "reg2rg-phantom failed for $1 (see $dir.log); its studies are left out"
  fi
}
echo "== 1/5 phantom studies"
mkdir -p "$WORK/data"
running=0
for chunk in $TRAIN_CHUNKS; do
  phantoms "data/train_${chunk%%:*}" "${chunk##*:}" "${chunk%%:*}" &
  running=$((running + 1))
  if [ $running -ge 2 ]; then wait; running=0; fi
done
wait
phantoms data/val "$N_VAL" "$VAL_SEED0"
phantoms test "$N_TEST" "$TEST_SEED0"       # outside data/: never seen by training
REPORTS=$(ls "$WORK"/data/train_*/reports.csv "$WORK/data/val/reports.csv" | paste -sd, -)

echo "== 2/5 tokenizer"
if [ ! -f "$WORK/tokenizer/tokenizer.json" ]; then
  "$PY" - "$WORK" "$VOCAB" <<'EOF'
import csv, sys
from reg2rg.engine.tokens import PROMPT_INSTRUCTION, PROMPT_GLOBAL, PROMPT_REGION, TARGET_REGION, train_tokenizer
from reg2rg.engine.regions import REGIONS
work, vocab = sys.argv[1], int(sys.argv[2])
texts = []
import glob
for path in sorted(glob.glob(f"{work}/data/train_*/reports.csv")):
    with open(path, newline="", encoding="utf-8") as f:
        texts += [row["Sentence"] for row in csv.DictReader(f)]
# the prompt and target frame are part of every example: give them whole-word tokens
frame = [PROMPT_GLOBAL, PROMPT_INSTRUCTION] + [PROMPT_REGION.format(index=i) for i in range(10)]
frame += [TARGET_REGION.format(index=i, area=r, report="") for i in range(10) for r in REGIONS]
train_tokenizer(texts + frame * 20, vocab, f"{work}/tokenizer")
print(f"tokenizer: vocab {vocab}, trained on {len(texts)} report sentences")
EOF
fi

echo "== 3/5 reg2rg-train --config demo"
"$BIN/reg2rg-train" --config demo --resume \
  --tokenizer "$WORK/tokenizer" \
  --data.root "$WORK/data" \
  --data.reports "[$REPORTS]" \
  --data.val_split "$WORK/data/val/reports.csv" \
  --data.cache_dir "$WORK/cache" \
  --output.dir "$WORK/run" \
  --train.seed "$SEED" --train.max_steps "$STEPS" --train.threads "$THREADS" ${EXTRA:-}

echo "== 4/5 export to $OUT"
"$PY" - "$WORK" "$OUT" "$SEED" "$TRAIN_CHUNKS" "$VAL_SEED0" "$TEST_SEED0" "$N_VAL" "$N_TEST" <<'EOF'
import json, os, shutil, sys
work, out, seed, chunks, s_val, s_test, n_val, n_test = sys.argv[1:]
final = f"{work}/run/final"
tmp = out + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
shutil.copytree(final, tmp)
card = os.path.join(out, "MODEL_CARD.md")
if os.path.isfile(card):
    shutil.copy(card, os.path.join(tmp, "MODEL_CARD.md"))
shutil.copy(f"{work}/run/train_config.yaml", os.path.join(tmp, "train_config.yaml"))
shutil.copy(f"{work}/run/train_log.jsonl", os.path.join(tmp, "train_log.jsonl"))
seeds = {"train_seed": int(seed),
         "phantom_splits": {"train": [[int(c.split(":")[0]), int(c.split(":")[0]) + int(c.split(":")[1]) - 1]
                                      for c in chunks.split()],
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

echo "== 5/5 held-out evaluation (model and blind control)"
"$PY" scripts/eval_demo_model.py --model "$OUT" --test "$WORK/test" --out "$WORK/eval" --threads "$THREADS"
cp "$WORK/eval/summary.json" "$OUT/eval_summary.json"
