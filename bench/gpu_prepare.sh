#!/usr/bin/env bash
# Lays out the folder that travels with the working tree to a GPU machine for bench/gpu_check.sh (docs/gpu.md):
# that machine has no network, no tensorboardX and no MNIST. Run here, on the CPU machine:
#
#   bash bench/gpu_prepare.sh [MNIST_RAW] [--out gpu_carry] [--find_links DIR]
#
#   gpu_carry/wheels/   the tensorboardX wheel of requirements.txt (pure Python), from pip's configured index or
#                       its cache (--find_links DIR: from DIR only, no index)
#   gpu_carry/MNIST/raw the four uncompressed MNIST files (52.4 MiB) copied from MNIST_RAW (default
#                       run/datasets/MNIST/raw); one found only as .gz there is decompressed. No .gz is carried.
#
# gpu_carry/ is ignored by git; the GPU machine gets it by naming it in the run's carry list. The working tree and
# the folder travel together under 64 MiB: the total is printed, and going over it is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "gpu_prepare.sh: $*" >&2; exit 1; }

SRC=run/datasets/MNIST/raw; OUT=gpu_carry; LINKS=; GOT_SRC=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out|--find_links)
      [ $# -ge 2 ] || die "$1 needs a value"
      if [ "$1" = --out ]; then OUT=$2; else LINKS=$2; fi
      shift ;;
    -*) die "unknown argument $1 (expected [MNIST_RAW] [--out DIR] [--find_links DIR])" ;;
    *) [ "$GOT_SRC" = 0 ] || die "one MNIST folder only, got $SRC and $1"; SRC=$1; GOT_SRC=1 ;;
  esac
  shift
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
VERSION=$(sed -n 's/^tensorboardX==\([0-9][0-9A-Za-z.]*\).*/\1/p' requirements.txt)
[ -n "$VERSION" ] || die "requirements.txt pins no tensorboardX==VERSION"

FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
for f in "${FILES[@]}"; do
  [ -f "$SRC/$f" ] || [ -f "$SRC/$f.gz" ] || die "MNIST file $f (or $f.gz) is not in $SRC: pass the folder that holds the raw MNIST files"
done

mkdir -p "$OUT/wheels" "$OUT/MNIST/raw"
rm -f "$OUT"/wheels/*.whl  # one version of each wheel: two would stop the install there
for f in "${FILES[@]}"; do
  if [ -f "$SRC/$f" ]; then
    cp "$SRC/$f" "$OUT/MNIST/raw/$f.part"
  else
    gzip -dc "$SRC/$f.gz" > "$OUT/MNIST/raw/$f.part"
  fi
  chmod u+w,a+r "$OUT/MNIST/raw/$f.part"
  mv -f "$OUT/MNIST/raw/$f.part" "$OUT/MNIST/raw/$f"
done

DOWNLOAD=(download --no-deps --only-binary=:all: --python-version 3.12 -d "$OUT/wheels" "tensorboardX==$VERSION")
if [ -n "$LINKS" ]; then DOWNLOAD+=(--no-index --find-links "$LINKS"); fi
"$PY" -m pip "${DOWNLOAD[@]}" -q || die "pip could not get tensorboardX==$VERSION${LINKS:+ from $LINKS} (a wheel)"
WHEEL=$(ls "$OUT"/wheels/*.whl)
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
print(f"{sys.argv[1]}: needs {', '.join(needs) or 'nothing'}; the GPU machine's tensorboard brings numpy, packaging and "
      "protobuf, so the check assumes them there (it stops with one line naming a module that is missing)")
EOF

# what travels: tracked and untracked-not-ignored files of the working tree, and this folder
TREE=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
CARRY=$(du -sb "$OUT" | awk '{print $1}')
TOTAL=$(( TREE + CARRY ))
MIB=$(( 64 * 1024 * 1024 ))
echo "$OUT: $(du -sh "$OUT" | cut -f1) ($(ls "$OUT/MNIST/raw" | wc -l) MNIST files, $(basename "$WHEEL")); with the working tree $(( TOTAL / 1024 / 1024 )) MiB of the 64 MiB that travel"
[ "$TOTAL" -le "$MIB" ] || die "the working tree ($(( TREE / 1024 )) KiB) and $OUT ($(( CARRY / 1024 )) KiB) pass the 64 MiB that travel: remove untracked files from the tree"
echo "on the GPU machine, with $OUT carried: bash bench/gpu_check.sh --carry $OUT --out \"\$OUT\""
