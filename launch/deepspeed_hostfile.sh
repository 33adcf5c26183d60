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
PORT=${SGTM_MASTER_PORT:-29500}
CMD=(${DEEPSPEED:-deepspeed} --hostfile "$HOSTFILE" --master_port "$PORT" --no_local_rank
     --module megatron_sgtm.train --config "$CONFIG" engine.name=deepspeed "$@")
echo "+ ${CMD[*]}"
if [ "${SGTM_DRY_RUN:-0}" = 1 ]; then exit 0; fi
if [ ! -f "$CONFIG" ]; then
    echo "error: config $CONFIG does not exist" >&2
    exit 2
fi
# Hostfile lines "host slots=N": the world size is the sum of the slots; the first host runs
# the rendezvous on PORT.
read -r FIRST_HOST SLOTS < <(awk '$1 !~ /^#/ && NF { split($2, a, "="); n += a[2]; if (!h) h = $1 }
                                 END { print h, n + 0 }' "$HOSTFILE")
if [ -z "$FIRST_HOST" ] || [ "$SLOTS" -le 0 ]; then
    echo "error: hostfile $HOSTFILE lists no \"host slots=N\" lines" >&2
    exit 2
fi
# Config, world size vs TP x PP, data, checkpoint, lock, a free port here: one error, exit 2.
sgtm train --dry-run --nproc "$SLOTS" --rdzv-endpoint "$FIRST_HOST:$PORT" --config "$CONFIG" \
    engine.name=deepspeed "$@" > /dev/null
exec "${CMD[@]}"
