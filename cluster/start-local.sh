#!/usr/bin/env bash
# A Ray cluster on this machine for `ray job submit`, on loopback only (127.0.0.1), with the custom
# resources of ppg's node groups: `ppg_learner` (learner workers) and `ppg_rollout` (rollout
# workers). It is the local stand-in for cluster/ray-cluster.gpu.yaml and the KubeRay manifests: a
# config that places work by those resources places it the same way here, only on one node.
#
#   bash cluster/start-local.sh                     # head on 127.0.0.1:6379, dashboard :8265
#   bash cluster/start-local.sh --rollout-slots 4   # room for 4 rollout workers
#   bash cluster/start-local.sh --help
#
# Why one node: Ray 2.60 keeps a node on loopback only when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# and then `ray start --address=...` refuses to add worker nodes; a worker node on the same machine
# must listen on the external address. Worker nodes belong on other machines (cluster/README.md).
#
# It stays in the foreground (`ray start --block`); Ctrl-C or SIGTERM stops exactly this cluster.
# It never runs `ray stop`, which would stop every Ray cluster on the machine. Its own --temp-dir
# keeps it out of /tmp/ray, so a plain `ppg train` elsewhere still starts its own local Ray.
#
# Token authentication is on: every client needs RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, which is generated here when none exists).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: bash cluster/start-local.sh [options]

  --port N            GCS port (default 6379)
  --dashboard-port N  dashboard and job-submission port (default 8265)
  --num-cpus N        logical CPUs (default 4: driver, learner, rollout workers, partner actors)
  --rollout-slots N   ppg_rollout: how many rollout workers fit (default 2)
  --learner-slots N   ppg_learner: how many learner workers fit (default 1)
  --agent-port N      the node's dashboard-agent HTTP port, which job submission goes through
                      (default: a free port; Ray's 52365 is taken by any other Ray on the machine)
  --client-port N     Ray Client server port (default: a free port instead of Ray's 10001)
  --temp-dir DIR      Ray's temp dir (default: a new /tmp/ppg-ray-XXXX; keep it short, Unix
                      socket paths under it must stay below ~107 characters)

Then, from the repository root, in another shell:
  export RAY_AUTH_MODE=token
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
      ppg train --config cluster/configs/local.yaml
EOF
}

port=6379
dashboard_port=8265
num_cpus=4
rollout_slots=2
learner_slots=1
agent_port=""
client_port=""
temp_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --dashboard-port) dashboard_port="$2"; shift 2 ;;
    --num-cpus) num_cpus="$2"; shift 2 ;;
    --rollout-slots) rollout_slots="$2"; shift 2 ;;
    --learner-slots) learner_slots="$2"; shift 2 ;;
    --agent-port) agent_port="$2"; shift 2 ;;
    --client-port) client_port="$2"; shift 2 ;;
    --temp-dir) temp_dir="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start-local.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# The venv's ray: Ray's worker processes (and `ppg` in a job's entrypoint) then run the venv's
# Python. An activated venv or an image's PATH works the same way.
if [ -x .venv/bin/ray ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
command -v ray >/dev/null || { echo "start-local.sh: no 'ray' on PATH; run bash scripts/setup.sh" >&2; exit 2; }

# Loopback only: without this Ray binds the machine's external address.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Stop at once on SIGTERM instead of draining for 30 s (a one-node cluster has nowhere to drain to).
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] \
  && [ ! -s "$HOME/.ray/auth_token" ]; then
  ray get-auth-token --generate >/dev/null   # writes ~/.ray/auth_token; never printed here
fi

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
agent_port="${agent_port:-$(free_port)}"
client_port="${client_port:-$(free_port)}"
temp_dir="${temp_dir:-$(mktemp -d /tmp/ppg-ray-XXXX)}"
echo "[cluster] head 127.0.0.1:$port, dashboard and jobs http://127.0.0.1:$dashboard_port," \
  "ppg_learner=$learner_slots ppg_rollout=$rollout_slots, temp dir $temp_dir (auth: $RAY_AUTH_MODE)"
exec ray start --head --block --node-ip-address=127.0.0.1 --port="$port" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --num-cpus="$num_cpus" \
  --resources="{\"ppg_learner\": $learner_slots, \"ppg_rollout\": $rollout_slots}" \
  --dashboard-agent-listen-port="$agent_port" --ray-client-server-port="$client_port" \
  --temp-dir="$temp_dir" --disable-usage-stats
