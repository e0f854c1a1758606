#!/usr/bin/env bash
# Nodes logging in to Mosquitto with the accounts the coordinator keeps in
# its dynamic security plugin (docs/mosquitto.md): how fast new nodes get
# their accounts, and how long 10,000 nodes with accounts take to connect
# (authenticated CONNECT) and authenticate to the coordinator.
#
#   bench/mosquitto-logins.sh
#
# A Mosquitto of its own (port PORT, dynamic security file under WORK),
# pluto-coordinator on it with --dynsec-admin, then examples/coordinator-load:
#
#   register  REGISTER new nodes (random keys): each is refused, registers
#             through pluto-newcomer (the coordinator makes its account:
#             3 changes to the plugin's file), then logs in with it
#   logins    NODES nodes whose accounts were made beforehand (written into
#             the plugin's file by bench/mosquitto-accounts.py while
#             Mosquitto was stopped, as the coordinator would have made
#             them): connect with their password and authenticate
#
# Environment: WORK (default /var/tmp/pluto-bench-logins, removed first),
# PORT (1885), NODES (10000), REGISTER (1000), CONCURRENCY (100),
# BIN=DIR (pluto-coordinator and coordinator-load, else built in release).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/var/tmp/pluto-bench-logins}
port=${PORT:-1885}
nodes=${NODES:-10000}
register=${REGISTER:-1000}
concurrency=${CONCURRENCY:-100}
if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  (cd "$here" && cargo build --release -q -p pluto-coordinator-bin -p coordinator-load)
  bin=${CARGO_TARGET_DIR:-$here/target}/release
fi
plugin=$(ls /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so 2>/dev/null | head -n1 || true)
[ -n "$plugin" ] || { echo "mosquitto's dynamic security plugin is missing" >&2; exit 1; }

rm -rf "$work"; mkdir -p "$work"
ulimit -n "$(ulimit -Hn)"
echo benchpassword > "$work/admin-password"
mosquitto_ctrl dynsec init "$work/dynsec.json" pluto-admin benchpassword > /dev/null
cat > "$work/mosquitto.conf" <<CONF
per_listener_settings false
allow_anonymous false
persistence false
listener $port 127.0.0.1
plugin $plugin
plugin_opt_config_file $work/dynsec.json
max_keepalive 120
max_queued_messages 1000
max_queued_bytes 16777216
max_packet_size 8388608
log_dest file $work/mosquitto.log
CONF
id mosquitto >/dev/null 2>&1 && chown -R mosquitto "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
broker() {
  mosquitto -c "$work/mosquitto.conf" & pids+=($!)
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return; sleep 0.1; done
  echo "mosquitto did not start" >&2; exit 1
}
broker
url=mqtt://127.0.0.1:$port/load
"$bin/pluto-coordinator" --home "$work/coordinator" --channel "$url" \
  --dynsec-admin pluto-admin --dynsec-password-file "$work/admin-password" \
  > "$work/coordinator.out" 2> "$work/coordinator.err" & pids+=($!)
for _ in $(seq 1 100); do grep -q "pluto-coordinator " "$work/coordinator.out" && break; sleep 0.1; done
join=$url
echo "== register: $register new nodes, $concurrency at a time"
"$bin/coordinator-load" --url "$join" --nodes "$register" --concurrency "$concurrency"
echo "== logins: $nodes nodes with accounts, $concurrency at a time"
"$bin/coordinator-load" --key-seed 7 --nodes "$nodes" --print-accounts > "$work/accounts"
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
python3 "$here/bench/mosquitto-accounts.py" "$work/dynsec.json" load < "$work/accounts"
id mosquitto >/dev/null 2>&1 && chown -R mosquitto "$work"
broker
sleep 6   # the coordinator's channel and administrator reconnect
"$bin/coordinator-load" --url "$join" --key-seed 7 --nodes "$nodes" --concurrency "$concurrency"
echo "accounts made by the coordinator: $(grep -c 'broker account of' "$work/coordinator.err" || true)"
