#!/usr/bin/env bash
# bench.sh [IMAGE...] — flatfs against plain-tool floors and peers, measured in the same run.
#
# IMAGE: debian (from ../shared/tools/make-images.sh), synthetic (scripts/make-synthetic.py:
# 200k small files, a second layer whiting out and rewriting 10%), big (scripts/make-big.sh:
# debian plus a real `apt-get install` of a build tool chain, ~800 MB of tar, ~30k entries, and a
# layer of whiteouts), manylayers (scripts/make-manylayers.py: 100 layers, each touching 1-2% of
# a 50k-entry tree; its "first mount" row is the issue-15 merge + mount row), million
# (scripts/make-million.py: 1M empty files; only table 15's memory row), or a path to an OCI
# layout directory with tag latest. Default: debian synthetic. Images are built once into $BENCH_DIR (default target/bench). Prints, per image and
# job, flatfs's time, the baseline's, the ratio (flatfs / baseline) and flatfs's peak RSS.
# Then, if ratarmount is installed, a second table with the mounting peer: ratarmount union-mounting
# the layer blobs (it ignores whiteouts), its time against the same baselines, and its peak RSS.
# With docker-registry and skopeo installed, a row per image for `export docker://…` from a
# registry on 127.0.0.1 (started here, storage under $TMP) against `skopeo copy` to a layout plus
# `flatfs export` of that; REGISTRY=none skips it.
# Needs: hyperfine, pigz, zstd, umoci, fuse3, python3; optional: ratarmount, e.g.
#   python3 -m venv $BENCH_DIR/ratarmount-venv && $BENCH_DIR/ratarmount-venv/bin/pip install ratarmount
# Env: RUNS (default 3), FLATFS (binary; default target/release/flatfs, built if missing),
#      RATARMOUNT (binary; default $BENCH_DIR/ratarmount-venv/bin/ratarmount, else from PATH;
#      RATARMOUNT=none skips it).
# TABLES (default base): which tables to print, a list of
#   base  the rows above (exports, mounts, reads, --keep, registry export, ratarmount);
#   15    issue 15's targets: reads in any order through a fresh mount (every file in name order
#         and 400 random files) for the image and, for the images in VARIANTS (default "big
#         debian"), its directory-order gzip variant (merged tree re-tarred by GNU tar without
#         --sort, pigz), its single-frame zstd variant (`zstd -3` of the merged rootfs tar, one
#         thread, no --long; both built once into $BENCH_DIR/NAME.dirorder, NAME.zstd1) and
#         flatfs's own `export --compression zstd`, each against one decompression of its blob;
#         export to a file with a warm index and with an empty cache; first and warm mount; and,
#         for the image `million` (scripts/make-million.py: 1M empty files), peak RSS in B/entry;
#   14    issue 14's targets: the image pushed to the local registry as plain gzip (+ `flatfs
#         index push`) and as eStargz (`flatfs export --compression estargz`), each read through
#         scripts/delay-proxy.py (DELAY_MS=20 per request, RATE_MBS=50 shared) by a lazy
#         `flatfs mount docker://…` on a cold host (a fresh FLATFS_CACHE_DIR) against `skopeo
#         copy` + `flatfs mount` + the same reads; bytes fetched are counted at the proxy. Rows
#         print `n/a (...)` when this flatfs lacks `index push` or estargz export
#         (LAZY_WITHOUT_INDEX=1 measures the gzip rows without an index artifact anyway);
#   all   base 15 14.
# `bench.sh --prepare IMAGE...` only builds the images and their variants into $BENCH_DIR.
# BENCH_TIMEOUT (default 600): seconds one timed run may take; a row that hits it prints >N.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
RUNS=${RUNS:-3}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-600}
TABLES=" ${TABLES:-base} "
TABLES=${TABLES//,/ }
[ "$TABLES" != " all " ] || TABLES=" base 15 14 "
for t in $TABLES; do
  case $t in base|15|14) ;; *) echo "bench.sh: TABLES: unknown table $t (base, 15, 14, all)" >&2; exit 2 ;; esac
done
table() { [[ $TABLES == *" $1 "* ]]; }
VARIANTS=" ${VARIANTS:-big debian} "
mkdir -p "$BENCH_DIR"
if [ -z "${FLATFS:-}" ]; then
  cargo build --release --quiet
  FLATFS=$ROOT/target/release/flatfs
fi
for tool in hyperfine pigz zstd umoci python3 fusermount3; do
  command -v "$tool" >/dev/null || { echo "bench.sh: needs $tool (apt-get install hyperfine pigz zstd umoci fuse3)" >&2; exit 1; }
done
PREPARE=
[ "${1:-}" != --prepare ] || { PREPARE=1; shift; }
IMAGES=("$@")
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(debian synthetic)
# ratarmount is optional (a peer, not a floor): find it, or say why its rows are missing.
RATARMOUNT=${RATARMOUNT:-}
if [ -z "$RATARMOUNT" ]; then
  if [ -x "$BENCH_DIR/ratarmount-venv/bin/ratarmount" ]; then RATARMOUNT=$BENCH_DIR/ratarmount-venv/bin/ratarmount
  else RATARMOUNT=$(command -v ratarmount || true); fi
fi
RM_SKIP=
if [ "$RATARMOUNT" = none ]; then RM_SKIP="RATARMOUNT=none"
elif [ -z "$RATARMOUNT" ] || ! "$RATARMOUNT" --version >/dev/null 2>&1; then
  RM_SKIP="ratarmount not installed (python3 -m venv $BENCH_DIR/ratarmount-venv && $BENCH_DIR/ratarmount-venv/bin/pip install ratarmount)"
fi
[ -z "$RM_SKIP" ] || echo "bench.sh: ratarmount rows will be skipped: $RM_SKIP" >&2
export FLATFS_CACHE_DIR="$BENCH_DIR/cache"
TMP=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
MNT=$TMP/mnt
RMNT=$TMP/rmnt      # ratarmount's mount point
RIDX=$TMP/rindex    # ratarmount's index folder: kept out of the OCI layout's blobs/ directory
RM_LOG=$BENCH_DIR/ratarmount.log   # outside $TMP, so a failed mount can still be read afterwards
RM_PID=             # a ratarmount running in the foreground (peak RSS measurement), if any
mkdir -p "$MNT" "$RMNT" "$RIDX"
# Leave no mount behind, on success, error or Ctrl-C: a stale FUSE mount under $TMP would also
# stop rm -rf. -z (lazy) if a reader still holds the mount; --one-file-system in case both fail.
cleanup() {
  local m
  for m in "$MNT" "$RMNT"; do
    fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
  done
  if [ -n "${PROXY_PID:-}" ]; then
    kill "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
  fi
  if [ -n "${REG_PID:-}" ]; then
    kill "$REG_PID" 2>/dev/null || true
    wait "$REG_PID" 2>/dev/null || true
  fi
  if [ -n "$RM_PID" ]; then   # still indexing, so not mounted yet: stop it
    kill "$RM_PID" 2>/dev/null || true
    wait "$RM_PID" 2>/dev/null || true
  fi
  rm -rf --one-file-system "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

layout_of() {
  case "$1" in
    debian)
      [ -d "$BENCH_DIR/debian" ] || ../shared/tools/make-images.sh "$BENCH_DIR" debian >&2
      echo "$BENCH_DIR/debian" ;;
    synthetic)
      [ -d "$BENCH_DIR/synthetic" ] || python3 scripts/make-synthetic.py "$BENCH_DIR" >&2
      echo "$BENCH_DIR/synthetic" ;;
    manylayers)
      [ -d "$BENCH_DIR/manylayers" ] || python3 scripts/make-manylayers.py "$BENCH_DIR" >&2
      echo "$BENCH_DIR/manylayers" ;;
    million)
      [ -d "$BENCH_DIR/million" ] || python3 scripts/make-million.py "$BENCH_DIR" >&2
      echo "$BENCH_DIR/million" ;;
    big)   # built on top of the debian image
      if [ ! -d "$BENCH_DIR/big" ]; then
        layout_of debian >/dev/null
        scripts/make-big.sh "$BENCH_DIR" >&2
      fi
      echo "$BENCH_DIR/big" ;;
    *)
      [ -f "$1/index.json" ] || { echo "bench.sh: $1 is neither debian, synthetic, manylayers, big, million nor an OCI layout" >&2; exit 1; }
      echo "$1" ;;
  esac
}

# Mean seconds of a command over $RUNS runs (after $WARMUP warm-ups, default 1); $2, if given,
# runs before each. A run that takes over $BENCH_TIMEOUT s is stopped and the mean printed as
# ">$BENCH_TIMEOUT"; a command that fails prints "failed" (and why, on stderr) instead of ending
# the whole benchmark.
mean() {
  local prep=()
  [ -n "${2:-}" ] && prep=(--prepare "$2")
  if ! hyperfine -N -i --warmup "${WARMUP:-1}" --runs "$RUNS" "${prep[@]}" --export-json "$TMP/h.json" \
      "timeout $BENCH_TIMEOUT $1" >"$TMP/h.out" 2>&1; then
    echo "bench.sh: failed to time: $1" >&2; tail -3 "$TMP/h.out" >&2; echo failed; return
  fi
  python3 - "$TMP/h.json" "$BENCH_TIMEOUT" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
codes = [c for c in r.get("exit_codes", []) if c]
if 124 in codes:
    print(">" + sys.argv[2])
elif codes:
    print("bench.sh: exit status %s from: %s" % (codes[0], sys.argv[3]), file=sys.stderr)
    print("failed")
else:
    print("%.3f" % r["mean"])
PY
}
rss_mib() { /usr/bin/time -f %M sh -c "$1" 2>&1 >/dev/null | tail -1 | awk '{printf "%.0f", $1/1024}'; }
# RSS (MiB) of the flatfs server of our own mount: other flatfs processes may run on the machine.
flatfs_rss() { ps -o rss= -p "$(pgrep -f -- "mount .* $MNT\$" | head -1)" | awk '{printf "%.0f", $1/1024}'; }
row() { printf '%-17s %-60s %8s %8s %7s %8s\n' "$@"; }

# flatfs / baseline; ">" if flatfs's time is a lower bound (timed out), "-" if either is missing.
ratio() {
  python3 - "$1" "$2" <<'PY'
import sys
a, b = sys.argv[1:]
try:
    r = float(a.lstrip(">")) / float(b)
    print((">" if a.startswith(">") else "") + "%.2f" % r)
except (ValueError, ZeroDivisionError):
    print("-")
PY
}

# ratarmount (the mounting peer) on the layer blobs $blobs of image $name, against the decompression
# floor $dec. Its rows are kept in RM_ROWS and printed as a table of their own after flatfs's.
# Fair use: all layer blobs given in order so it union-mounts them (later layers win; it does not
# apply whiteouts), -P 0 lets its gzip decoder use every core as pigz and flatfs do, the index goes
# to $RIDX, and the mount is timed up to its return (it daemonizes once mounted) plus the unmount.
RM_ROWS=()
rm_row() { RM_ROWS+=("$(row "$@")"); }
ratarmount_rows() {
  local rm="$RATARMOUNT -P 0 --index-folders $RIDX $blobs $RMNT >>$RM_LOG 2>&1" t rss pid
  echo "=== $(date -u +%FT%TZ) $name" >> "$RM_LOG"
  t=$(mean "sh -c '$rm && fusermount3 -u $RMNT'" "sh -c 'rm -rf $RIDX && mkdir $RIDX'")
  ratarmount_index_rss
  rm_row "$name" "mount, empty index / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "$RSS"
  # The index now exists (last run above).
  t=$(mean "sh -c '$rm && fusermount3 -u $RMNT'")
  rm_row "$name" "remount with its index" "$t" "-" "-" "-"
  # As flatfs's row: a fresh mount before the run, read through a pipe. It takes minutes on the
  # bigger images, so one run (no warm-up) is enough to see the ratio.
  t=$(WARMUP=0 RUNS=1 mean "sh -c 'tar -cf - -C $RMNT . | cat > /dev/null'" \
    "sh -c 'fusermount3 -u $RMNT 2>/dev/null; $rm'")
  # Peak RSS of the daemon that served the read (its index loaded, every file read).
  pid=$(pgrep -f -- " $RMNT\$" | head -1 || true)
  rss=$( [ -n "$pid" ] && awk '/^VmHWM/ {printf "%.0f", $2/1024}' "/proc/$pid/status" || echo "?")
  rm_row "$name" "read every file via fresh mount / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "$rss"
  fusermount3 -u "$RMNT"
}
# Peak RSS (MiB) of ratarmount building its index: run in the foreground (no daemon fork, so
# VmHWM covers the indexing), read VmHWM once mounted, unmount. Sets RSS.
ratarmount_index_rss() {
  rm -rf "$RIDX" && mkdir "$RIDX"
  # shellcheck disable=SC2086  # $blobs is a list of paths without spaces
  "$RATARMOUNT" -f -P 0 --index-folders "$RIDX" $blobs "$RMNT" >>"$RM_LOG" 2>&1 &
  RM_PID=$!
  until mountpoint -q "$RMNT"; do
    kill -0 "$RM_PID" 2>/dev/null || { echo "bench.sh: ratarmount did not mount, see $RM_LOG" >&2; exit 1; }
    sleep 0.2
  done
  RSS=$(awk '/^VmHWM/ {printf "%.0f", $2/1024}' "/proc/$RM_PID/status")
  fusermount3 -u "$RMNT"
  wait "$RM_PID"
  RM_PID=
}

# A registry of our own on a free port, for the pull rows (skipped, and said so, without one).
REG=
REG_PID=
if [ "${REGISTRY:-}" != none ] && command -v docker-registry >/dev/null && command -v skopeo >/dev/null; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$TMP/registry" "$port" > "$TMP/registry.yml"
  docker-registry serve "$TMP/registry.yml" >"$TMP/registry.log" 2>&1 &
  REG_PID=$!
  for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break
    sleep 0.1
  done
  REG=127.0.0.1:$port
else
  echo "bench.sh: registry rows will be skipped (REGISTRY=none, or no docker-registry/skopeo)" >&2
fi
# Issue 14's network: scripts/delay-proxy.py in front of that registry, logging each response's
# body bytes to $PROXY_LOG (so a command's bytes are the sum of the lines it added).
PROXY=
PROXY_PID=
PROXY_LOG=$TMP/proxy.log
if table 14 && [ -n "$REG" ]; then
  python3 scripts/delay-proxy.py "${REG#*:}" "$PROXY_LOG" --delay-ms "${DELAY_MS:-20}" \
    --rate-mbs "${RATE_MBS:-50}" --port-file "$TMP/proxy.port" >/dev/null 2>"$TMP/proxy.err" &
  PROXY_PID=$!
  for _ in $(seq 300); do [ -s "$TMP/proxy.port" ] && break; sleep 0.1; done
  [ -s "$TMP/proxy.port" ] || { echo "bench.sh: delay-proxy.py did not start:" >&2; cat "$TMP/proxy.err" >&2; exit 1; }
  PROXY=127.0.0.1:$(cat "$TMP/proxy.port")
fi
# Index push and eStargz export are being added (issue 14): their rows say so when missing.
HAVE_INDEX_PUSH=
"$FLATFS" index --help 2>/dev/null | grep -qw push && HAVE_INDEX_PUSH=1
HAVE_ESTARGZ=
"$FLATFS" export --help 2>/dev/null | grep -qw estargz && HAVE_ESTARGZ=1
# export from the registry (download, hash, inflate and index overlapping) against skopeo copy to
# a layout, then flatfs export of that: the same bytes travel, want <= 0.7.
registry_row() {
  local ref=docker://$REG/bench/$name:latest
  skopeo copy -q --dest-tls-verify=false "oci:$layout:latest" "$ref"
  local t base
  t=$(mean "$FLATFS export $ref --tls-verify=false -o $TMP/out.tar --format oci-archive --no-cache -q")
  base=$(mean "sh -c 'rm -rf $TMP/pulled && skopeo copy -q --src-tls-verify=false $ref oci:$TMP/pulled:latest && $FLATFS export $TMP/pulled:latest -o $TMP/out.tar --format oci-archive --no-cache -q'")
  row "$name" "export docker:// / skopeo copy + export (<= 0.7)" "$t" "$base" "$(ratio "$t" "$base")" \
    "$(rss_mib "$FLATFS export $ref --tls-verify=false -o $TMP/out.tar --format oci-archive --no-cache -q")"
}

# The worst case for random access: the last non-empty regular file (in tar order) of the
# largest layer of image $1 (layout $2, manifest digest $3), where no later layer replaces it.
last_file() {
  "$FLATFS" ls -R --layer "$1" > "$TMP/layers.txt"
  python3 - "$2" "$3" "$TMP/layers.txt" <<'PY'
import json, subprocess, sys, tarfile
layout, manifest, listing = sys.argv[1:]
blobs = layout + "/blobs/sha256/"
layers = json.load(open(blobs + manifest))["layers"]
k = max(range(len(layers)), key=lambda i: layers[i]["size"])
origin = {}
for line in open(listing, encoding="utf-8", errors="surrogateescape"):
    number, _, path = line.strip().partition(" ")
    if number.isdigit():  # "-" for directories no layer describes
        origin[path] = int(number)
files = []
# Decompressed by pigz or zstd: Python's gzip takes many minutes over the thousands of members
# of an eStargz layer.
blob = blobs + layers[k]["digest"][7:]
with open(blob, "rb") as f:
    zstd = f.read(4) == b"\x28\xb5\x2f\xfd"
dec = subprocess.Popen(["zstd" if zstd else "pigz", "-dc", blob], stdout=subprocess.PIPE)
try:
    with tarfile.open(fileobj=dec.stdout, mode="r|") as tar:
        files = [m.name for m in tar if m.isreg() and m.size > 0]
except tarfile.TarError:
    pass
dec.stdout.close()
dec.wait()
for name in reversed(files):
    name = name.lstrip("/").removeprefix("./")
    if origin.get(name) == k + 1 and not any(c.isspace() or c in "'\"\\$`" for c in name):
        print(name)
        break
PY
}

# 400 regular files of image $1 in a random (seeded) order, to file $2.
random400() {
  "$FLATFS" ls -R -l "$1" > "$TMP/long.txt"
  python3 - "$TMP/long.txt" > "$2" <<'PY'
import random, sys
files = []
for line in open(sys.argv[1], encoding="utf-8", errors="surrogateescape"):
    parts = line.rstrip("\n").split(None, 7)  # mode links uid gid size date time path
    if len(parts) == 8 and parts[0].startswith("-") \
            and not any(c.isspace() or c in "'\"\\$`" for c in parts[7]):
        files.append(parts[7])
random.seed(15)
print("\n".join(random.sample(files, min(400, len(files)))))
PY
}

# The rows of the base table for image $name (layout $layout, image $img, floor $dec).
base_rows() {
  "$FLATFS" export "$img" -o "$TMP/merged.tar" --format rootfs 2>/dev/null
  gz=$(mean "sh -c 'pigz -6 -c $TMP/merged.tar > /dev/null'")
  zs=$(mean "zstd -3 -T0 -q -c $TMP/merged.tar -o /dev/null")

  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format rootfs --no-cache -q")
  row "$name" "export rootfs (uncompressed) / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "$(rss_mib "$FLATFS export $img -o $TMP/out.tar --format rootfs --no-cache -q")"
  base=$(python3 -c "print('%.3f' % ($dec + $gz))")
  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format oci-archive --compression gzip --no-cache -q")
  row "$name" "export gzip / pigz -dc + pigz -6" "$t" "$base" "$(ratio "$t" "$base")" "-"
  base=$(python3 -c "print('%.3f' % ($dec + $zs))")
  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format oci-archive --compression zstd --no-cache -q")
  row "$name" "export zstd / pigz -dc + zstd -3 -T0" "$t" "$base" "$(ratio "$t" "$base")" "-"
  # umoci takes minutes on 200k files: one run is enough to see the ratio.
  peer=$(RUNS=1 mean "sh -c 'rm -rf $TMP/bundle && umoci unpack --image $img $TMP/bundle >/dev/null && tar -cf - -C $TMP/bundle/rootfs . | cat >/dev/null'")
  t=$(mean "sh -c '$FLATFS export $img -o - --format rootfs --no-cache -q > /dev/null'")
  row "$name" "export rootfs / umoci unpack + tar (want <= 0.2)" "$t" "$peer" "$(ratio "$t" "$peer")" "-"
  [ -z "$REG" ] || registry_row

  # Partial squash: keep the base layers (big: debian's 3; others: the first), squash the rest;
  # against the full squash, same compression, same run. Then the same with the layer indexes
  # in the cache, where the kept layers are not decompressed at all; and the sizes.
  keep=$(case "$name" in big) echo 3 ;; *) echo 1 ;; esac)
  full=$(mean "$FLATFS export $img -o $TMP/full.tar --format oci-archive --compression gzip --no-cache -q")
  t=$(mean "sh -c 'rm -rf $TMP/keep && $FLATFS export $img -o $TMP/keep --format oci --keep $keep --no-cache -q'")
  row "$name" "export --keep $keep / full squash (gzip)" "$t" "$full" "$(ratio "$t" "$full")" "-"
  rm -rf "$FLATFS_CACHE_DIR"; "$FLATFS" -q inspect "$img" >/dev/null
  t=$(mean "sh -c 'rm -rf $TMP/keep && $FLATFS export $img -o $TMP/keep --format oci --keep $keep -q'")
  row "$name" "export --keep $keep, indexes cached / full squash" "$t" "$full" "$(ratio "$t" "$full")" "-"
  mib() { python3 -c "import os,sys; print('%.1f' % (sum(os.path.getsize(f) for f in sys.argv[1:]) / 1048576))" "$@"; }
  new_layer=$(python3 -c 'import json,sys; d=sys.argv[1]; i=json.load(open(d+"/index.json")); m=json.load(open(d+"/blobs/sha256/"+i["manifests"][0]["digest"][7:])); print(d+"/blobs/sha256/"+m["layers"][-1]["digest"][7:])' "$TMP/keep")
  ksize=$(mib "$TMP"/keep/blobs/sha256/*); fsize=$(mib "$TMP/full.tar"); nsize=$(mib "$new_layer")
  row "$name" "MiB: --keep $keep output / full squash output" "$ksize" "$fsize" "$(ratio "$ksize" "$fsize")" "-"
  row "$name" "MiB: --keep $keep new layer (to push) / full" "$nsize" "$fsize" "$(ratio "$nsize" "$fsize")" "-"

  t=$(mean "sh -c '$FLATFS mount --no-cache $img $MNT && fusermount3 -u $MNT'")
  row "$name" "first mount (no cache) / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "-"
  rm -rf "$FLATFS_CACHE_DIR"
  "$FLATFS" mount "$img" "$MNT" && fusermount3 -u "$MNT"
  t=$(mean "sh -c '$FLATFS mount $img $MNT && fusermount3 -u $MNT'")
  row "$name" "mount with warm cache (want <= 0.100 s)" "$t" "-" "-" "-"
  # The worst case for random access: right after a mount, the last non-empty regular file
  # (in tar order) of the largest layer, where no later layer replaces it.
  last=$(last_file "$img" "$layout" "$manifest")
  if [ -n "$last" ]; then
    echo "bench.sh: $name: the first read is of /$last" >&2
    t=$(mean "cat $MNT/$last" "sh -c 'fusermount3 -u $MNT 2>/dev/null; $FLATFS mount $img $MNT'")
    row "$name" "first read, end of largest layer (<= 0.030 s)" "$t" "-" "-" "-"
    fusermount3 -u "$MNT"
  fi
  # 400 regular files in a random (seeded) order through a fresh mount, against one
  # decompression of the blobs: any read order should cost about one pass (issue 15).
  random400 "$img" "$TMP/random400.txt"
  t=$(mean "sh -c 'cd $MNT && xargs cat < $TMP/random400.txt > /dev/null'" \
    "sh -c 'fusermount3 -u $MNT 2>/dev/null; $FLATFS mount $img $MNT'")
  row "$name" "read 400 random files, fresh mount / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "-"
  fusermount3 -u "$MNT"
  # A fresh mount (index from the warm cache) before each run, so no file is in the page cache.
  # Through a pipe: GNU tar skips reading files when its output is /dev/null itself.
  t=$(mean "sh -c 'tar -cf - -C $MNT . | cat > /dev/null'" \
    "sh -c 'fusermount3 -u $MNT 2>/dev/null; $FLATFS mount $img $MNT'")
  row "$name" "read every file via fresh mount / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "$(flatfs_rss)"
  fusermount3 -u "$MNT"

  [ -n "$RM_SKIP" ] || ratarmount_rows
}

# Reads through a fresh mount of image $1 (its index already cached) against the floor $2 (label
# $3: how the floor decompresses), image column $4: warm mount, 400 random files, every file.
read_rows() {
  local ref=$1 floor=$2 how=$3 label=$4 t prep
  prep="sh -c 'fusermount3 -u $MNT 2>/dev/null; $FLATFS mount $ref $MNT'"
  "$FLATFS" -q mount "$ref" "$MNT" && fusermount3 -u "$MNT"   # index and tree now cached
  t=$(mean "sh -c '$FLATFS mount $ref $MNT && fusermount3 -u $MNT'")
  row "$label" "mount with warm cache (<= 0.020 s)" "$t" "-" "-" "-"
  random400 "$ref" "$TMP/random400.txt"
  # No warm-up: the fresh mount before each run is what makes it cold, and a single-frame zstd
  # layer may take minutes.
  t=$(WARMUP=0 mean "sh -c 'cd $MNT && xargs cat < $TMP/random400.txt > /dev/null'" "$prep")
  row "$label" "read 400 random files, fresh mount / $how (<= 1)" "$t" "$floor" "$(ratio "$t" "$floor")" "-"
  fusermount3 -u "$MNT" 2>/dev/null || true
  # Through a pipe: GNU tar skips reading files when its output is /dev/null itself.
  t=$(WARMUP=0 mean "sh -c 'tar -cf - -C $MNT . | cat > /dev/null'" "$prep")
  row "$label" "read every file, fresh mount / $how (<= ${5:-1.5})" "$t" "$floor" \
    "$(ratio "$t" "$floor")" "$(flatfs_rss 2>/dev/null || echo -)"
  fusermount3 -u "$MNT" 2>/dev/null || true
}

# Issue 15's variants of image $name, built once into $BENCH_DIR: NAME.dirorder (the merged tree
# extracted, then re-tarred by GNU tar without --sort, so in the file system's directory order,
# gzip) and NAME.zstd1 (the merged rootfs tar as one zstd frame).
variant_layouts() {
  local w=$BENCH_DIR/.variant-work
  [ ! -d "$BENCH_DIR/$name.dirorder" ] || [ ! -d "$BENCH_DIR/$name.zstd1" ] || return 0
  echo "bench.sh: building $BENCH_DIR/$name.dirorder and $name.zstd1" >&2
  rm -rf --one-file-system "$w" && mkdir -p "$w/rootfs"
  "$FLATFS" -q export "$img" -o "$w/merged.tar" --format rootfs
  tar --numeric-owner --xattrs --xattrs-include='*' -xpf "$w/merged.tar" -C "$w/rootfs"
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$w/rootfs" -cf "$w/dirorder.tar" .
  python3 scripts/make-variant.py "$w/dirorder.tar" "$BENCH_DIR/$name.dirorder" gzip
  python3 scripts/make-variant.py "$w/merged.tar" "$BENCH_DIR/$name.zstd1" zstd
  rm -rf --one-file-system "$w"
}
# The one layer blob of one-layer layout $1.
only_blob() {
  python3 -c 'import json,sys; d=sys.argv[1]; i=json.load(open(d+"/index.json")); m=json.load(open(d+"/blobs/sha256/"+i["manifests"][0]["digest"][7:])); print(d+"/blobs/sha256/"+m["layers"][-1]["digest"][7:])' "$1"
}

# Peak RSS merging the `million` image (1M empty files, 1000 directories), as bytes per entry
# above a one-file image's, by export (the mount's merge is the same code).
million_row() {
  local big one n
  n=$(pigz -dc "$blobs" | tar -tf - | wc -l)
  one=$(/usr/bin/time -f %M sh -c "$FLATFS export $BENCH_DIR/million-1:latest -o - --format rootfs --no-cache -q > /dev/null" 2>&1 | tail -1)
  big=$(/usr/bin/time -f %M sh -c "$FLATFS export $img -o - --format rootfs --no-cache -q > /dev/null" 2>&1 | tail -1)
  row "$name" "peak RSS merging, B/entry (<= 150 + 14 B of names)" \
    "$(python3 -c "print('%.0f' % (($big - $one) * 1024 / $n))")" "-" "-" "$((big / 1024))"
}

# Issue 15's table for image $name.
t15_rows() {
  local t v vl vblob vdec how target
  # Export to a file: with an empty cache before each run, then with the index warm.
  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format rootfs -q" "rm -rf $FLATFS_CACHE_DIR")
  row "$name" "export rootfs to a file, empty cache / pigz -dc (<= 1.0)" "$t" "$dec" "$(ratio "$t" "$dec")" "-"
  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format rootfs -q")
  row "$name" "export rootfs to a file, warm index / pigz -dc (<= 0.5)" "$t" "$dec" "$(ratio "$t" "$dec")" "-"
  # The same two without the cost of writing ~1 GB to disk, which pigz -dc > /dev/null does not
  # pay: to stdout into /dev/null, and against pigz -dc writing the same file.
  t=$(mean "sh -c '$FLATFS export $img -o - --format rootfs -q > /dev/null'")
  row "$name" "export rootfs to /dev/null, warm index / pigz -dc (<= 0.5)" "$t" "$dec" "$(ratio "$t" "$dec")" "-"
  local decf
  decf=$(mean "sh -c 'pigz -dc $blobs > $TMP/out.tar'")
  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format rootfs -q" "rm -rf $FLATFS_CACHE_DIR")
  row "$name" "export to a file, empty cache / pigz -dc > file (<= 1.0)" "$t" "$decf" "$(ratio "$t" "$decf")" "-"
  t=$(mean "sh -c '$FLATFS mount --no-cache $img $MNT && fusermount3 -u $MNT'")
  row "$name" "merge + mount, no cache / pigz -dc (manylayers: <= 1.2)" "$t" "$dec" "$(ratio "$t" "$dec")" "-"
  read_rows "$img" "$dec" "pigz -dc" "$name"
  [[ $VARIANTS == *" $name "* ]] || return 0
  variant_layouts
  rm -rf "$TMP/ownzstd"
  "$FLATFS" -q export "$img" -o "$TMP/ownzstd" --format oci --compression zstd
  for v in dirorder zstd1 ownzstd; do
    case $v in
      dirorder) vl=$BENCH_DIR/$name.dirorder how="pigz -dc" target=1.5 ;;
      zstd1) vl=$BENCH_DIR/$name.zstd1 how="zstd -dc" target=1.5 ;;
      ownzstd) vl=$TMP/ownzstd how="zstd -dc" target=1.2 ;;
    esac
    vblob=$(only_blob "$vl")
    vdec=$(mean "sh -c '${how% -dc} -dc $vblob > /dev/null'")
    # The flatfs export's tag is the input's (latest): one manifest, so the layout alone names it.
    read_rows "$vl" "$vdec" "$how" "$name.$v" "$target"
  done
}
# Body bytes the proxy has served since line $1 of its log, of requests whose path matches $2.
proxy_mark() { sleep 0.3; wc -l < "$PROXY_LOG"; }
proxy_bytes() {
  sleep 0.3   # a request cut short by an unmount is logged as it ends
  tail -n +$(($1 + 1)) "$PROXY_LOG" | awk -v re="${2:-.}" '$2 ~ re {s += $4} END {printf "%d", s}'
}
# The layer digests of layout $1 (one manifest) as an awk regex.
layer_re() {
  python3 -c 'import json,sys; d=sys.argv[1]; i=json.load(open(d+"/index.json")); m=json.load(open(d+"/blobs/sha256/"+i["manifests"][0]["digest"][7:])); print("|".join(l["digest"] for l in m["layers"]))' "$1"
}
# Bytes of the manifest's config and layers of layout $1 (one manifest): what a pull moves.
image_bytes() {
  python3 -c 'import json,sys; d=sys.argv[1]; i=json.load(open(d+"/index.json")); m=json.load(open(d+"/blobs/sha256/"+i["manifests"][0]["digest"][7:])); print(m["config"]["size"] + sum(l["size"] for l in m["layers"]))' "$1"
}
mb() { python3 -c "print('%.1f' % ($1 / 1e6))"; }

# Issue 14's rows for the image pushed as tag $1 (of bench/$name), whose local layout is $2,
# reached through the delaying proxy; $3, if set, is why they cannot be measured.
lazy_rows() {
  local tag=$1 src=$2 why=${3:-} label="$name:$1" ref t base m bytes size host=$TMP/host
  local j
  if [ -n "$why" ]; then
    for j in "mount + read end of largest layer / skopeo+mount+read (<= 0.05)" \
      "MB fetched for that, all requests / image MB (<= 0.02)" "  of which layer blobs / image MB" \
      "lazy mount, cold host (<= 0.5 s)" \
      "read every file, lazy / skopeo copy + mount + read (<= 1.2)" \
      "second mount, same host (<= 0.050 s)" "blob bytes fetched by a second mount (want 0)"; do
      row "$label" "$j" "n/a ($why)" "-" "-" "-"
    done
    return
  fi
  ref=docker://$PROXY/bench/$name:$tag
  local lazy="FLATFS_CACHE_DIR=$host $FLATFS mount -q --tls-verify=false $ref $MNT"
  local pull="rm -rf $TMP/pulled && skopeo copy -q --src-tls-verify=false $ref oci:$TMP/pulled:latest && FLATFS_CACHE_DIR=$host $FLATFS mount -q $TMP/pulled:latest $MNT"
  local cold="sh -c 'fusermount3 -u $MNT 2>/dev/null; rm -rf $host'"
  local readall="tar -cf - -C $MNT . | cat > /dev/null"
  # A cold host for every run (fresh cache dir), no warm-up: what a new host pays.
  t=$(WARMUP=0 mean "sh -c '$lazy && cat $MNT/$last > /dev/null && fusermount3 -u $MNT'" "$cold")
  base=$(WARMUP=0 mean "sh -c '$pull && cat $MNT/$last > /dev/null && fusermount3 -u $MNT'" "$cold")
  row "$label" "mount + read end of largest layer / skopeo+mount+read (<= 0.05)" "$t" "$base" "$(ratio "$t" "$base")" "-"
  fusermount3 -u "$MNT" 2>/dev/null || true; rm -rf "$host"
  m=$(proxy_mark)
  sh -c "$lazy && cat $MNT/$last > /dev/null && fusermount3 -u $MNT" || true
  bytes=$(proxy_bytes "$m"); size=$(image_bytes "$src")
  row "$label" "MB fetched for that, all requests / image MB (<= 0.02)" "$(mb "$bytes")" "$(mb "$size")" "$(ratio "$bytes" "$size")" "-"
  bytes=$(proxy_bytes "$m" "$(layer_re "$src")")
  row "$label" "  of which layer blobs / image MB" "$(mb "$bytes")" "$(mb "$size")" "$(ratio "$bytes" "$size")" "-"
  t=$(WARMUP=0 mean "sh -c '$lazy && fusermount3 -u $MNT'" "$cold")
  row "$label" "lazy mount, cold host (<= 0.5 s)" "$t" "-" "-" "-"
  t=$(WARMUP=0 mean "sh -c '$lazy && $readall && fusermount3 -u $MNT'" "$cold")
  base=$(WARMUP=0 mean "sh -c '$pull && $readall && fusermount3 -u $MNT'" "$cold")
  row "$label" "read every file, lazy / skopeo copy + mount + read (<= 1.2)" "$t" "$base" "$(ratio "$t" "$base")" "-"
  # The same host again: its cache holds the index (and whatever the first mount fetched).
  fusermount3 -u "$MNT" 2>/dev/null || true; rm -rf "$host"
  sh -c "$lazy && cat $MNT/$last > /dev/null && fusermount3 -u $MNT" || true
  t=$(mean "sh -c '$lazy && fusermount3 -u $MNT'")
  row "$label" "second mount, same host (<= 0.050 s)" "$t" "-" "-" "-"
  m=$(proxy_mark)
  sh -c "$lazy && fusermount3 -u $MNT" || true
  row "$label" "blob bytes fetched by a second mount (want 0)" "$(proxy_bytes "$m" /blobs/)" "-" "-" "-"
  rm -rf "$host"
}

# Issue 14's table for image $name: pushed as plain gzip (+ its index artifact) and as eStargz.
t14_rows() {
  [ -n "$PROXY" ] || { row "$name" "issue 14 rows" "n/a (no registry: REGISTRY=none, or no docker-registry/skopeo)" "-" "-" "-"; return; }
  local why=
  last=$(last_file "$img" "$layout" "$manifest")
  [ -n "$last" ] || { echo "bench.sh: $name: no file to read at the end of its largest layer" >&2; return; }
  echo "bench.sh: $name: the small file read is /$last" >&2
  skopeo copy -q --dest-tls-verify=false "oci:$layout:latest" "docker://$REG/bench/$name:gzip"
  if [ -n "$HAVE_INDEX_PUSH" ]; then
    # From the local copy (its indexes land in the bench's cache, not a measured host's).
    "$FLATFS" index push -q --tls-verify=false "$img" --to "docker://$REG/bench/$name:gzip" >&2 ||
      why="index push failed"
  elif [ -z "${LAZY_WITHOUT_INDEX:-}" ]; then
    why="no index push"
  fi
  lazy_rows gzip "$layout" "$why"
  why=
  if [ -n "$HAVE_ESTARGZ" ]; then
    rm -rf "$TMP/estargz"
    "$FLATFS" -q export "$img" -o "$TMP/estargz" --format oci --compression estargz &&
      skopeo copy -q --dest-tls-verify=false "oci:$TMP/estargz" "docker://$REG/bench/$name:estargz" ||
      why="estargz export or push failed"
    # Its one layer's last small file (a gzip stream, so tarfile reads it; landmarks and the TOC
    # are not in flatfs's listing), else the gzip image's.
    if [ -z "$why" ]; then
      local m el
      m=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]+"/index.json"))["manifests"][0]["digest"][7:])' "$TMP/estargz")
      el=$(last_file "$TMP/estargz" "$TMP/estargz" "$m" || true)
      [ -z "$el" ] || last=$el
      echo "bench.sh: $name: the small file read from the eStargz image is /$last" >&2
    fi
  else
    why="no estargz export"
  fi
  lazy_rows estargz "$TMP/estargz" "$why"
}
[ -n "$PREPARE" ] || row IMAGE JOB FLATFS BASELINE RATIO RSS_MiB
for name in "${IMAGES[@]}"; do
  layout=$(layout_of "$name")
  manifest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]+"/index.json"))["manifests"][0]["digest"][7:])' "$layout")
  blobs=$(python3 -c 'import json,sys; d=sys.argv[1]; m=json.load(open(d+"/blobs/sha256/"+sys.argv[2])); print(" ".join(d+"/blobs/sha256/"+l["digest"][7:] for l in m["layers"]))' "$layout" "$manifest")
  img="$layout:latest"
  if [ -n "$PREPARE" ]; then   # build the images (and table 15's variants) only
    [[ $VARIANTS != *" $name "* ]] || variant_layouts
    continue
  fi
  if [ "$name" = million ]; then   # only the merge-memory row of table 15 applies
    ! table 15 || million_row
    continue
  fi
  dec=$(mean "sh -c 'pigz -dc $blobs > /dev/null'")
  ! table base || base_rows
  ! table 15 || t15_rows
  ! table 14 || t14_rows
done
[ -z "$PREPARE" ] || exit 0

echo
if [ -n "$RM_SKIP" ]; then
  echo "ratarmount rows skipped: $RM_SKIP"
else
  echo "ratarmount $("$RATARMOUNT" --version 2>/dev/null | head -1 | awk '{print $2}'): union mount of the layer blobs (ignores whiteouts)"
  row IMAGE JOB RATARMNT BASELINE RATIO RSS_MiB
  printf '%s\n' "${RM_ROWS[@]}"
fi
