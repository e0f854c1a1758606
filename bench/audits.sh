#!/usr/bin/env bash
# Audits through the coordinator: challenges verified per second, their
# latency (owner's Audit to its Audited) and their bytes on the wire, with
# examples/coordinator-load in its audit modes. Prints each run's report and
# a markdown table.
#
#   bench/audits.sh
#
# Three runs, each with OWNERS owners and STORERS storers (simulated by the
# load tool, one MQTT connection each), every owner with REPLICAS replicas of
# 64 KiB, on the storers round robin, and AUDITS audits, IN_FLIGHT at a time:
#
#   embedded   pluto-coordinator with its embedded broker on a free
#              port of 127.0.0.1, SQLite books under a temporary home
#   mosquitto  the same coordinator against Mosquitto on 127.0.0.1:1883
#              (topic prefix bench-audits-PID, so nothing else is disturbed)
#   in-process a coordinator inside the load tool, driven through
#              Coordinator::handle from TASKS tasks: no broker, no sockets
#
# The coordinator runs with its defaults but for the per-owner audit rate
# (owner_audits_per_s, owner_audit_burst), which is raised: it is not what is
# measured. The load tool reports the CPU time of itself, the coordinator
# and (for the mosquitto run) the broker over each audit run.
#
# Environment:
#   WORK=DIR      work directory (default /var/tmp/pluto-bench-audits); it is
#                 removed first and at the end (KEEP=1 keeps it)
#   BIN=DIR       take pluto-coordinator and coordinator-load from DIR instead
#                 of building them (cargo build --release, honours CARGO_TARGET_DIR)
#   OWNERS=N STORERS=N REPLICAS=N AUDITS=N IN_FLIGHT=N TASKS=N
#                 (defaults 200, 200, 4, 20000, 200, 4)
#   MOSQUITTO=HOST:PORT  the external broker (default 127.0.0.1:1883);
#                 MOSQUITTO=0 skips that run
#   DYNSEC=HOST:PORT DYNSEC_ADMIN=USER DYNSEC_PASSWORD_FILE=FILE
#                 one more run, on a Mosquitto with its dynamic security
#                 plugin, where the coordinator makes every node's account
#                 (the nodes register through pluto-newcomer first;
#                 docs/mosquitto.md)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/var/tmp/pluto-bench-audits}
owners=${OWNERS:-200}
storers=${STORERS:-200}
replicas=${REPLICAS:-4}
audits=${AUDITS:-20000}
in_flight=${IN_FLIGHT:-200}
tasks=${TASKS:-4}
mosquitto=${MOSQUITTO:-127.0.0.1:1883}

if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  echo "building pluto-coordinator and coordinator-load (release)..." >&2
  (cd "$here" && cargo build --release -q -p pluto-coordinator-bin -p coordinator-load)
  bin=${CARGO_TARGET_DIR:-$here/target}/release
fi
coord=$bin/pluto-coordinator
load=$bin/coordinator-load
[ -x "$coord" ] && [ -x "$load" ] || { echo "no pluto-coordinator / coordinator-load in $bin" >&2; exit 1; }

rm -rf "$work"
mkdir -p "$work"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One connection per simulated node here, and one per node in the broker.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# wait_line FILE TEXT SECONDS: until FILE has a line containing TEXT.
wait_line() {
  local file=$1 text=$2 secs=$3 i
  for ((i = 0; i < secs * 10; i++)); do
    grep -qF -- "$text" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no line with '$text' in $file after ${secs}s:" >&2
  tail -5 "$file" "${file%.out}.err" >&2 2>/dev/null || true
  return 1
}

cat > "$work/coord.toml" <<EOF
owner_audits_per_s = 1000000
owner_audit_burst = 1000000
EOF

failures=()
common=(--nodes $((owners + storers)) --storers "$storers" --replicas "$replicas")
# Other work on the machine skews every figure; the load is reported with them.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
[ "${load_start%%.*}" -lt 1 ] || echo "warning: load average $load_start: the machine is busy, timings will be slow" >&2

# over_broker NAME URL [COORDINATOR OPTIONS...]: a coordinator on URL's
# broker, the load tool against it, the coordinator stopped.
over_broker() {
  local name=$1 url=$2 rc=0 extra=(); shift 2
  mkdir -p "$work/$name-home"
  "$coord" --home "$work/$name-home" --config "$work/coord.toml" "$@" \
    > "$work/$name-coord.out" 2> "$work/$name-coord.err" &
  local pid=$!
  pids+=("$pid")
  wait_line "$work/$name-coord.out" "pluto-coordinator " 30
  if [ "$name" = mosquitto ] || [ "$name" = mosquitto-accounts ]; then
    local m port=${url##*:}
    port=${port%%/*}
    m=$(ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
    if [ -n "$m" ]; then extra=(--cpu-of "mosquitto=$m"); fi
  fi
  echo "== $name: $url" >&2
  "$load" --url "$url" "${common[@]}" --audits "$audits" --in-flight "$in_flight" \
    --cpu-of "coordinator=$pid" "${extra[@]}" > "$work/$name.out" 2> "$work/$name.err" || rc=$?
  cat "$work/$name.out"
  [ "$rc" = 0 ] || { failures+=("$name: exit $rc"); tail -5 "$work/$name.err" | sed 's/^/  /' >&2; }
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# ---- embedded broker -------------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Every simulated node connects from this one address.
over_broker embedded "mqtt://127.0.0.1:$port" --listen "127.0.0.1:$port" \
  --max-connections-per-address 100000

# ---- Mosquitto ---------------------------------------------------------------
if [ "$mosquitto" != 0 ]; then
  if python3 -c "import socket,sys; h,p=sys.argv[1].rsplit(':',1); socket.create_connection((h,int(p)),2)" "$mosquitto" 2>/dev/null; then
    url=mqtt://$mosquitto/bench-audits-$$
    over_broker mosquitto "$url" --channel "$url"
  else
    echo "no broker on $mosquitto: the mosquitto run is skipped" >&2
  fi
fi

# ---- Mosquitto with accounts -------------------------------------------------
if [ -n "${DYNSEC:-}" ]; then
  url=mqtt://$DYNSEC/bench-audits-$$
  over_broker mosquitto-accounts "$url" --channel "$url" \
    --dynsec-admin "${DYNSEC_ADMIN:?}" --dynsec-password-file "${DYNSEC_PASSWORD_FILE:?}"
fi

# ---- in process --------------------------------------------------------------
echo "== in process" >&2
rc=0
"$load" "${common[@]}" --audits-in-process "$audits" --tasks "$tasks" \
  > "$work/in-process.out" 2> "$work/in-process.err" || rc=$?
cat "$work/in-process.out"
[ "$rc" = 0 ] || { failures+=("in-process: exit $rc"); tail -5 "$work/in-process.err" | sed 's/^/  /' >&2; }

# ---- summary -----------------------------------------------------------------
echo
echo "load average: start $load_start, end $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
echo "$owners owners, $storers storers, $replicas replicas of 64 KiB each, $audits audits"
echo
python3 - "$work" <<'PY'
import os, re, sys
work = sys.argv[1]
rate = re.compile(r"^audits (?:over the broker|in process)[^:]*: (\d+) ok, (\d+) failed in ([\d.]+)s \((\d+)/s\); p50 ([\d.]+) ms, p99 ([\d.]+) ms")
print("| run | audits/s | p50 / p99 (ms) | outcomes | coordinator CPU per audit | bytes per challenge (envelopes / MQTT) |")
print("|---|---:|---:|---|---:|---:|")
for name in ["embedded", "mosquitto", "mosquitto-accounts", "in-process"]:
    path = os.path.join(work, name + ".out")
    if not os.path.exists(path):
        continue
    text = open(path).read()
    m = next((rate.match(l) for l in text.splitlines() if rate.match(l)), None)
    if not m:
        print(f"| {name} | failed | | | | |")
        continue
    outcomes = re.search(r"outcomes: (.*)", text)
    cpu = re.search(r"CPU of coordinator: .*?, (\d+) µs per audit", text) or \
        re.search(r"the coordinator alone: about (\d+) µs", text)
    env = re.search(r"= (\d+) bytes per challenge", text)
    mqtt = re.search(r"no TCP/IP\): (\d+) bytes per challenge", text)
    print(f"| {name} | {int(m[4]):,} | {m[5]} / {m[6]} | {outcomes[1] if outcomes else '?'} "
          f"| {cpu[1] + ' µs' if cpu else '?'}{' (estimate)' if name == 'in-process' else ''} "
          f"| {env[1] if env else '?'} / {mqtt[1] if mqtt else '?'} |")
PY
if [ ${#failures[@]} -gt 0 ]; then
  echo; echo "failures:"
  for f in "${failures[@]}"; do echo "- $f"; done
  exit 1
fi
