#!/bin/bash
# Pretrain on this machine (`sgtm train`: checks, then torchrun's agent with NPROC workers):
#   launch/local.sh NPROC CONFIG.yaml [key=value ...]
# e.g. launch/local.sh 2 configs/train/tiny_cpu.yaml tensor_parallel=2
# SGTM_DRY_RUN=1 prints the command without running it.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: launch/local.sh NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
NPROC=$1; CONFIG=$2; shift 2
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NPROC must be a positive number, got '$NPROC'" >&2
    exit 2
fi
if [ ! -f "$CONFIG" ]; then
    echo "error: config $CONFIG does not exist" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CMD=(sgtm train --nproc "$NPROC" --config "$CONFIG" "$@")
echo "+ ${CMD[*]}"
if [ "${SGTM_DRY_RUN:-0}" = 1 ]; then exit 0; fi
exec "${CMD[@]}"
