#!/usr/bin/env bash
# Backup to peers and restore from peers, against restic with a local
# repository, on the same corpus in the same run. Prints the raw timings and
# a markdown table with the ratios.
#
#   bench/peers.sh [CORPUS]
#
# CORPUS defaults to the stable Rust toolchain (~/.rustup/toolchains/stable-*).
# Everything runs on this machine: a coordinator (with its embedded MQTT
# broker) on 127.0.0.1, two storers running `pluto daemon`, and an owner that
# backs up (`copies = 2`, so every pack goes to both storers), drops its
# local packs and restores from the storers alone. Steps, each timed with
# /usr/bin/time after a `sync`, from a warm page cache (the corpus is read
# once first), as in bench/compare-restic.sh:
#
#   restic   init, backup to a local repository, restore
#   quic     owner backup = local backup + upload over QUIC; restore from peers
#   relay    a second owner with transports = ["relay"] (node -> broker ->
#            coordinator -> broker -> node): backup + upload; restore from peers
#
# The upload's share of a pluto backup is its wall time minus the local
# backup's own duration (pluto's JSON report, summary.duration_ns); relay
# throughput is the upload's replica bytes (upload.bytes_sent) over it.
# Every restore is compared with the corpus (diff -r).
#
# Environment:
#   WORK=DIR      work directory (default /var/tmp/pluto-bench-peers); it is
#                 removed first and at the end (KEEP=1 keeps it)
#   BIN=DIR       take pluto and pluto-coordinator from DIR instead of
#                 building them (cargo build --release, honours CARGO_TARGET_DIR)
#   RELAY_MB=N    run the relay steps on a subset of about N MB of the corpus
#                 (default: the whole corpus)
#   RELAY=0       skip the relay steps
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
corpus=${1:-$(ls -d "$HOME"/.rustup/toolchains/stable-* 2>/dev/null | head -1)}
[ -d "$corpus" ] || { echo "usage: bench/peers.sh [CORPUS]" >&2; exit 1; }
data=$(cd "$corpus" && pwd -P)   # real path: both tools restore under TARGET/$data
work=${WORK:-/var/tmp/pluto-bench-peers}
relay_mb=${RELAY_MB:-0}
command -v restic >/dev/null || { echo "restic is not installed (apt-get install restic)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time is missing (apt-get install time)" >&2; exit 1; }

if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  echo "building pluto and pluto-coordinator (release)..." >&2
  (cd "$here" && cargo build --release -q -p pluto-cli -p pluto-coordinator-bin)
  bin=${CARGO_TARGET_DIR:-$here/target}/release
fi
pluto=$bin/pluto
coord=$bin/pluto-coordinator
[ -x "$pluto" ] && [ -x "$coord" ] || { echo "no pluto / pluto-coordinator in $bin" >&2; exit 1; }

files=$(find "$data" -type f | wc -l)
size=$(du -sb "$data" | cut -f1)
echo "corpus: $data, $files files, $((size / 1000000)) MB" >&2
# Packs are about a third of the corpus here; restic's repository, three
# pluto copies of them per owner and one restore at a time need about 3x it.
need_kb=$((size * 3 / 1024))
free_kb=$(df -Pk "$(dirname "$work")" | awk 'NR == 2 { print $4 }')
[ "$free_kb" -gt "$need_kb" ] || { echo "not enough room under $(dirname "$work"): ${free_kb} KiB free, want ${need_kb}" >&2; exit 1; }

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

failures=()
# run NAME OKCODES CMD...: wall seconds and peak RSS (KiB) of CMD into
# $work/NAME.time, its output into NAME.out / NAME.err. An exit code outside
# OKCODES (space separated) is recorded as a failure; the script goes on.
run() {
  local name=$1 okcodes=$2 rc=0; shift 2
  sync  # no step pays for the previous one's write-back
  /usr/bin/time -f "%e %M" -o "$work/$name.time" "$@" >"$work/$name.out" 2>"$work/$name.err" || rc=$?
  echo "$rc" > "$work/$name.rc"
  if [[ " $okcodes " != *" $rc "* ]]; then
    failures+=("$name: exit $rc: $*")
    echo "$name FAILED (exit $rc): $*" >&2
    grep -v '^Command exited' "$work/$name.err" | tail -5 | sed 's/^/  /' >&2
  fi
  echo "$name: $(cut -d' ' -f1 "$work/$name.time") s, exit $rc" >&2
  return 0
}
t() { cut -d' ' -f1 "$work/$1.time"; }
rss() { cut -d' ' -f2 "$work/$1.time"; }
rc() { cat "$work/$1.rc"; }

# same NAME TREE: compares a restored tree with the corpus it came from.
same() {
  local name=$1 orig=$2 restored=$3
  if [ "$(rc "$name")" != 0 ]; then echo "not checked (restore failed)" > "$work/$name.diff"
  elif diff -r --no-dereference "$orig" "$restored" > "$work/$name.diff.out" 2>&1; then echo "identical" > "$work/$name.diff"
  else
    echo "DIFFERS ($(wc -l < "$work/$name.diff.out") lines of diff -r --no-dereference)" > "$work/$name.diff"
    failures+=("$name: restore differs from the corpus (diff -r --no-dereference)")
  fi
  echo "$name: $(cat "$work/$name.diff")" >&2
}

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

# json FILE EXPR: a value from a JSON file (python expression over `j`).
json() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null || echo "?"; }

tar -cf - "$data" 2>/dev/null | cat >/dev/null   # warm the page cache
# Other work on the machine skews every figure; the load is reported with them.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
[ "${load_start%%.*}" -lt 1 ] || echo "warning: load average $load_start: the machine is busy, timings will be slow" >&2

# ---- restic, local repository ----------------------------------------------
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$work/restic-repo RESTIC_CACHE_DIR=$work/restic-cache
run restic-init "0" restic init -q
run restic-backup "0 3" restic backup -q "$data"
run restic-restore "0" restic restore latest -q --target "$work/restore"
same restic-restore "$data" "$work/restore$data"
restic_repo=$(du -sb "$RESTIC_REPOSITORY" | cut -f1)
rm -rf "$work/restore" "$RESTIC_REPOSITORY" "$RESTIC_CACHE_DIR"

# ---- the network -----------------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=mqtt://127.0.0.1:$port
# The relay's per-node rate limit (64 MiB/s by default) is not what is measured.
cat > "$work/coord.toml" <<EOF
relay_bytes_per_s = 1073741824
relay_burst_bytes = 268435456
EOF
mkdir -p "$work/coord"
"$coord" --home "$work/coord" --listen "127.0.0.1:$port" --config "$work/coord.toml" \
  > "$work/coord.out" 2> "$work/coord.err" &
pids+=($!); coord_pid=$!
wait_line "$work/coord.out" "pluto-coordinator " 30

storer_pids=()
for i in 1 2; do
  h=$work/s$i
  "$pluto" --home "$h" init --offer 8G --coordinator "$url" > "$work/s$i.init" 2>&1
  "$pluto" --home "$h" daemon > "$work/s$i.out" 2> "$work/s$i.err" &
  pids+=($!); storer_pids+=($!)
  wait_line "$work/s$i.out" "holding " 60
done
echo "coordinator on 127.0.0.1:$port, 2 storers up" >&2

# owner NAME TRANSPORTS: a new owner node (24 words into NAME.init).
owner() {
  local h=$work/$1
  "$pluto" --home "$h" init --offer 8G --coordinator "$url" > "$work/$1.init" 2>&1
  sed -i "s/^transports = .*/transports = $2/" "$h/config.toml"
  grep -qxF "transports = $2" "$h/config.toml" || { echo "could not set transports in $h/config.toml" >&2; exit 1; }
}

# peers_transport HOME OUT: transports of the peers that hold replicas.
peers_transport() {
  "$pluto" --home "$1" --json peers > "$2" 2>/dev/null || true
  json "$2" "','.join(sorted(set(str(p.get('transport')) for p in j['peers'] if p['replicas_held'] > 0))) or 'none'"
}

# pluto_round NAME TRANSPORTS CORPUS: backup to peers, drop local packs,
# restore from peers, compare.
pluto_round() {
  local n=$1 tr=$2 src=$3
  owner "$n" "$tr"
  run "$n-backup" "0" "$pluto" --home "$work/$n" --json backup "$src"
  echo "$n transport: $(peers_transport "$work/$n" "$work/$n.peers")" > "$work/$n.transport"
  cat "$work/$n.transport" >&2
  du -sb "$work/$n/packs" | cut -f1 > "$work/$n.packs"
  rm -rf "$work/$n/packs"
  run "$n-restore" "0" "$pluto" --home "$work/$n" -q restore latest --target "$work/restore"
  same "$n-restore" "$src" "$work/restore$src"
  rm -rf "$work/restore"
}

# ---- pluto over QUIC ---------------------------------------------------------
pluto_round quic '["quic", "relay"]' "$data"

# ---- pluto through the relay -------------------------------------------------
relay_src=$data
if [ "${RELAY:-1}" != 0 ]; then
  if [ "$relay_mb" -gt 0 ]; then
    # The first files (sorted) up to RELAY_MB MB, under the same real path
    # shape (restores land under TARGET/<path>).
    relay_src=$work/relay-corpus
    (cd "$data" && find . -type f -printf '%s %p\n' | sort -k2 |
      awk -v lim=$((relay_mb * 1000000)) '{ t += $1 } t <= lim { sub(/^[0-9]+ /, ""); print }' > "$work/relay.list"
      tar -cf - -T "$work/relay.list") | (mkdir -p "$relay_src" && cd "$relay_src" && tar -xf -)
    tar -cf - "$relay_src" 2>/dev/null | cat >/dev/null
    echo "relay corpus: $(du -sb "$relay_src" | cut -f1) bytes in $(find "$relay_src" -type f | wc -l) files" >&2
  fi
  pluto_round relay '["relay"]' "$relay_src"
fi

# Peak RSS of the long-running processes, before they go.
vmhwm() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
coord_rss=$(vmhwm "$coord_pid")
storer_rss=0
for p in "${storer_pids[@]}"; do r=$(vmhwm "$p"); [ "$r" -gt "$storer_rss" ] && storer_rss=$r; done

# ---- report ------------------------------------------------------------------
relay_size=$(du -sb "$relay_src" | cut -f1)
raw=$work/raw.txt
{
  echo "corpus $data files $files bytes $size"
  for s in restic-init restic-backup restic-restore quic-backup quic-restore relay-backup relay-restore; do
    [ -f "$work/$s.time" ] && echo "$s seconds $(t $s) peak_rss_kib $(rss $s) exit $(rc $s)"
  done
  for n in quic relay; do
    [ -f "$work/$n-backup.out" ] || continue
    echo "$n local_backup_s $(json "$work/$n-backup.out" "j['summary']['duration_ns'] / 1e9")" \
      "upload $(json "$work/$n-backup.out" "json.dumps(j.get('upload'))")"
    echo "$n packs_bytes $(cat "$work/$n.packs") $(cat "$work/$n.transport") restore $(cat "$work/$n-restore.diff")"
  done
  echo "restic repository_bytes $restic_repo restore $(cat "$work/restic-restore.diff")"
  echo "peak_rss_kib coordinator $coord_rss storer $storer_rss"
  echo "load_average start $load_start end $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$raw"
echo; echo "raw timings:"; cat "$raw"; echo

# Missing steps (RELAY=0, a failure) give "n/a" cells.
val() { [ -f "$work/$1.time" ] && t "$1" || echo "None"; }
jv() { [ -f "$work/$1-backup.out" ] && json "$work/$1-backup.out" "$2" | sed 's/^?$/None/' || echo "None"; }
python3 - <<PY
size, relay_size, files = $size, $relay_size, $files
rb, rr = $(val restic-backup), $(val restic-restore)
qb, qr = $(val quic-backup), $(val quic-restore)
xb, xr = $(val relay-backup), $(val relay-restore)
ql, xl = $(jv quic "j['summary']['duration_ns'] / 1e9"), $(jv relay "j['summary']['duration_ns'] / 1e9")
qs, xs = $(jv quic "j['upload']['bytes_sent']"), $(jv relay "j['upload']['bytes_sent']")
def f(x, fmt="{:.2f}"):
    return "n/a" if x is None else fmt.format(x)
def div(a, b):
    return None if a is None or b is None or b <= 0 else a / b
def sub(a, b):
    return None if a is None or b is None else a - b
mb = lambda b: None if b is None else b / 1e6
print(f"corpus: {size/1e6:,.0f} MB in {files:,} files" + ("" if relay_size == size else f"; relay steps on a {relay_size/1e6:,.0f} MB subset"))
print()
print("| step | restic (local repo) | pluto (peers) | ratio | target |")
print("|---|---:|---:|---:|---|")
print(f"| backup, QUIC (s) | {f(rb)} | {f(qb)} | {f(div(rb, qb))} (restic/pluto) | >= 1.0 |")
print(f"| of which local backup / upload (s) | | {f(ql)} / {f(sub(qb, ql))} | | |")
print(f"| restore from peers, QUIC (s) | {f(rr)} | {f(qr)} | {f(div(rr, qr))} (restic/pluto) | >= 1.0 |")
print(f"| backup throughput (MB/s of corpus) | {f(div(mb(size), rb), '{:.0f}')} | {f(div(mb(size), qb), '{:.0f}')} | | |")
print(f"| QUIC upload (MB/s of replicas, {f(mb(qs), '{:.0f}')} MB) | | {f(div(mb(qs), sub(qb, ql)), '{:.0f}')} | | |")
if xb is not None:
    same = relay_size == size
    print(f"| backup, relay (s) | {f(rb) if same else ''} | {f(xb)} | {f(div(rb, xb)) + ' (restic/pluto)' if same else ''} | |")
    print(f"| of which local backup / upload (s) | | {f(xl)} / {f(sub(xb, xl))} | | |")
    print(f"| relay upload (MB/s of replicas, {f(mb(xs), '{:.0f}')} MB) | | {f(div(mb(xs), sub(xb, xl)), '{:.0f}')} (lower bound over the whole backup: {f(div(mb(xs), xb), '{:.0f}')}) | | >= 50 |")
    print(f"| restore from peers, relay (s) | {f(rr) if same else ''} | {f(xr)} | {f(div(rr, xr)) + ' (restic/pluto)' if same else ''} | |")
PY
echo
echo "restores: restic $(cat "$work/restic-restore.diff"); pluto quic $(cat "$work/quic-restore.diff" 2>/dev/null || echo n/a); pluto relay $(cat "$work/relay-restore.diff" 2>/dev/null || echo n/a)"
if [ ${#failures[@]} -gt 0 ]; then
  echo; echo "failures:"
  for f in "${failures[@]}"; do echo "- $f"; done
  exit 1
fi
