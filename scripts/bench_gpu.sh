#!/usr/bin/env bash
# One prepared GPU benchmark run for a short slot on a machine without network access.
#
#   bash scripts/bench_gpu.sh [OUT_DIR]        (default OUT_DIR: ${OUT:-bench_gpu_out})
#
# Needs jax (CUDA), flax, optax, transformers (and torch + peft for the comparison) already installed;
# anything else can be carried as wheels in ./wheels (installed with --no-index, never from the
# network). Runs scripts/bench.py (absl flags as `ftjax train`: the default experiment
# experiments/quickstart.py, the trainer's own state and jitted step on one device) in bfloat16 for SmolLM2-135M (the packaged GGUF when installed,
# otherwise random weights of its shape) and for a ~1.2B Llama-shaped model with random weights
# (written once to /tmp), full fine-tuning and LoRA (r=8, all linear layers), each against
# transformers + PEFT on the same GPU when torch is there. Each run has its own time limit so that
# the whole script stays under 10 minutes. Results: OUT_DIR/bench_gpu.md (tables) and
# OUT_DIR/bench_gpu.jsonl (one JSON line per run). BENCH_GPU_DRYRUN=1 runs the same sequence on
# tiny shapes (for checking the script on a CPU).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench_gpu_out}}
mkdir -p "$OUT_DIR"
MD="$OUT_DIR/bench_gpu.md"
JSONL="$OUT_DIR/bench_gpu.jsonl"
: > "$MD"
: > "$JSONL"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}
if compgen -G "wheels/*.whl" > /dev/null; then
  python -m pip install --no-index --no-deps wheels/*.whl >> "$OUT_DIR/install.log" 2>&1 || true
fi
python -m pip install --no-index --no-deps -e . >> "$OUT_DIR/install.log" 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}

{
  echo "# GPU benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
  python -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
  python -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1 || true
} >> "$MD"

COMPARE=""
python -c "import torch, peft" 2>/dev/null && COMPARE="--compare=torch"
if [ "${BENCH_GPU_DRYRUN:-0}" = 1 ]; then
  SMOL="--random_init=tiny"; BIG="--random_init=tiny"; SHAPE_S="--batch=2 --seq=32"; SHAPE_B="--batch=2 --seq=32"
  DTYPE=float32; STEPS=2; LIMIT=300
else
  SMOL_GGUF=$(python -c "from ftjax.models import packaged; print(packaged.find('smollm2') or '')" 2>/dev/null)
  if [ -n "$SMOL_GGUF" ] && [ -f "$SMOL_GGUF" ]; then SMOL="--model=$SMOL_GGUF"; else SMOL="--random_init=smollm2"; fi
  BIG="--random_init=llama1b"; SHAPE_S="--batch=32 --seq=1024"; SHAPE_B="--batch=8 --seq=2048"
  DTYPE=bfloat16; STEPS=5; LIMIT=150
fi

run() {  # name, limit, args...
  local name=$1 limit=$2; shift 2
  echo "== $name: python scripts/bench.py $*"
  {
    echo
    echo "## $name"
    echo
    echo '```'
    echo "python scripts/bench.py $*"
    echo '```'
  } >> "$MD"
  timeout "$limit" python scripts/bench.py "$@" --out="$JSONL" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  grep -E '^(\||model |cpu |ftjax vs )' "$OUT_DIR/$name.log" >> "$MD" || true
  [ $rc -eq 0 ] || { echo "(exit $rc; last lines of the log:)" >> "$MD"; tail -5 "$OUT_DIR/$name.log" >> "$MD"; }
}

# The accelerator path: model.kernels=auto picks cuDNN attention (XLA fallback) and plain matmuls on a GPU
# (ftjax/models/kernels.py); bf16 compute, bf16 frozen weights, float32 trainable master weights.
KERNELS="--config.model.kernels=${BENCH_KERNELS:-auto}"
run smollm2_lora "$LIMIT" $SMOL --mode=lora $SHAPE_S --steps=$STEPS --dtype=$DTYPE --frozen_dtype=$DTYPE $KERNELS $COMPARE
run smollm2_full "$LIMIT" $SMOL --mode=full $SHAPE_S --steps=$STEPS --dtype=$DTYPE $KERNELS $COMPARE
run llama1b_lora "$LIMIT" $BIG --mode=lora $SHAPE_B --steps=$STEPS --dtype=$DTYPE --frozen_dtype=$DTYPE $KERNELS $COMPARE
run llama1b_full "$LIMIT" $BIG --mode=full $SHAPE_B --steps=$STEPS --dtype=$DTYPE --remat=full $KERNELS $COMPARE
echo "written: $MD $JSONL"
cat "$MD"
