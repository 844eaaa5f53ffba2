#!/usr/bin/env bash
# Local multi-node recipe: a Ray head plus CPU "shard nodes" on one machine, then `engram serve` joins it.
#   deploy/local-cluster.sh up [DATA_DIR] [PORT]   # starts head + 2 shard nodes + the server (background)
#   deploy/local-cluster.sh down [DATA_DIR]        # stops the server and this recipe's Ray nodes (only those)
# Each `ray start` is its own raylet: on real machines run the `--address` line on every CPU node instead.
set -euo pipefail
cmd=${1:-up}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${ENGRAM_BIN:-$here/.venv/bin}
# Ray token authentication: every node and `engram serve` read the token from ~/.ray/auth_token (made once here)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} HF_HUB_OFFLINE=1
ray_port=${RAY_PORT:-6390}
tmp_root=${ENGRAM_RAY_TMP:-/tmp/engram-ray-$ray_port}  # every process of this cluster carries it: `down` stops only them
case "$cmd" in
  up)
    data=${2:-$here/engram-data}
    port=${3:-50551}
    if [ "$RAY_AUTH_MODE" = token ]; then "$bin/ray" get-auth-token --generate >/dev/null; fi
    "$bin/ray" start --head --port "$ray_port" --num-cpus 2 --include-dashboard false --disable-usage-stats \
      --temp-dir "$tmp_root" >/dev/null
    for i in 1 2; do
      # shard nodes: no CPUs for encoders, the engram_shard resource for shard placement
      "$bin/ray" start --address "127.0.0.1:$ray_port" --num-cpus 0 --resources '{"engram_shard": 2}' \
        --disable-usage-stats --temp-dir "$tmp_root" >/dev/null
    done
    mkdir -p "$data"
    cat > "$data/engram.toml" <<TOML
[cluster]
address = "127.0.0.1:$ray_port"
shard_resource = "engram_shard"
encoders = 2
[shard]
data_dir = "$data"
[server]
port = $port
TOML
    nohup "$bin/engram" serve --config "$data/engram.toml" >"$data/serve.log" 2>&1 &
    echo $! >"$data/serve.pid"
    for _ in $(seq 180); do
      grep -q "serving on" "$data/serve.log" && { echo "engram serving on 127.0.0.1:$port"; exit 0; }
      kill -0 "$(cat "$data/serve.pid")" 2>/dev/null || { cat "$data/serve.log"; exit 1; }
      sleep 1
    done
    echo "server did not start; see $data/serve.log" >&2; exit 1 ;;
  down)
    data=${2:-$here/engram-data}
    [ -f "$data/serve.pid" ] && kill "$(cat "$data/serve.pid")" 2>/dev/null || true
    pkill -TERM -f -- "$tmp_root" 2>/dev/null || true  # not `ray stop`: that stops every Ray on the machine
    sleep 2
    pkill -KILL -f -- "$tmp_root" 2>/dev/null || true ;;
  *) echo "usage: $0 up|down [DATA_DIR] [PORT]" >&2; exit 2 ;;
esac
