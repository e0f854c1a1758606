#!/usr/bin/env bash
# A coordinator and N nodes from the command line, in temporary homes:
# every node joins and stays connected (pluto daemon), asks where a 16 MiB
# pack would go (pluto match), then the coordinator is killed with SIGKILL
# and started again, and every node's books are shown to be the same.
#
#   examples/network-demo/run.sh [NODES] [--channel mqtt://HOST:PORT]
#
# Without --channel the coordinator embeds its broker on a free port.
set -euo pipefail
cd "$(dirname "$0")/../.."
nodes=${1:-20}
shift || true
cargo build -q -p pluto-cli -p pluto-coordinator-bin
bin=${CARGO_TARGET_DIR:-target}/debug
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

printf 'heartbeat_ms = 1000\nsweep_ms = 500\n' > "$work/coordinator.toml"
if [[ ${1:-} == --channel ]]; then
  url=$2
  args=(--channel "$url")
else
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  url=mqtt://127.0.0.1:$port
  args=(--listen "127.0.0.1:$port")
fi
start_coordinator() {
  "$bin/pluto-coordinator" --home "$work/coordinator" --config "$work/coordinator.toml" "${args[@]}" \
    > "$work/coordinator.out" 2>> "$work/coordinator.log" &
  coordinator=$!
  for _ in $(seq 100); do grep -q '^pluto-coordinator ' "$work/coordinator.out" && break; sleep 0.1; done
  # The URL nodes join with, carrying the coordinator's key.
  url=$(awk '/^pluto-coordinator /{print $4; exit}' "$work/coordinator.out")
  head -1 "$work/coordinator.out"
}
start_coordinator

for i in $(seq -w 1 "$nodes"); do
  "$bin/pluto" --home "$work/node$i" -q init --offer 256M --coordinator "$url" > /dev/null
  "$bin/pluto" --home "$work/node$i" -q daemon > "$work/node$i.log" 2>&1 &
  pids+=($!)
done
sleep 2
echo "== every node asks room for one 16 MiB pack, 2 copies"
for i in $(seq -w 1 "$nodes"); do
  printf 'node%s -> ' "$i"
  "$bin/pluto" --home "$work/node$i" --json match 16M | python3 -c \
    'import json,sys; print(" ".join(s["id"][:12] for s in json.load(sys.stdin)["storers"]))'
done
books() {
  for i in $(seq -w 1 "$nodes"); do
    "$bin/pluto" --home "$work/node$i" --json status | python3 -c \
      'import json,sys; c=json.load(sys.stdin)["coordinator"]; print(c["state"], c["offered"], c["held"], c["placed"])'
  done
}
books > "$work/before"
echo "== kill -9 the coordinator, start it again"
kill -9 "$coordinator"; wait "$coordinator" 2>/dev/null || true
: > "$work/coordinator.out"
start_coordinator
sleep 3
books > "$work/after"
if diff "$work/before" "$work/after" > /dev/null; then
  echo "== the books of all $nodes nodes are the same after the restart:"
  sort "$work/after" | uniq -c
else
  echo "== the books changed:"; diff "$work/before" "$work/after"; exit 1
fi
kill "$coordinator"
