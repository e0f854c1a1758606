#!/usr/bin/env bash
# Measures chunker sizes on a corpus: for each min/avg/max, an initial
# backup (time, stored size, peak RSS) and a re-backup after inserting 100
# bytes into the middle of every file over 4 MB (bytes newly stored: what
# content-defined chunking saves on edits).
#
#   bench/chunk-sizes.sh CORPUS [WORKDIR]
set -euo pipefail
corpus=${1:?usage: bench/chunk-sizes.sh CORPUS [WORKDIR]}
work=${2:-$(mktemp -d /var/tmp/pluto-chunks.XXXXXX)}
here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo build --release -q -p pluto-cli)
pluto=${CARGO_TARGET_DIR:-$here/target}/release/pluto
mkdir -p "$work"

printf '%-22s %10s %12s %9s %16s\n' "min/avg/max (KiB)" "backup s" "stored MB" "RSS MB" "edit: stored MB"
for sizes in "256 512 4096" "512 1024 8192" "1024 2048 16384"; do
  set -- $sizes
  data=$work/corpus
  rm -rf "$data" "$work/home"
  cp -a "$corpus" "$data"
  tar -cf - "$data" 2>/dev/null | cat >/dev/null
  export PLUTO_HOME=$work/home
  "$pluto" init --json >/dev/null
  sed -i -e "s/^min = .*/min = $(( $1 * 1024 ))/" -e "s/^avg = .*/avg = $(( $2 * 1024 ))/" \
    -e "s/^max = .*/max = $(( $3 * 1024 ))/" "$PLUTO_HOME/config.toml"
  sync
  /usr/bin/time -f "%e %M" -o "$work/t" "$pluto" -q backup "$data"
  read -r secs rss < "$work/t"
  stored=$(du -sb "$PLUTO_HOME/packs" | cut -f1)
  python3 - "$data" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        p = os.path.join(root, f)
        if os.path.islink(p) or os.path.getsize(p) <= 4 << 20:
            continue
        with open(p, 'rb') as fh:
            b = fh.read()
        mid = len(b) // 2
        with open(p, 'wb') as fh:
            fh.write(b[:mid] + b'x' * 100 + b[mid:])
PY
  added=$("$pluto" --json backup "$data" | python3 -c 'import json,sys; print(json.load(sys.stdin)["summary"]["bytes_added_packed"])')
  printf '%-22s %10s %12.1f %9.0f %16.1f\n' "$1/$2/$3" "$secs" "$(echo "$stored / 1000000" | bc -l)" "$(echo "$rss / 1024" | bc -l)" "$(echo "$added / 1000000" | bc -l)"
done
rm -rf "$work"
