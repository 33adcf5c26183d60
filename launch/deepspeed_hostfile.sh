#!/bin/bash
# Multi-node training with the DeepSpeed launcher and a hostfile (lines "host slots=N"):
#   launch/deepspeed_hostfile.sh HOSTFILE CONFIG.yaml [key=value ...]
# Runs the same entry point with engine.name=deepspeed (ZeRO stage from the config).
# SGTM_DRY_RUN=1 prints the command only.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: launch/deepspeed_hostfile.sh HOSTFILE CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
HOSTFILE=$1; CONFIG=$2; shift 2
if [ ! -f "$HOSTFILE" ]; then
    echo "error: hostfile $HOSTFILE does not exist" >&2
    exit 2
fi
CMD=(${DEEPSPEED:-deepspeed} --hostfile "$HOSTFILE" --master_port "${SGTM_MASTER_PORT:-29500}" --no_local_rank
     --module megatron_sgtm.train --config "$CONFIG" engine.name=deepspeed "$@")
echo "+ ${CMD[*]}"
if [ "${SGTM_DRY_RUN:-0}" = 1 ]; then exit 0; fi
exec "${CMD[@]}"
