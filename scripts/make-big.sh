#!/usr/bin/env bash
# make-big.sh BENCH_DIR — builds the `big` benchmark image into BENCH_DIR/big (OCI layout, tag latest).
#
# Built the way ../shared/tools/make-images.sh builds `debian` (umoci unpack, a chroot that
# really runs apt-get, umoci repack), on top of that debian image (BENCH_DIR/debian, or
# BASE=OCI_DIR): its 3 layers (debootstrap minbase, apt-get install, apt-get purge) plus
#   layer 4  apt-get install of a buildpack-deps-like tool chain (build-essential, python3, perl,
#            git, cmake, autotools, -dev libraries, man pages, vim ...): ~790 MiB of tar, docs kept
#   layer 5  a small cleanup: apt-get purge cmake (~100 whiteouts: umoci writes one per removed
#            directory), a file replaced by a symlink, a directory replaced by a file, a config edited
# => 5 layers, ~350 MiB gzip, ~910 MiB of tar, ~27k merged entries (bookworm, 2026-11).
# Needs root, umoci, pigz and the Debian mirror.
# Writes BENCH_DIR/big/, BENCH_DIR/big.stats.txt (sizes) and, when ../shared/tools is there,
# BENCH_DIR/big.expected.txt (tree-manifest.py --hardlinks of the merged rootfs, as for debian).
# The build is done under BENCH_DIR/.big-work and moved in place at the end, so an interrupted
# build never leaves a half-made BENCH_DIR/big behind. Takes ~5-10 min (download ~200 MB).
set -euo pipefail
umask 022
export LC_ALL=C.UTF-8

[ $# -eq 1 ] || { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OUT=$(realpath -m "$1")
BASE=${BASE:-$OUT/debian}
TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../shared/tools" 2>/dev/null && pwd || true)
# Same fixed history timestamp as make-images.sh; file mtimes stay the real package ones.
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
[ "$(id -u)" = 0 ] || { echo "make-big.sh: must run as root (chroot, mknod, chown)" >&2; exit 1; }
[ -f "$BASE/index.json" ] || { echo "make-big.sh: no base image at $BASE (run ../shared/tools/make-images.sh $OUT debian)" >&2; exit 1; }
for tool in umoci pigz chroot; do
  command -v "$tool" >/dev/null || { echo "make-big.sh: needs $tool" >&2; exit 1; }
done

log() { printf '\033[1m[make-big %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

W=$OUT/.big-work
B=$W/bundle
# /proc inside the chroot must never outlive the script, or rm -rf and the next run trip over it.
cleanup() {
  mountpoint -q "$B/rootfs/proc" 2>/dev/null && umount -l "$B/rootfs/proc"
  rm -rf --one-file-system "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf --one-file-system "$W"
mkdir -p "$W"

# chroot_run ROOT SCRIPT: run SCRIPT in the image as `RUN` would, with /proc, DNS, no services.
chroot_run() {
  local r=$1 rc=0
  mount -t proc proc "$r/proc"
  printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"; chmod 755 "$r/usr/sbin/policy-rc.d"
  cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
  chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C \
    /bin/sh -ec "$2" || rc=$?
  rm -f "$r/usr/sbin/policy-rc.d"
  umount "$r/proc"
  # what a Dockerfile RUN would not leave behind either
  : > "$r/etc/resolv.conf"
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb
  mkdir -p "$r/var/lib/apt/lists/partial"
  rm -f "$r"/var/log/apt/*.log "$r"/var/log/dpkg.log "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old
  return $rc
}

# The tool chain of a typical CI/build base image (cf. buildpack-deps). --no-install-recommends
# keeps it to ~180 packages; docs and man pages are kept, as in such images. The last line
# (man pages, perl-doc, mercurial, subversion, vim) brings the count of small files up to ~30k.
PACKAGES=(build-essential python3 python3-dev python3-pip python3-venv perl git cmake autoconf
  automake libtool pkg-config curl wget ca-certificates openssh-client gnupg unzip xz-utils file
  procps libssl-dev zlib1g-dev libffi-dev libsqlite3-dev libreadline-dev libbz2-dev liblzma-dev
  libncurses-dev libxml2-dev libyaml-dev libcurl4-openssl-dev libglib2.0-dev libpng-dev
  libjpeg-dev libpq-dev
  manpages manpages-dev perl-doc mercurial subversion vim)
big_l4() {
  chroot_run "$1" "apt-get update -qq
    apt-get install -y -qq --no-install-recommends ${PACKAGES[*]} >/dev/null"
}
# Small last layer so that a flattener has whiteouts to apply: a purge (file and directory
# whiteouts), a file that becomes a symlink, a directory that becomes a file, an edited file.
big_l5() {
  chroot_run "$1" 'apt-get purge -y -qq --auto-remove cmake >/dev/null
    rm /usr/bin/wget && ln -s curl /usr/bin/wget
    rm -rf /usr/share/doc/git/contrib && echo "contrib removed by layer 5" > /usr/share/doc/git/contrib
    echo "[safe]" > /etc/gitconfig && echo "	directory = *" >> /etc/gitconfig
    echo "big-test layer5" > /etc/motd'
}

log "copying base image $BASE"
cp -a "$(realpath "$BASE")" "$W/big"
img="$W/big:latest"
for step in 4 5; do
  case $step in
    4) fn=big_l4; by="/bin/sh -c apt-get update && apt-get install --no-install-recommends build-essential python3 perl git cmake ...";;
    5) fn=big_l5; by="/bin/sh -c apt-get purge --auto-remove cmake && ln -s curl /usr/bin/wget && ...";;
  esac
  log "layer $step: unpack"
  rm -rf --one-file-system "$B"; umoci unpack --image "$img" "$B" >/dev/null
  log "layer $step: run $fn"
  "$fn" "$B/rootfs"
  log "layer $step: repack"
  umoci repack --history.created "$CREATED" --history.created_by "$by" --image "$img" "$B"
done
# The bundle now holds the merged rootfs of the final image: count it and take the oracle from it.
entries=$(find "$B/rootfs" -mindepth 1 | wc -l)
if [ -n "$TOOLS" ] && [ -f "$TOOLS/tree-manifest.py" ]; then
  log "writing big.expected.txt"
  python3 "$TOOLS/tree-manifest.py" --hardlinks "$B/rootfs" -o "$W/big.expected.txt"
fi
rm -rf --one-file-system "$B"
umoci config --image "$img" --no-history --created "$CREATED" --author "make-big.sh" --config.cmd bash
umoci gc --layout "$W/big"

# Sizes, as docs/performance.md quotes them for debian.
man=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]+"/index.json"))["manifests"][0]["digest"][7:])' "$W/big")
mapfile -t blobs < <(python3 -c 'import json,sys; d=sys.argv[1]; m=json.load(open(d+"/blobs/sha256/"+sys.argv[2])); print("\n".join(d+"/blobs/sha256/"+l["digest"][7:] for l in m["layers"]))' "$W/big" "$man")
gz=0; tarb=0; wh=0
for b in "${blobs[@]}"; do
  gz=$((gz + $(stat -c %s "$b")))
  tarb=$((tarb + $(pigz -dc "$b" | wc -c)))
  wh=$((wh + $(pigz -dc "$b" | tar -tf - | grep -c '/\.wh\.\|^\.wh\.' || true)))
done
stats=$(awk -v n="${#blobs[@]}" -v gz="$gz" -v t="$tarb" -v e="$entries" -v wh="$wh" 'BEGIN {
  printf "big: %d layers, %.1f MiB gzip, %.1f MiB tar, %d merged entries, %d whiteouts\n", n, gz/1048576, t/1048576, e, wh }')

rm -rf "$OUT/big" "$OUT/big.expected.txt"
mv "$W/big" "$OUT/big"
if [ -f "$W/big.expected.txt" ]; then mv "$W/big.expected.txt" "$OUT/big.expected.txt"; fi
echo "$stats" > "$OUT/big.stats.txt"
log "$stats"
