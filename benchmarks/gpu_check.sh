#!/usr/bin/env bash
# The checks that need a GPU, in one run: the GPU tests (generate in float32 and bf16, a bf16 training run),
# then both benchmarks on the GPU. Results (logs and JSON, 12 files) go to $OUT, or ./gpu_results.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with the package importable
#
# The bf16 agreement on trained weights needs a trained model folder: carry outputs/demo/run/model (make demo).
# On a machine without the package's dependencies, wheels in .whl/ (transformers, tokenizers, datasets and
# its dill/multiprocess) are installed into /tmp/site first; the machine's own torch is used.
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_tests.log"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu_tests.log"

status=0
timeout 240 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tee -a "$out/gpu_tests.log" || status=1
timeout 200 python3 benchmarks/bench_generate.py --device cuda --repeats "${REPEATS:-3}" ${GENERATE_OPTIONS:-} \
    --json-out "$out/bench_generate_gpu.json" 2>&1 | tee "$out/bench_generate_gpu.log" || status=1
# the largest batch the issue names: the decoder's per-step overhead is spread over 4x more images
timeout 150 python3 benchmarks/bench_generate.py --device cuda --repeats "${REPEATS:-3}" --batch-size 1024 \
    --skip-peer --skip-memory --json-out "$out/bench_generate_gpu_1024.json" 2>&1 \
    | tee "$out/bench_generate_gpu_1024.log" || status=1
# what each piece of the fast path buys there, with and without it, captured steps included (the step compiled
# with torch.compile(mode="reduce-overhead"), i.e. CUDA graphs; compiling it lengthens the warm-up)
for batch in 256 1024; do
    timeout 240 python3 benchmarks/bench_generate.py --device cuda --pieces-only --repeats "${REPEATS:-3}" \
        --batch-size "$batch" --json-out "$out/bench_generate_gpu_pieces_$batch.json" 2>&1 \
        | tee "$out/bench_generate_gpu_pieces_$batch.log" || status=1
done
timeout 100 python3 benchmarks/bench_train.py --device cuda --steps "${TRAIN_STEPS:-5}" --json-out "$out/bench_train_gpu.json" 2>&1 \
    | tee "$out/bench_train_gpu.log" || status=1
exit $status
