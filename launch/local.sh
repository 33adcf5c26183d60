#!/bin/bash
# Pretrain on this machine with torchrun:
#   launch/local.sh NPROC CONFIG.yaml [key=value ...]
# e.g. launch/local.sh 2 configs/train/tiny_cpu.yaml tensor_parallel=2
# SGTM_DRY_RUN=1 prints the command without running it.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: launch/local.sh NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
NPROC=$1; CONFIG=$2; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CMD=(${TORCHRUN:-torchrun} --standalone --nproc-per-node "$NPROC" -m megatron_sgtm.train --config "$CONFIG" "$@")
echo "+ ${CMD[*]}"
if [ "${SGTM_DRY_RUN:-0}" = 1 ]; then exit 0; fi
exec "${CMD[@]}"
