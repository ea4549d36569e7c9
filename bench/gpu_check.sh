#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, in about 9 minutes, with each part's time printed.
#   1. the CUDA tests (tests/test_cuda.py; --full_suite: the whole suite)
#   2. bench/speed.py's CUDA rows: plain (true fp32), fast (bf16, TF32, cudnn.benchmark, fused Adam), compile
#   3. the seed's headline result: config.yml trained for its ten epochs (4,690 steps of batch 128) with the
#      fast path's switches on (speed only: the method is config.yml's), then --sample with the paper's sampler
#      (10 levels x 100 steps = 1,000 network evaluations a sample) into images/tenepochs/ (samples.png,
#      movie.gif), then --eval on 1,000 samples (FID and IS on the project's classifier).
#
#   bash bench/gpu_check.sh [--data_root DIR] [--run DIR] [--full_suite]    # on the GPU machine
#   bash bench/gpu_check.sh --tiny                               # the same steps on the CPU at a tiny size
#
# --tiny: ngf 4, 6 training steps, 4 samples of 4 levels x 2 steps, into run/gpu_check_tiny/ or --run (images/
# is untouched): a check that the script and every command in it run, in CI-friendly time.
# Environment: STEPS, N_SAMPLES, N_EVAL override the sizes (e.g. fewer steps on a slower GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TINY=0; FULL=0; DATA=run/datasets; RUN=
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --full_suite) FULL=1 ;;
    --data_root) DATA="$2"; shift ;;
    --run) RUN="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --tiny, --full_suite, --data_root DIR, --run DIR)" >&2
       exit 2 ;;
  esac
  shift
done

if [ "$TINY" = 1 ]; then
  DEVICE=cpu; RUN=${RUN:-run/gpu_check_tiny}; OUT=$RUN/images; NGF=4; LEVELS=4; STEPS=${STEPS:-6}; STEPS_EACH=2
  N_SAMPLES=${N_SAMPLES:-4}; N_EVAL=${N_EVAL:-4}; SPEED=(--devices cpu --ngf 4 --batch 8 --repeats 1 --matmul_n 128)
  BATCH=8
else
  DEVICE=cuda; RUN=${RUN:-run/gpu_check}; OUT=images/tenepochs; NGF=64; LEVELS=10; STEPS=${STEPS:-4690}; STEPS_EACH=100
  N_SAMPLES=${N_SAMPLES:-100}; N_EVAL=${N_EVAL:-1000}; SPEED=(--devices cuda --compile --ngf 64 16 --repeats 5)
  BATCH=128
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device here (use --tiny on the CPU)')"
fi
if [ -e "$RUN" ]; then
  echo "gpu_check.sh: $RUN exists from an earlier check: move it away first (nothing is deleted)" >&2; exit 1
fi
mkdir -p "$RUN"
T_ALL=$(date +%s)
part() { echo; echo "== $1"; T0=$(date +%s); }
took() { echo "-- $1: $(( $(date +%s) - T0 )) s"; }

part "machine"
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', '|', torch.get_num_threads(), 'CPU threads')"

part "tests"
if [ "$FULL" = 1 ]; then "$PY" -m pytest -q; else "$PY" -m pytest -q -m cuda -rs; fi
took "tests"

part "speed (bench/speed.py ${SPEED[*]})"
"$PY" bench/speed.py "${SPEED[@]}"
took "speed"

# config.yml with the run's sizes and the fast path's switches (speed only; the method is unchanged)
CFG=$RUN/config.yml
"$PY" - "$CFG" "$DATA" "$NGF" "$LEVELS" "$STEPS" "$STEPS_EACH" "$N_SAMPLES" "$N_EVAL" "$BATCH" "$TINY" <<'EOF'
import sys, yaml
path, data, ngf, levels, steps, each, n_samples, n_eval, batch, tiny = sys.argv[1:]
cfg = yaml.safe_load(open("config.yml"))
cfg["data"]["root"] = data
cfg["model"].update(ngf=int(ngf), num_classes=int(levels))
cfg["training"].update(n_iters=int(steps), batch_size=int(batch), snapshot_freq=max(int(steps) // 2, 1))
cfg["sampling"].update(n_steps_each=int(each), n_samples=int(n_samples), batch_size=min(int(n_samples), 1000))
cfg["eval"].update(n_samples=int(n_eval), n_samples_cpu=int(n_eval), loss_images_cpu=100)
if tiny == "0":
    cfg["fast"].update(bf16=True, tf32=True, cudnn_benchmark=True)
yaml.safe_dump(cfg, open(path, "w"), sort_keys=False)
EOF

part "train: config.yml, $STEPS steps of batch $BATCH, ngf $NGF, on $DEVICE"
"$PY" main.py --device "$DEVICE" --config "$CFG" --run "$RUN" --doc tenepochs
took "train"

part "sample: $N_SAMPLES samples, $LEVELS levels x $STEPS_EACH steps, into $OUT"
"$PY" main.py --device "$DEVICE" --config "$CFG" --run "$RUN" --doc tenepochs --sample -o "$OUT" --overwrite
took "sample"

part "eval: FID and IS of $N_EVAL samples"
"$PY" main.py --device "$DEVICE" --config "$CFG" --run "$RUN" --doc tenepochs --eval
took "eval"
echo; echo "== done in $(( $(date +%s) - T_ALL )) s; metrics in $RUN/logs/tenepochs/metrics.json, images in $OUT"
