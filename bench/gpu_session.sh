#!/usr/bin/env bash
# Everything attnscan wants measured on a GPU, in one command, for a machine lent for a few minutes.
#
#   bash bench/gpu_session.sh OUTDIR        # from the repository root; about 7-9 minutes on one H100
#
# Uses the Python that holds torch there (python3, or $PYTHON); attnscan is taken from src/ (no install), so the
# machine needs torch, transformers, accelerate, safetensors, tokenizers, numpy, pandas and pytest, nothing else.
# Each step writes its own JSON and log into OUTDIR as soon as it ends, so a run cut short keeps what finished.
# Order: the correctness checks, then the capture benchmark of the 8B architecture (the 40 % target), then the
# other two reference architectures, then (where git history is there) the collector's A/B.
set -u -o pipefail
out=${1:?usage: bash bench/gpu_session.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
"$py" bench/gpu_check.py --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log" || status=1
# B = 1 and 4 for the 8B architecture (its 40 % target), B = 4 for the other two: 16 worker processes, each
# building a full-size model, so that the whole script stays inside one 10-minute command.
for job in llama-3.1-8b:1,4 mistral-7b-v0.1:4 gpt-j-6b:4; do
    preset=${job%%:*}
    "$py" bench/capture.py --presets "$preset" --batch-sizes "${job#*:}" --json "$out/bench-$preset.json" 2>&1 \
        | tee "$out/bench-$preset.log" || status=1
done
# The collector before and after it lost its loop over prompts (needs the git history, which may not travel).
if git rev-parse -q --verify "b92625b~1^{commit}" >/dev/null 2>&1; then
    "$py" bench/collector.py --base b92625b~1 --device cuda --batch-sizes 1,16,64 --lengths 448 --layers 8 \
        --spread 4 --padding left 2>&1 | tee "$out/collector.log" || status=1
fi
exit $status
