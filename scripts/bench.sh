#!/usr/bin/env bash
# bench.sh [IMAGE...] — flatfs against plain-tool floors and peers, measured in the same run.
#
# IMAGE: debian (from ../shared/tools/make-images.sh), synthetic (scripts/make-synthetic.py:
# 200k small files, a second layer whiting out and rewriting 10%), big (scripts/make-big.sh:
# debian plus a real `apt-get install` of a build tool chain, ~800 MB of tar, ~30k entries, and a
# layer of whiteouts), manylayers (scripts/make-manylayers.py: 100 layers, each touching 1-2% of
# a 50k-entry tree; its "first mount" row is the issue-15 merge + mount row), or a path to an
# OCI layout directory with tag latest. Default: debian
# synthetic. Images are built once into $BENCH_DIR (default target/bench). Prints, per image and
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
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
RUNS=${RUNS:-3}
mkdir -p "$BENCH_DIR"
if [ -z "${FLATFS:-}" ]; then
  cargo build --release --quiet
  FLATFS=$ROOT/target/release/flatfs
fi
for tool in hyperfine pigz zstd umoci python3 fusermount3; do
  command -v "$tool" >/dev/null || { echo "bench.sh: needs $tool (apt-get install hyperfine pigz zstd umoci fuse3)" >&2; exit 1; }
done
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
    big)   # built on top of the debian image
      if [ ! -d "$BENCH_DIR/big" ]; then
        layout_of debian >/dev/null
        scripts/make-big.sh "$BENCH_DIR" >&2
      fi
      echo "$BENCH_DIR/big" ;;
    *)
      [ -f "$1/index.json" ] || { echo "bench.sh: $1 is neither debian, synthetic, manylayers, big nor an OCI layout" >&2; exit 1; }
      echo "$1" ;;
  esac
}

# Mean seconds of a command over $RUNS runs (after $WARMUP warm-ups, default 1); $2, if given,
# runs before each.
mean() {
  local prep=()
  [ -n "${2:-}" ] && prep=(--prepare "$2")
  hyperfine -N --warmup "${WARMUP:-1}" --runs "$RUNS" "${prep[@]}" --export-json "$TMP/h.json" "$1" >/dev/null
  python3 -c 'import json,sys; print("%.3f" % json.load(open(sys.argv[1]))["results"][0]["mean"])' "$TMP/h.json"
}
rss_mib() { /usr/bin/time -f %M sh -c "$1" 2>&1 >/dev/null | tail -1 | awk '{printf "%.0f", $1/1024}'; }
# RSS (MiB) of the flatfs server of our own mount: other flatfs processes may run on the machine.
flatfs_rss() { ps -o rss= -p "$(pgrep -f -- "mount .* $MNT\$" | head -1)" | awk '{printf "%.0f", $1/1024}'; }
row() { printf '%-10s %-44s %8s %8s %7s %8s\n' "$@"; }

ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }

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

row IMAGE JOB FLATFS BASELINE RATIO RSS_MiB
for name in "${IMAGES[@]}"; do
  layout=$(layout_of "$name")
  manifest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]+"/index.json"))["manifests"][0]["digest"][7:])' "$layout")
  blobs=$(python3 -c 'import json,sys; d=sys.argv[1]; m=json.load(open(d+"/blobs/sha256/"+sys.argv[2])); print(" ".join(d+"/blobs/sha256/"+l["digest"][7:] for l in m["layers"]))' "$layout" "$manifest")
  img="$layout:latest"
  dec=$(mean "sh -c 'pigz -dc $blobs > /dev/null'")
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
  "$FLATFS" ls -R --layer "$img" > "$TMP/layers.txt"
  last=$(python3 - "$layout" "$manifest" "$TMP/layers.txt" <<'PY'
import json, sys, tarfile
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
try:
    with tarfile.open(blobs + layers[k]["digest"][7:], mode="r|*") as tar:
        files = [m.name for m in tar if m.isreg() and m.size > 0]
except tarfile.TarError:
    pass  # zstd, which tarfile cannot read: no row
for name in reversed(files):
    name = name.lstrip("/").removeprefix("./")
    if origin.get(name) == k + 1 and not any(c.isspace() or c in "'\"\\$`" for c in name):
        print(name)
        break
PY
)
  if [ -n "$last" ]; then
    echo "bench.sh: $name: the first read is of /$last" >&2
    t=$(mean "cat $MNT/$last" "sh -c 'fusermount3 -u $MNT 2>/dev/null; $FLATFS mount $img $MNT'")
    row "$name" "first read, end of largest layer (<= 0.030 s)" "$t" "-" "-" "-"
    fusermount3 -u "$MNT"
  fi
  # 400 regular files in a random (seeded) order through a fresh mount, against one
  # decompression of the blobs: any read order should cost about one pass (issue 15).
  "$FLATFS" ls -R -l "$img" > "$TMP/long.txt"
  python3 - "$TMP/long.txt" > "$TMP/random400.txt" <<'PY'
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
done

echo
if [ -n "$RM_SKIP" ]; then
  echo "ratarmount rows skipped: $RM_SKIP"
else
  echo "ratarmount $("$RATARMOUNT" --version 2>/dev/null | head -1 | awk '{print $2}'): union mount of the layer blobs (ignores whiteouts)"
  row IMAGE JOB RATARMNT BASELINE RATIO RSS_MiB
  printf '%s\n' "${RM_ROWS[@]}"
fi
