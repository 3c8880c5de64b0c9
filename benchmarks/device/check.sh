#!/usr/bin/env bash
# The GPU check of fedmole (benchmarks/device/check.py): every algorithm's smoke run on CUDA in fp32 and bf16
# against the same run on the CPU, and the AMoLE and SMoE layers on the GPU against their naive loops. About
# 3-4 minutes on one H100 (budget: 6). Without a GPU it runs on the CPU (the fallback the test suite checks).
#
#   bash benchmarks/device/check.sh prepare        # once, on a machine with network access and WordNet:
#                                                  # wheels/ and wordnet/ next to this script (git-ignored)
#   bash benchmarks/device/check.sh [ARGS...]      # on the GPU machine: torch is there, nothing else is needed
#
# On the GPU machine nothing can be downloaded: what its Python lacks (pydantic, flwr-datasets, rouge-score,
# ... and the pinned transformers) installs from wheels/ into a temporary directory, and the smoke configs'
# WordNet comes from wordnet/ (a subset of WordNet 3.0: every 8th synset) when the machine has none. ARGS go to
# check.py (--quick, --configs NAME..., --set KEY=VALUE, --out FILE). The result is printed, written to
# benchmarks/results/device.json, and copied to $OUT when that is set (the device tool's output folder).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$HERE/wheels"
WORDNET="$HERE/wordnet"
# what the GPU image lacks or holds in another version than pyproject.toml pins (torch stays the machine's)
PINNED=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 transformers==5.23.0 tokenizers==0.23.3 regex==2026.12.2 typer==0.20.1
        flwr-datasets==0.6.1 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.2.0
        nltk==3.10.4 defusedxml==0.7.1)
BUILT=(rouge-score==0.1.2)  # published as a source archive only: built into a wheel here

prepare() {
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${PINNED[@]}"
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "${BUILT[@]}"
  local src="${FEDMOLE_WORDNET_DIR:-/usr/share/wordnet}"
  [ -f "$src/data.noun" ] || { echo "no WordNet in $src: apt-get install wordnet-base (or set FEDMOLE_WORDNET_DIR)"; exit 1; }
  mkdir -p "$WORDNET"
  for f in data.noun data.verb data.adj data.adv; do  # the license header, then every 8th synset
    awk '/^  / { print; next } { if (n++ % 8 == 0) print }' "$src/$f" > "$WORDNET/$f"
  done
  du -sh "$WHEELS" "$WORDNET"
}

if [ "${1:-}" = "prepare" ]; then
  prepare
  exit 0
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
SITE=""
# the wheels go in only where fedmole's dependencies are missing or not the pinned transformers (a GPU image)
if ! "$PY" -c "import pydantic, flwr_datasets, rouge_score, typer, transformers as t; assert t.__version__ == '5.23.0'" \
    2> /dev/null; then
  compgen -G "$WHEELS/*.whl" > /dev/null || {
    echo "this Python lacks fedmole's dependencies and $WHEELS holds no wheels: run \`$0 prepare\` where there is"\
         "network (or install fedmole with \`make setup\`)"; exit 2; }
  SITE="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || {
    echo "the wheels in $WHEELS are for CPython 3.12 on x86-64 Linux (the GPU image); this is $("$PY" -V)"; exit 2; }
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${FEDMOLE_WORDNET_DIR:-}" ] && [ ! -f /usr/share/wordnet/data.noun ] && [ -f "$WORDNET/data.noun" ]; then
  export FEDMOLE_WORDNET_DIR="$WORDNET"
fi
cd "$ROOT"
status=0
"$PY" -m benchmarks.device.check "$@" || status=$?
if [ -n "${OUT:-}" ] && [ -f benchmarks/results/device.json ]; then
  cp benchmarks/results/device.json "$OUT/"
fi
exit "$status"
