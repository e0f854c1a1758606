#!/usr/bin/env bash
# A cheating storer caught, excluded and repaired around, all on this
# machine: a coordinator auditing on a short clock, three storers and alice.
# alice backs up a folder (two copies of every pack); every replica is
# proven with `pluto check --remote`; then dave, the storer holding most,
# deletes 1% of what he holds. The next audit catches him, the coordinator
# excludes him, alice's daemon places his replicas on the honest storers
# (from their copies: alice's local packs are gone) and releases his claim;
# the folder still restores from the peers alone.
#
#   examples/audit-demo/run.sh [FOLDER]
#
# Without FOLDER, 26 MB of random files (incompressible, so they make ~340
# packs and ~230 replicas per storer).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --profile test -p pluto-cli -p pluto-coordinator-bin
bin=$(realpath "${CARGO_TARGET_DIR:-target}")/debug
work=$(mktemp -d)
if [[ -n ${1:-} ]]; then
  src=$(realpath "$1")
else
  src=$work/data
  mkdir -p "$src"
  for i in $(seq 26); do head -c 1000000 /dev/urandom > "$src/f$i.bin"; done
fi
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
pluto() { "$bin/pluto" "$@"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
wait_log() { # file, text, seconds
  for _ in $(seq $(($3 * 10))); do grep -q "$2" "$1" && return 0; sleep 0.1; done
  echo "no '$2' in $1:"; tail "$1"; exit 1
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url=mqtt://127.0.0.1:$port
cat > "$work/coordinator.toml" <<TOML
heartbeat_ms = 1000
sweep_ms = 500
# Audits on a short clock: every storer at least twice a second.
audit_tick_ms = 100
storer_audit_every_ms = 500
proof_deadline_ms = 5000
standing_every_ms = 1000
TOML
"$bin/pluto-coordinator" --home "$work/coordinator" --listen "127.0.0.1:$port" \
  --config "$work/coordinator.toml" > "$work/coordinator.out" 2> "$work/coordinator.log" &
pids+=($!)
wait_log "$work/coordinator.out" '^pluto-coordinator ' 20
# The URL nodes join with, carrying the coordinator's key.
url=$(awk '/^pluto-coordinator /{print $4; exit}' "$work/coordinator.out")
echo "== $(head -1 "$work/coordinator.out")"

storers=(bob carol dave)
for n in alice "${storers[@]}"; do
  pluto --home "$work/$n" -q init --offer 1G --coordinator "$url" > /dev/null
done
# Small packs, so that 1% of a storer's replicas is a whole replica.
sed -i -e 's/^pack_size = .*/pack_size = 65536/' -e 's/^min = .*/min = 8192/' \
  -e 's/^avg = .*/avg = 16384/' -e 's/^max = .*/max = 32768/' \
  -e 's/^daemon_every = .*/daemon_every = 2/' "$work/alice/config.toml"
start_daemon() {
  # The binary itself in the background (not the shell function), so that
  # its pid is the daemon's.
  "$bin/pluto" --home "$work/$1" daemon >> "$work/$1.log" 2>&1 &
  pids+=($!)
  eval "pid_$1=$!"
}
for n in "${storers[@]}"; do start_daemon "$n"; done
for n in "${storers[@]}"; do wait_log "$work/$n.log" 'holding ' 30; done

echo "== alice backs up $src"
pluto --home "$work/alice" backup "$src"
echo "== every replica of the snapshot, audited now"
pluto --home "$work/alice" check --remote

# dave: whoever holds most. He deletes 1% of it and carries on.
cheat=$(for n in "${storers[@]}"; do echo "$(find "$work/$n/held" -type f -name '????????????????????????????????????????????????????????????????' | wc -l) $n"; done | sort -n | tail -1 | cut -d' ' -f2)
held=$(find "$work/$cheat/held" -type f -name '????????????????????????????????????????????????????????????????' | sort)
total=$(echo "$held" | wc -l)
gone=$(( total / 100 > 0 ? total / 100 : 1 ))
cheat_id=$(pluto --home "$work/$cheat" --json status | field '["node_id"]')
echo "== $cheat (${cheat_id:0:16}) deletes $gone of the $total replicas he holds, and restarts"
eval "kill \$pid_$cheat; wait \$pid_$cheat" 2>/dev/null || true
: > "$work/$cheat.log"
echo "$held" | awk -v n="$gone" -v t="$total" 'NR % int(t / n) == 1 && c++ < n' | xargs rm -f
start_daemon "$cheat"
wait_log "$work/$cheat.log" 'holding ' 30

echo "== alice audits again"
pluto --home "$work/alice" check --remote && { echo "the cheat went unnoticed"; exit 1; } || true
for _ in $(seq 150); do
  "$bin/pluto-coordinator" --home "$work/coordinator" status --json \
    | python3 -c "import json,sys; print(any(n['id'] == '$cheat_id' and n['excluded'] for n in json.load(sys.stdin)))" \
    | grep -q True && break
  sleep 0.2
done
echo "== the coordinator's books"
"$bin/pluto-coordinator" --home "$work/coordinator" status
echo "== alice's peers"
pluto --home "$work/alice" peers

echo "== alice's local packs are gone; her daemon repairs from the other copies"
rm -rf "$work/alice/packs"
start_daemon alice
wait_log "$work/alice.log" 'repair: ' 60
for _ in $(seq 300); do
  placed=$(pluto --home "$work/alice" --json status \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["packs_placed"] == s["packs"])')
  [[ $placed == True ]] && grep -q 'packs placed' "$work/alice.log" && break
  sleep 0.5
done
grep 'repair: ' "$work/alice.log" | head -3
echo "   ... $(grep -c 'repair: ' "$work/alice.log") replicas moved off $cheat"
pluto --home "$work/alice" check --remote
"$bin/pluto-coordinator" --home "$work/coordinator" status | grep -E "node|excluded"

echo "== alice restores from her peers only"
rm -rf "$work/alice/packs"
pluto --home "$work/alice" restore latest --target "$work/restored"
diff -r "$src" "$work/restored$src" > "$work/diff" || { echo "DIFFERENT:"; head "$work/diff"; exit 1; }
echo "== identical: $(find "$src" -type f | wc -l) files restored from the honest peers match $src"
