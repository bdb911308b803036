#!/usr/bin/env bash
# bench.sh [IMAGE...] — flatfs against plain-tool floors and peers, measured in the same run.
#
# IMAGE: debian (from ../shared/tools/make-images.sh), synthetic (scripts/make-synthetic.py:
# 200k small files, a second layer whiting out and rewriting 10%), or a path to an OCI layout
# directory with tag latest. Default: debian synthetic. Images are built once into $BENCH_DIR
# (default target/bench). Prints, per image and job, flatfs's time, the baseline's, the ratio
# (flatfs / baseline) and flatfs's peak RSS. Needs: hyperfine, pigz, zstd, umoci, fuse3, python3.
# Env: RUNS (default 3), FLATFS (binary; default target/release/flatfs, built if missing).
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
export FLATFS_CACHE_DIR="$BENCH_DIR/cache"
TMP=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
MNT=$TMP/mnt
mkdir -p "$MNT"
cleanup() { fusermount3 -u "$MNT" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

layout_of() {
  case "$1" in
    debian)
      [ -d "$BENCH_DIR/debian" ] || ../shared/tools/make-images.sh "$BENCH_DIR" debian >&2
      echo "$BENCH_DIR/debian" ;;
    synthetic)
      [ -d "$BENCH_DIR/synthetic" ] || python3 scripts/make-synthetic.py "$BENCH_DIR" >&2
      echo "$BENCH_DIR/synthetic" ;;
    *) echo "$1" ;;
  esac
}

# Mean seconds of a command over $RUNS runs (after one warm-up); $2, if given, runs before each.
mean() {
  local prep=()
  [ -n "${2:-}" ] && prep=(--prepare "$2")
  hyperfine -N --warmup 1 --runs "$RUNS" "${prep[@]}" --export-json "$TMP/h.json" "$1" >/dev/null
  python3 -c 'import json,sys; print("%.3f" % json.load(open(sys.argv[1]))["results"][0]["mean"])' "$TMP/h.json"
}
rss_mib() { /usr/bin/time -f %M sh -c "$1" 2>&1 >/dev/null | tail -1 | awk '{printf "%.0f", $1/1024}'; }
row() { printf '%-10s %-44s %8s %8s %7s %8s\n' "$@"; }

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
  ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }

  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format rootfs --no-cache -q")
  row "$name" "export rootfs (uncompressed) / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "$(rss_mib "$FLATFS export $img -o $TMP/out.tar --format rootfs --no-cache -q")"
  base=$(python3 -c "print($dec + $gz)")
  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format oci-archive --compression gzip --no-cache -q")
  row "$name" "export gzip / pigz -dc + pigz -6" "$t" "$base" "$(ratio "$t" "$base")" "-"
  base=$(python3 -c "print($dec + $zs)")
  t=$(mean "$FLATFS export $img -o $TMP/out.tar --format oci-archive --compression zstd --no-cache -q")
  row "$name" "export zstd / pigz -dc + zstd -3 -T0" "$t" "$base" "$(ratio "$t" "$base")" "-"
  # umoci takes minutes on 200k files: one run is enough to see the ratio.
  peer=$(RUNS=1 mean "sh -c 'rm -rf $TMP/bundle && umoci unpack --image $img $TMP/bundle >/dev/null && tar -cf - -C $TMP/bundle/rootfs . | cat >/dev/null'")
  t=$(mean "sh -c '$FLATFS export $img -o - --format rootfs --no-cache -q > /dev/null'")
  row "$name" "export rootfs / umoci unpack + tar (want <= 0.2)" "$t" "$peer" "$(ratio "$t" "$peer")" "-"

  t=$(mean "sh -c '$FLATFS mount --no-cache $img $MNT && fusermount3 -u $MNT'")
  row "$name" "first mount (no cache) / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "-"
  rm -rf "$FLATFS_CACHE_DIR"
  "$FLATFS" mount "$img" "$MNT" && fusermount3 -u "$MNT"
  t=$(mean "sh -c '$FLATFS mount $img $MNT && fusermount3 -u $MNT'")
  row "$name" "mount with warm cache (want <= 0.100 s)" "$t" "-" "-" "-"
  # A fresh mount (index from the warm cache) before each run, so no file is in the page cache.
  # Through a pipe: GNU tar skips reading files when its output is /dev/null itself.
  t=$(mean "sh -c 'tar -cf - -C $MNT . | cat > /dev/null'" \
    "sh -c 'fusermount3 -u $MNT 2>/dev/null; $FLATFS mount $img $MNT'")
  row "$name" "read every file via fresh mount / pigz -dc" "$t" "$dec" "$(ratio "$t" "$dec")" "$(ps -o rss= -C flatfs | sort -n | tail -1 | awk '{printf "%.0f", $1/1024}')"
  fusermount3 -u "$MNT"
done
