#!/usr/bin/env bash
# Backup to peers and restore from peers, all on this machine: a
# coordinator (its MQTT broker embedded, books in SQLite) and three nodes in
# temporary homes. alice backs up a folder; her packs go, two copies each,
# to bob and carol (QUIC, or the relay through the coordinator when QUIC
# cannot get through); her local packs are then deleted and the folder is
# restored from the peers alone and compared with the original.
#
#   examples/peer-demo/run.sh [FOLDER]     (default: this repository's engine/)
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$(realpath "${1:-engine}")
# The test profile: built by `cargo test` already, and a little optimised.
# On a fresh clone the first build takes several minutes on two cores; cargo
# shows its progress (a bar on a terminal, one line per crate otherwise).
echo "== building pluto and pluto-coordinator (the first build takes a few minutes)" >&2
cargo build --profile test -p pluto-cli -p pluto-coordinator-bin
echo "== built" >&2
bin=$(realpath "${CARGO_TARGET_DIR:-target}")/debug
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
pluto() { "$bin/pluto" "$@"; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url=mqtt://127.0.0.1:$port
"$bin/pluto-coordinator" --home "$work/coordinator" --listen "127.0.0.1:$port" \
  > "$work/coordinator.out" 2> "$work/coordinator.log" &
pids+=($!)
for _ in $(seq 200); do grep -q '^pluto-coordinator ' "$work/coordinator.out" && break; sleep 0.1; done
# The URL nodes join with, carrying the coordinator's key.
url=$(awk '/^pluto-coordinator /{print $4; exit}' "$work/coordinator.out")
echo "== $(head -1 "$work/coordinator.out")"

for n in alice bob carol; do
  pluto --home "$work/$n" -q init --offer 1G --coordinator "$url" > /dev/null
  echo "== $n is node $(pluto --home "$work/$n" --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["node_id"][:16])')"
done
for n in bob carol; do
  pluto --home "$work/$n" daemon > "$work/$n.log" 2>&1 &
  pids+=($!)
done
for n in bob carol; do
  for _ in $(seq 300); do grep -q 'holding ' "$work/$n.log" && break; sleep 0.1; done
  grep -q 'holding ' "$work/$n.log" || { echo "$n's daemon did not start:"; cat "$work/$n.log"; exit 1; }
done

echo "== alice backs up $src"
pluto --home "$work/alice" backup "$src"
echo "== where alice's replicas went"
pluto --home "$work/alice" peers
echo "== alice's local packs are deleted; she restores from her peers only"
rm -rf "$work/alice/packs"
pluto --home "$work/alice" restore latest --target "$work/restored"
diff -r "$src" "$work/restored$src" > "$work/diff" || { echo "DIFFERENT:"; head "$work/diff"; exit 1; }
echo "== identical: $(find "$src" -type f | wc -l) files restored from peers match $src"
