#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host, e.g. v4-8, or several, e.g. v5e-16 = 4 hosts x 4 chips): the
# same train.py runs on every host at once (gcloud ... ssh --worker=all); on a TPU VM jax.distributed
# joins the hosts by itself (config.dist.initialize='auto' detects the slice) and the mesh spans all chips.
#
#   bash scripts/launch_tpu_vm.sh NAME ZONE --setup                  # once: copy this repo to every host, install
#   WORKDIR=/mnt/BUCKET/runs/llama_1b bash scripts/launch_tpu_vm.sh NAME ZONE configs/llama_1b.py:v5e-16 \
#       --config.data.path=datasets/stdlib32k                        # start (or resume) training on every host
#   bash scripts/launch_tpu_vm.sh NAME ZONE --log                    # host 0's last log lines
#   bash scripts/launch_tpu_vm.sh NAME ZONE --stop                   # SIGTERM: each host checkpoints and exits
#
# (--setup copies this directory, datasets/ included; runs/ and .venv are left out.)
# NAME, ZONE: the TPU VM (gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=v5litepod-16
# --version=v2-alpha-tpuv5-lite). CONFIG: a preset and its target (configs/llama_*.py:v4-8 | :v5e-16), any
# config file works; further arguments are config overrides.
# Environment:
#   WORKDIR   the run directory, SHARED by all hosts when there are several: a path every host sees, e.g. a
#             bucket mounted with gcsfuse at /mnt/BUCKET on each host (a gs:// URL is refused: the run writes
#             through the local filesystem; Orbax writes every host's shards there; metrics, TensorBoard and
#             tokenizer.json come from host 0). Default
#             runs/<config name> on each host's disk: fine for a one-host v4-8, not for several hosts.
#             Resume = the same command again.
#   PROJECT   the GCP project (default: gcloud's configured one)
#   REPO_DIR  where the repo lives on the hosts (default: lmstack, in the home directory)
#   JAX_SPEC  the jax pip requirement for TPUs (default: jax[tpu]==0.10.2)
# Several slices (multislice): add --config.mesh.dcn_data=<slices> (the preset's mesh is then per slice).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
NAME=$1 ZONE=$2 WHAT=$3
shift 3
REPO_DIR=${REPO_DIR:-lmstack}
JAX_SPEC=${JAX_SPEC:-jax[tpu]==0.10.2}
GCLOUD_FLAGS=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && GCLOUD_FLAGS+=(--project="$PROJECT")

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

case "$WHAT" in
  --setup)
    tar czf /tmp/lmstack_src.tgz --exclude=.venv --exclude=.git --exclude=runs --exclude='__pycache__' .
    gcloud compute tpus tpu-vm scp /tmp/lmstack_src.tgz "$NAME":/tmp/ "${GCLOUD_FLAGS[@]}" --worker=all
    on_all_hosts "mkdir -p ~/$REPO_DIR && tar xzf /tmp/lmstack_src.tgz -C ~/$REPO_DIR && cd ~/$REPO_DIR && \
python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt '$JAX_SPEC'"
    ;;
  --stop)
    on_all_hosts "[ -f ~/lmstack_train.pid ] && kill -TERM \$(cat ~/lmstack_train.pid) || true"
    ;;
  --log)
    gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 --command="tail -n 40 ~/lmstack_train.log"
    ;;
  -*)
    echo "unknown option $WHAT: expected --setup, --stop, --log or a config file" >&2
    exit 2
    ;;
  *)
    stem=$(basename "${WHAT%%:*}" .py)
    WORKDIR=${WORKDIR:-runs/$stem}
    overrides=$(printf ' %q' "$@")
    [ $# -eq 0 ] && overrides=""
    on_all_hosts "cd ~/$REPO_DIR && nohup .venv/bin/python train.py --config=$WHAT --workdir=$WORKDIR$overrides \
> ~/lmstack_train.log 2>&1 < /dev/null & echo \$! > ~/lmstack_train.pid; \
echo \"\$(hostname): started train.py (log: ~/lmstack_train.log)\""
    ;;
esac
