#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, within one time budget (default 480 s), each part time-boxed so
# that every part reports and the summary is always written. docs/gpu.md says how to prepare and run it.
#   setup    the Python (PYTHON=, else .venv/bin/python, else python3), torch's version, the GPU; the carried
#            tensorboardX wheel installed with pip --no-index --target (only where tensorboardX is missing)
#   tests    tests/test_cuda.py only (pytest -m cuda)
#   speed    bench/speed.py at ngf 64, batch 128: plain (true fp32) against the fast path (bf16 autocast, TF32,
#            cudnn.benchmark, fused Adam)
#   train    config.yml's ten epochs (4,690 steps of batch 128, ngf 64) with the fast path's switches (speed only:
#            the method is config.yml's); SIGTERM at the end of its box: the run writes a checkpoint and stops,
#            and what it reached is sampled and scored, with its step
#   classifier  the FID/IS digit classifier, trained on the CPU while the GPU trains
#   sample   the paper's sampler (10 levels x 100 steps = 1,000 network evaluations a sample): samples.png, movie.gif
#   eval     --eval on 1,000 samples, or on as many as fit in its box at the sample part's speed (said)
#   extra    only if at least 90 s are left: speed rows with channels_last and torch.compile
#
#   bash bench/gpu_prepare.sh                               # on the CPU machine: gpu_carry/ (wheel, MNIST)
#   bash bench/gpu_check.sh --carry gpu_carry --out "$OUT"  # on the GPU machine, gpu_carry carried
#   bash bench/gpu_check.sh --tiny --carry DIR --out DIR    # the same parts on the CPU at a tiny size
#
# --out DIR   what comes back (at most 8 files, flat): summary.txt, check.log (every part's output), tests.xml,
#             speed.txt, metrics.json, samples.png, movie.gif, config.yml. Must be empty or absent.
# --work DIR  the run itself (checkpoints, TensorBoard, samples.pt, the installed wheel); default
#             run/gpu_check (--tiny: run/gpu_check_tiny). Must be empty or absent.
# --carry DIR the folder made by bench/gpu_prepare.sh: DIR/wheels/*.whl and DIR/MNIST/raw (the data root)
# --data_root DIR  MNIST in DIR/MNIST/raw (default: --carry's folder, else run/datasets); never downloaded
# --budget S  the whole check's seconds (default 480)
# --tiny      ngf 4, 6 steps, 4 samples of 4 levels x 2 steps, on the CPU (CUDA hidden): a rehearsal
# Environment: STEPS, N_SAMPLES, N_EVAL override the sizes; TRAIN_S caps the train part's box (rehearsals).
set -uo pipefail
cd "$(dirname "$0")/.."
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

TINY=0; CARRY=; DATA=; OUT_DIR=; WORK=; BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --carry|--data_root|--out|--work|--budget)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in --carry) CARRY=$2 ;; --data_root) DATA=$2 ;; --out) OUT_DIR=$2 ;; --work) WORK=$2 ;;
                   --budget) BUDGET=$2 ;; esac
      shift ;;
    *) die "unknown argument $1 (expected --tiny, --carry DIR, --data_root DIR, --out DIR, --work DIR, --budget S)" ;;
  esac
  shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] && [ "$BUDGET" -ge 60 ] || die "--budget must be a whole number of seconds >= 60, got $BUDGET"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
command -v "$PY" >/dev/null || die "no Python: $PY not found (set PYTHON=/path/to/python)"
command -v timeout >/dev/null || die "the time boxes need GNU timeout (coreutils)"

if [ "$TINY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # a CPU rehearsal: the nested CUDA tests skip instead of running inside it
  DEVICE=cpu; NGF=4; LEVELS=4; STEPS=${STEPS:-6}; STEPS_EACH=2; N_SAMPLES=${N_SAMPLES:-4}; N_EVAL=${N_EVAL:-4}
  BATCH=8; SAMPLE_BATCH=4; MIN_EVAL=2; SPEED=(--devices cpu --ngf 4 --batch 8 --repeats 1 --matmul_n 128)
  WORK=${WORK:-run/gpu_check_tiny}
else
  DEVICE=cuda; NGF=64; LEVELS=10; STEPS=${STEPS:-4690}; STEPS_EACH=100; N_SAMPLES=${N_SAMPLES:-100}
  N_EVAL=${N_EVAL:-1000}; BATCH=128; SAMPLE_BATCH=100; MIN_EVAL=100
  SPEED=(--devices cuda --ngf 64 --batch 128 --repeats 3)
  WORK=${WORK:-run/gpu_check}
fi
OUT_DIR=${OUT_DIR:-$WORK/out}
DATA=${DATA:-${CARRY:-run/datasets}}
for d in "$OUT_DIR" "$WORK"; do
  if [ -e "$d" ] && [ -n "$(ls -A "$d" 2>/dev/null)" ]; then
    die "$d exists from an earlier check and is not empty: move it away first (nothing is deleted)"
  fi
done
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -f "$DATA/MNIST/raw/$f" ] || die "MNIST is missing from $DATA/MNIST/raw ($f): make it with bench/gpu_prepare.sh and pass --carry gpu_carry (or --data_root DIR)"
done
if [ -n "$CARRY" ]; then
  ls "$CARRY"/wheels/*.whl >/dev/null 2>&1 || die "no wheels in $CARRY/wheels: make the folder with bench/gpu_prepare.sh"
fi
mkdir -p "$OUT_DIR" "$WORK"
OUT_DIR=$(cd "$OUT_DIR" && pwd); WORK=$(cd "$WORK" && pwd)
LOG=$OUT_DIR/check.log; SUMMARY=$OUT_DIR/summary.txt
export PYTHONUNBUFFERED=1
T_START=$(date +%s)
ROWS=(); NOTES=()
now() { date +%s; }
left() { echo $(( BUDGET - ($(now) - T_START) )); }
say() { echo "$*" | tee -a "$LOG"; }

# run_part NAME BOX CMD...: CMD under `timeout`, SIGTERM at BOX - GRACE and SIGKILL at BOX, its output into check.log
# and WORK/NAME.log; a row for the summary. Sets PART_RC (124: the box ran out) and PART_S.
run_part() {
  local name=$1 box=$2; shift 2
  local grace=$(( box / 4 < 20 ? box / 4 : 20 )) t0
  [ "$grace" -ge 1 ] || grace=1
  say ""; say "== $name (box ${box} s): $*"
  t0=$(now)
  timeout -s TERM -k "$grace" "$(( box - grace ))" "$@" 2>&1 | tee "$WORK/$name.log" | tee -a "$LOG"
  PART_RC=${PIPESTATUS[0]}; PART_S=$(( $(now) - t0 ))
  local status
  case "$PART_RC" in
    0) status=ok ;;
    124) status="time box reached (SIGTERM)" ;;
    137) status="time box reached (SIGKILL)" ;;
    *) status="failed (exit $PART_RC)" ;;
  esac
  say "-- $name: ${PART_S} s ($status)"
  ROWS+=("$name|$status|$PART_S|$box")
}

skip_part() { say ""; say "-- $1: skipped ($2)"; ROWS+=("$1|skipped: $2|0|0"); }

summary() {
  {
    echo "== gpu_check summary: budget ${BUDGET} s, whole check $(( $(now) - T_START )) s, $( [ "$TINY" = 1 ] && echo "--tiny (CPU)" || echo "device $DEVICE")"
    [ -f "$WORK/machine.txt" ] && cat "$WORK/machine.txt"
    printf '%-12s %-40s %8s %8s\n' part status seconds box
    local r name status s box
    for r in "${ROWS[@]}"; do
      IFS='|' read -r name status s box <<<"$r"
      printf '%-12s %-40s %8s %8s\n' "$name" "$status" "$s" "$box"
    done
    for r in "${NOTES[@]}"; do echo "$r"; done
    echo "outputs in $OUT_DIR; the run in $WORK"
  } > "$SUMMARY"
  echo; cat "$SUMMARY"; cat "$SUMMARY" >> "$LOG"
}
trap summary EXIT

# ---------------------------------------------------------------------------------------------------- setup
say "== setup: $PY, data $DATA, out $OUT_DIR, work $WORK, budget $BUDGET s"
t0=$(now)
if [ -n "$CARRY" ] && ! timeout 60 "$PY" -c "import tensorboardX" 2>/dev/null; then
  PYLIB=$WORK/pylib
  if timeout 60 "$PY" -m pip --version >/dev/null 2>&1; then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$PYLIB" "$CARRY"/wheels/*.whl 2>&1 | tee -a "$LOG"
  else  # no pip: a pure-Python wheel is a zip of the package
    for w in "$CARRY"/wheels/*.whl; do timeout 60 "$PY" -m zipfile -e "$w" "$PYLIB"; done
  fi
  export PYTHONPATH="$PYLIB${PYTHONPATH:+:$PYTHONPATH}"
fi
timeout 120 "$PY" - "$DEVICE" > "$WORK/machine.txt" 2>>"$LOG" <<'EOF'
import os, platform, sys
import torch
line = f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    line += f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}"
else:
    line += "no GPU"
print(line + f" | {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
missing = []
for name in ("tensorboardX", "torchvision", "yaml", "numpy", "scipy", "matplotlib", "PIL", "tqdm"):
    try:
        module = __import__(name)
    except ImportError as e:
        missing.append(f"{name} ({e})")
        continue
    if name == "tensorboardX":
        print(f"tensorboardX {module.__version__} from {os.path.dirname(os.path.dirname(module.__file__))}")
if missing:
    sys.exit("gpu_check.sh: missing Python modules: " + ", ".join(missing) +
             ": carry the wheels (bench/gpu_prepare.sh, --carry gpu_carry) or install them")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device here (use --tiny on the CPU)")
EOF
SETUP_RC=$?
cat "$WORK/machine.txt" | tee -a "$LOG"
ROWS+=("setup|$([ "$SETUP_RC" = 0 ] && echo ok || echo "failed (exit $SETUP_RC)")|$(( $(now) - t0 ))|-")
if [ "$SETUP_RC" != 0 ]; then
  tail -1 "$LOG" >&2; exit 1
fi

# the run's config: config.yml with the check's sizes and data root, the fast path's switches on a GPU
CFG=$WORK/config.yml
"$PY" - "$CFG" "$DATA" "$NGF" "$LEVELS" "$STEPS" "$STEPS_EACH" "$N_SAMPLES" "$N_EVAL" "$BATCH" "$SAMPLE_BATCH" "$TINY" <<'EOF' || exit 1
import sys, yaml
path, data, ngf, levels, steps, each, n_samples, n_eval, batch, sample_batch, tiny = sys.argv[1:]
cfg = yaml.safe_load(open("config.yml"))
cfg["data"]["root"] = data
cfg["model"].update(ngf=int(ngf), num_classes=int(levels))
cfg["training"].update(n_iters=int(steps), batch_size=int(batch), snapshot_freq=max(int(steps) // 2, 1))
if tiny == "1":
    cfg["training"].update(n_epochs=10 ** 6, test_freq=max(2, int(steps) // 3), log_freq=max(2, int(steps) // 3))
cfg["sampling"].update(n_steps_each=int(each), n_samples=int(n_samples), batch_size=int(sample_batch))
cfg["eval"].update(n_samples=int(n_eval), loss_images=1000 if tiny == "0" else 100)
if tiny == "0":
    cfg["fast"].update(bf16=True, tf32=True, cudnn_benchmark=True)
yaml.safe_dump(cfg, open(path, "w"), sort_keys=False)
EOF
cp "$CFG" "$OUT_DIR/config.yml"
RUN=(--device "$DEVICE" --config "$CFG" --run "$WORK/run" --doc tenepochs)

# shares of the budget: tests 10%, speed 15%, sample 10%, eval 20%, 5% kept back; train gets what is left
share() { echo $(( BUDGET * $1 / 100 )); }
cap() { local a=$1 b=$2; [ "$b" -lt "$a" ] && a=$b; [ "$a" -lt 1 ] && a=1; echo "$a"; }

# ---------------------------------------------------------------------------------------------------- tests
run_part tests "$(cap "$(share 10)" "$(left)")" "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider \
  --basetemp "$WORK/pytest" --junitxml "$OUT_DIR/tests.xml" tests/test_cuda.py
[ "$PART_RC" = 5 ] && NOTES+=("tests: none collected")

# ---------------------------------------------------------------------------------------------------- speed
run_part speed "$(cap "$(share 15)" "$(left)")" "$PY" bench/speed.py "${SPEED[@]}"
cp "$WORK/speed.log" "$OUT_DIR/speed.txt"

# ---------------------------------------------------------------------------------------------------- train
TRAIN_BOX=$(cap $(( $(left) - $(share 35) )) "${TRAIN_S:-$BUDGET}")
( OMP_NUM_THREADS=$(( $(nproc) > 8 ? 8 : ($(nproc) > 1 ? $(nproc) / 2 : 1) )) timeout -s KILL "$TRAIN_BOX" \
  "$PY" -c "import sys, torch; sys.path.insert(0, '.'); import metrics; from main import setup_logging
setup_logging('info'); metrics.get_classifier(sys.argv[1], torch.device('cpu'))" "$DATA" \
  > "$WORK/classifier.log" 2>&1; echo "$? $(now)" > "$WORK/classifier.rc" ) &
CLASSIFIER=$!; T_CLS=$(now)
run_part train "$TRAIN_BOX" "$PY" main.py "${RUN[@]}"
TRAIN_RC=$PART_RC
STEP=$(timeout 60 "$PY" -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=True)['step'])" \
       "$WORK/run/logs/tenepochs/checkpoint.pth" 2>/dev/null || echo none)
if [ "$STEP" = none ]; then NOTES+=("train: no checkpoint written")
elif [ "$TRAIN_RC" = 0 ]; then NOTES+=("train: finished, step $STEP")
else NOTES+=("train: stopped at step $STEP of $STEPS (exit $TRAIN_RC); that checkpoint is sampled and scored"); fi

wait "$CLASSIFIER"
read -r CLS_RC T_CLS_END < "$WORK/classifier.rc" || { CLS_RC=1; T_CLS_END=$(now); }
{ echo; echo "== classifier (on the CPU during train)"; cat "$WORK/classifier.log"; } >> "$LOG"
ROWS+=("classifier|$([ "$CLS_RC" = 0 ] && echo "ok (during train)" || echo "not ready (exit $CLS_RC): eval trains it")|$(( T_CLS_END - T_CLS ))|$TRAIN_BOX")

# ---------------------------------------------------------------------------------------------------- sample
if [ "$STEP" = none ]; then
  skip_part sample "no checkpoint"; skip_part eval "no checkpoint"
else
  run_part sample "$(cap $(( $(left) - $(share 25) )) "$(share 10)")" "$PY" main.py "${RUN[@]}" --sample \
    -o "$WORK/images/tenepochs" --overwrite
  for f in samples.png movie.gif; do [ -f "$WORK/images/tenepochs/$f" ] && cp "$WORK/images/tenepochs/$f" "$OUT_DIR/"; done
  # the sampling speed of that part sizes eval: each sample is the same chain of $LEVELS x $STEPS_EACH evaluations
  SAMPLED=$(grep -oE 'sampled [0-9]+ images in [0-9.]+ s' "$WORK/sample.log" | tail -1 | awk '{print $5}')
  EVAL_BOX=$(cap $(( $(left) - $(share 5) )) "$BUDGET")
  N_FIT=$("$PY" -c "import sys
n, box, per, lo, batch, overhead = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
fit = n if not per else int(max(0.0, box - overhead) / (float(per) / int(sys.argv[7])) // batch * batch)
print(max(lo, min(n, fit)))" "$N_EVAL" "$EVAL_BOX" "${SAMPLED:-}" "$MIN_EVAL" "$SAMPLE_BATCH" \
    "$([ "$TINY" = 1 ] && echo 5 || echo 45)" "$N_SAMPLES")
  if [ "$N_FIT" != "$N_EVAL" ]; then
    NOTES+=("eval: $N_FIT samples, not $N_EVAL: as many as fit in its ${EVAL_BOX} s box at the sample part's ${SAMPLED} s for $N_SAMPLES")
  fi
  "$PY" - "$CFG" "$N_FIT" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["eval"].update(n_samples=int(sys.argv[2]))
yaml.safe_dump(cfg, open(sys.argv[1], "w"), sort_keys=False)
EOF
  run_part eval "$EVAL_BOX" "$PY" main.py "${RUN[@]}" --eval
  M=$WORK/run/logs/tenepochs/metrics.json
  if [ -f "$M" ]; then
    cp "$M" "$OUT_DIR/metrics.json"
    NOTES+=("$("$PY" -c "import json, sys; r = json.load(open(sys.argv[1]))[-1]
print(f\"eval: step {r['step']}, {r['n_samples']} samples: FID {r['fid']:.2f}, KID {r['kid']:.4f}, IS {r['inception_score']:.2f}, confidence {r['mean_confidence']:.3f}, white {100 * r['white_share']:.0f}%\")" "$M")")
  fi
fi

# ---------------------------------------------------------------------------------------------------- extra
# speed rows with channels_last and torch.compile, only in what is left of the budget
if [ "$TINY" = 1 ]; then
  skip_part extra "--tiny"
elif [ "$(left)" -ge 90 ]; then
  run_part extra "$(( $(left) - 10 ))" "$PY" bench/speed.py "${SPEED[@]}" --channels_last --compile
  { echo; echo "with channels_last and torch.compile:"; cat "$WORK/extra.log"; } >> "$OUT_DIR/speed.txt"
else
  skip_part extra "$(left) s left, under 90 s"
fi
