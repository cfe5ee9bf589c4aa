#!/usr/bin/env bash
# The GPU rows of docs/benchmarks/speed.md (issue 22) in one call of the device tool, sized to
# its 10-minute call and 15-minute session budget. From the repository root, on the GPU machine
# (its image has torch, timm, huggingface_hub, safetensors, scikit-learn and tqdm):
#
#     bash scripts/gpu_speed_rows.sh          # about 9 minutes; results under $OUT (or outputs/gpu)
#
# Each stage has its own time limit and writes its table as it goes, so a stage that runs out
# of time loses only its own unfinished rows. Stages: the training steps (UM, the UMAP default,
# the layer-wise mode) on every GPU row; the same with fit(compile={"mode": "reduce-overhead"})
# (CUDA graphs) on ResNet-50 at batch 64; evaluation under autocast.
set -uo pipefail
out="${OUT:-outputs/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$out/device.txt"
import torch, timm
print(torch.__version__, timm.__version__, torch.cuda.get_device_name(0))
PY
stage() {  # stage NAME SECONDS ARGS...: one benchmark run, its table in $out/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds}s): examples/benchmark_speed.py $*"
    timeout "$seconds" python3 examples/benchmark_speed.py --device cuda "$@" 2>&1 \
        | tee "$out/$name.txt"
}
stage train 270 --repeats 3 --no-extras
# Compiling takes tens of seconds per fit: one row, CUDA graphs on.
stage compiled 150 --repeats 2 --model resnet50 --batch 64 --compile reduce-overhead --no-extras
stage eval 110 --eval --amp
