#!/usr/bin/env bash
# Runs pluto and restic on the same corpus in the same run and prints, for
# both: initial backup, unchanged re-backup, re-backup after changing ~1% of
# files, restore, repository size and peak RSS, with the ratios.
#
#   bench/compare-restic.sh CORPUS [WORKDIR]
#
# CORPUS is copied into WORKDIR first (default: a new directory under
# /var/tmp) so that changing 1% of its files leaves the original alone. The
# copy is read once before any timing so both tools start from a warm page
# cache. Needs restic (`apt-get install restic`) and builds pluto in release
# mode. Set RUNS=N to take the best of N runs of each timed step (default 1).
set -euo pipefail

corpus=${1:?usage: bench/compare-restic.sh CORPUS [WORKDIR]}
work=${2:-$(mktemp -d /var/tmp/pluto-bench.XXXXXX)}
here=$(cd "$(dirname "$0")/.." && pwd)
command -v restic >/dev/null || { echo "restic is not installed (apt-get install restic)" >&2; exit 1; }

echo "building pluto (release)..." >&2
(cd "$here" && cargo build --release -q -p pluto-cli)
pluto=${CARGO_TARGET_DIR:-$here/target}/release/pluto

mkdir -p "$work"
data=$work/corpus
if [ ! -d "$data" ]; then
  echo "copying $corpus to $data..." >&2
  cp -a "$corpus" "$data"
fi
files=$(find "$data" -type f | wc -l)
size=$(du -sb "$data" | cut -f1)
echo "corpus: $corpus, $files files, $((size / 1000000)) MB" >&2
tar -cf - "$data" 2>/dev/null | cat >/dev/null   # warm the page cache

export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$work/restic-repo RESTIC_CACHE_DIR=$work/restic-cache
export PLUTO_HOME=$work/pluto-home
rm -rf "$RESTIC_REPOSITORY" "$RESTIC_CACHE_DIR" "$PLUTO_HOME" "$work"/restore-*
restic init -q >/dev/null
"$pluto" init --json >/dev/null

# run NAME CMD...: wall seconds and peak RSS (KiB) of CMD into $work/NAME.
run() {
  local name=$1; shift
  sync  # no step pays for the previous one's write-back
  /usr/bin/time -f "%e %M" -o "$work/$name.time" "$@" >"$work/$name.out" 2>"$work/$name.err" || {
    local rc=$?
    # restic exits 3 and pluto 3 when some files could not be read; still timed.
    [ $rc -eq 3 ] || { echo "$name failed ($rc):" >&2; tail -5 "$work/$name.err" >&2; exit 1; }
  }
  echo "$name: $(cat "$work/$name.time")" >&2
}

run restic-initial restic backup -q "$data"
run pluto-initial "$pluto" -q backup "$data"
run restic-unchanged restic backup -q "$data"
run pluto-unchanged "$pluto" -q backup "$data"

# Change about 1% of the files: every 100th file in sorted order gets bytes appended.
find "$data" -type f | sort | awk 'NR % 100 == 0' > "$work/changed.list"
while IFS= read -r f; do printf 'pluto bench change %s\n' "$RANDOM" >> "$f" 2>/dev/null || true; done < "$work/changed.list"
echo "changed $(wc -l < "$work/changed.list") files" >&2

run restic-changed restic backup -q "$data"
run pluto-changed "$pluto" -q backup "$data"
run restic-restore restic restore latest -q --target "$work/restore-restic"
run pluto-restore "$pluto" -q restore latest --target "$work/restore-pluto"

# The restore must be exact.
diff -r "$data" "$work/restore-pluto$data" >/dev/null || { echo "pluto restore differs!" >&2; exit 1; }

# The repository is what a restore needs: restic's whole repository, pluto's
# packs. pluto's catalog is a cache rebuilt from the packs (like restic's
# cache directory, which is not counted either); the whole home is shown too.
restic_repo=$(du -sb "$RESTIC_REPOSITORY" | cut -f1)
pluto_repo=$(du -sb "$PLUTO_HOME/packs" | cut -f1)
pluto_home=$(du -sb "$PLUTO_HOME" | cut -f1)
restic_cache=$(du -sb "$RESTIC_CACHE_DIR" 2>/dev/null | cut -f1 || echo 0)

t() { cut -d' ' -f1 "$work/$1.time"; }
rss() { cut -d' ' -f2 "$work/$1.time"; }
peak() { local m=0; for s in initial unchanged changed restore; do r=$(rss "$1-$s"); [ "$r" -gt "$m" ] && m=$r; done; echo "$m"; }

python3 - "$size" "$files" <<PY
import sys
size, files = int(sys.argv[1]), int(sys.argv[2])
rows = [
  ("initial backup (s)", $(t restic-initial), $(t pluto-initial), "restic/pluto", ">= 2.5"),
  ("unchanged re-backup (s)", $(t restic-unchanged), $(t pluto-unchanged), "pluto/restic", "<= 0.4"),
  ("re-backup, 1% changed (s)", $(t restic-changed), $(t pluto-changed), "restic/pluto", "(speed-up)"),
  ("restore (s)", $(t restic-restore), $(t pluto-restore), "restic/pluto", ">= 2"),
  ("repository size (MB)", $restic_repo / 1e6, $pluto_repo / 1e6, "pluto/restic", "<= 1.0"),
  ("peak RSS (MB)", $(peak restic) / 1024, $(peak pluto) / 1024, "pluto/restic", "<= 1.0"),
]
print(f"corpus: {size/1e6:.0f} MB in {files} files")
print(f"{'':28} {'restic':>10} {'pluto':>10} {'ratio':>8}  {'(of)':<13} target")
for name, r, p, how, target in rows:
    ratio = r / p if how == "restic/pluto" else p / r
    print(f"{name:28} {r:10.2f} {p:10.2f} {ratio:8.2f}  {how:<13} {target}")
print(f"with caches: restic repository + cache {($restic_repo + $restic_cache)/1e6:.1f} MB, pluto home (packs + catalog) {$pluto_home/1e6:.1f} MB")
print(f"initial backup throughput: restic {size/1e6/$(t restic-initial):.0f} MB/s, pluto {size/1e6/$(t pluto-initial):.0f} MB/s")
PY
echo "work directory: $work (remove it when done)" >&2
