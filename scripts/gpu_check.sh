#!/usr/bin/env bash
# Every GPU check of the project in one go, for a machine with an NVIDIA GPU:
# builds the extension with CUDA, runs the offload bench (the longest, first so a
# short time slot still gets its table), the tests that need a device, the
# training check (FSDP2 and DeepSpeed resumes with NCCL), then the other GPU
# benches (pattern kernels, NCCL).
# Prints one table per bench; exits non-zero if the build or a test fails.
#   GPU_CHECK_SMALL=1   smaller offload stack (fits a short time slot)
#   OFFLOAD_ARGS="..."  extra arguments for bench/offload_gpu.py (e.g. --rounds 3)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

echo "== device"
nvidia-smi -L || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

echo "== build (CUDA)"
MLUTILS_CUDA=1 python3 setup.py -q build_ext --inplace -j "$(nproc)" || exit 1
python3 -c 'import mlutils; print("features", sorted(mlutils.features), "cuda_available", mlutils.cuda_available(), mlutils.cuda_status())' || exit 1

echo "== bench: activation offload"
if [ "${GPU_CHECK_SMALL:-0}" = 1 ]; then
  python3 bench/offload_gpu.py --hidden 2048 --seq 2048 --layers 8 --steps 2 --rounds 3 --check-steps 30 \
    --copy-mib 512 ${OFFLOAD_ARGS:-} || status=1
else
  python3 bench/offload_gpu.py ${OFFLOAD_ARGS:-} || status=1
fi

echo "== tests that use the device"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_test_deps || status=1
python3 -m pytest -q -p no:cacheprovider -p no:randomly -o addopts="" -m "not slow" \
  tests/test_package.py tests/test_pattern_torch.py tests/test_offload.py tests/test_distributed.py \
  tests/test_ptsave.py -k "cuda or CUDA or nccl or Nccl or Communicator or offload or checksum" || status=1

echo "== train: FSDP2 and DeepSpeed on one GPU with NCCL"
# each engine trained to step 3 with a background checkpoint (save@3, quit@3), resumed in new processes to step 6 and compared
# with an uninterrupted run (full weights); one torchrun rank, NCCL (scripts/gpu_train_check.py --device cpu
# runs the same with gloo)
python3 scripts/gpu_train_check.py --device cuda --nproc-per-node 1 || status=1

echo "== bench: pattern gather kernel"
python3 bench/bench_pattern_cuda.py || status=1

echo "== bench: NCCL communicator"
python3 bench/distributed_gpu.py || status=1
exit $status
