#!/usr/bin/env bash
# One GPU session in one call: the environment, the kernel tests compiled on the GPU, and the
# gmm and MoE-layer benchmarks, each stage logged under $OUT, a failing stage not stopping the
# next. From the repository root on a CUDA machine (Hopper for the Mosaic GPU kernels):
#
#   OUT=/tmp/gpu bash experiments/gpu/check.sh                 # every stage
#   STAGES="env tests quick" bash experiments/gpu/check.sh     # a subset (quick: small gmm)
#
# Stages: env, tests, quick, gmm, moe_layer, moe_layer_gpu, moe_layer_mixtral, train_step,
# tiles, tokamax (STAGES, default all but quick; at most 8 files come back from one call of
# the device tool: pick 4 stages or fewer there). Packages the machine lacks (ml_collections for the tests; jax_triton; tokamax
# and its needs) are installed from wheels in .whl/ when that folder exists; fetch them
# beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl ml-collections jax-triton==0.3.1 \
#     tokamax==0.0.17 einshape pydantic pydantic-core annotated-types typing-inspection \
#     typing-extensions qwix immutabledict tensorboardx
# tokamax 0.0.17 imports xprof's kernel-stats tool at import time, for its own benchmarking
# helpers, which gmm.py does not use; xprof (32 MB and a dozen more packages) is not carried,
# and when it does not import a module that refuses to be called stands in for that tool.
# The results of each session (H200) are in experiments/gpu/results/.
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.7
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  if ! $PY -c "import xprof" 2>/dev/null; then
    mkdir -p /tmp/site/xprof/cli && touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
    printf 'def get_kernel_stats_tool(*a, **k):\n    raise RuntimeError("xprof is not installed")\n' \
      >/tmp/site/xprof/cli/tools.py
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

STAGES=${STAGES:-env tests gmm moe_layer train_step tiles tokamax}
stage() {  # stage NAME SECONDS CMD...: stdout -> NAME.out, stderr -> NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
  rc=$?
  echo "=== $name: rc=$rc in $(($(date +%s) - start)) s"
  tail -n "${TAIL:-12}" "$OUT/$name.log"
}

stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >&2; $PY -c 'import sys, jax, triton, torch; print(sys.version.split()[0], jax.__version__, jax.devices(), triton.__version__, torch.__version__, file=sys.stderr); print(jax.print_environment_info(return_string=True), file=sys.stderr)'"
TAIL=20 stage quick 60 $PY experiments/benchmarks/gmm.py --json --shapes full --scale 8 \
  --groups skewed --repeats 2 --skip tokamax
TAIL=40 stage gmm 200 $PY experiments/benchmarks/gmm.py --json --shapes full --skip tokamax
MOE_CASES=${MOE_CASES:-pallas,pallas+fused,ragged,ragged+fused,capacity_einsum,auto,expert_parallel,fssdp}
TAIL=20 stage moe_layer 150 $PY experiments/benchmarks/moe_layer.py --json --dtype bfloat16 \
  --skip hf --dispatchers "$MOE_CASES" --profile "${MOE_PROFILE:-dense_mlp,pallas,ragged}"
# One model's state at a time; the 1.7B model without remat wants more than 70% of the card.
TAIL=20 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 stage train_step 240 $PY \
  experiments/benchmarks/train_step.py --json --time-budget-s 180 \
  --dispatchers "${TRAIN_CASES:-auto,auto+fused,pallas,capacity_einsum}" --remat full \
  --profile "${TRAIN_PROFILE:-auto}"
# The MoE layer of the train-step benchmark's model (configs/deepseekmoe.py:size=gpu) and a
# Mixtral-like one (8 experts of 14336, top-2): the shapes of the goals.
TAIL=20 stage moe_layer_gpu 120 $PY experiments/benchmarks/moe_layer.py --json --dtype bfloat16 \
  --tokens 32768 --batch 8 --d-model 1024 --experts 64 --d-expert 512 --top-k 6 --shared 2 \
  --skip hf,dense_reference --repeats 5 --dispatchers "${MOE_GPU_CASES:-ragged,ragged+fused,pallas}" \
  --profile "${MOE_GPU_PROFILE:-dense_mlp,ragged+fused}"
TAIL=20 stage moe_layer_mixtral 110 $PY experiments/benchmarks/moe_layer.py --json \
  --dtype bfloat16 --tokens 16384 --batch 4 --d-model 4096 --experts 8 --d-expert 14336 \
  --top-k 2 --shared 0 --skip hf,dense_reference --repeats 5 \
  --dispatchers "${MOE_MIXTRAL_CASES:-ragged,ragged+fused}"
TAIL=30 stage tests 90 $PY -m pytest -q -p no:cacheprovider -rfEs tests/pallas_kernels
TAIL=30 stage tiles 240 $PY experiments/benchmarks/gmm_tiles.py --json
TAIL=20 stage tokamax 120 $PY experiments/benchmarks/gmm.py --json --shapes full --groups balanced \
  --skip ragged_dot,tile_loop,pallas_triton,torch_grouped_mm --repeats 3
for f in "$OUT"/*.out "$OUT"/*.log; do [ -s "$f" ] || rm -f "$f"; done
ls -la "$OUT"
