#!/usr/bin/env bash
# readme-examples.sh [FLATFS]
#
# Runs every command of README.md's ```sh blocks against the bundled demo images, so that the
# examples cannot rot. The README's names stand for these copies, in a scratch directory:
#   app.docker.tar, image.oci.tar   examples/demo.docker.tar, examples/demo.oci.tar
#   ./layout                        examples/demo.oci.tar unpacked (ref "latest")
#   /mnt/NAME                       an empty directory in the scratch directory
# `cargo run --release --` stands for FLATFS (default: target/debug/flatfs). Left out, and
# listed: lines marked "(needs docker)", and scripts/test.sh (the suite that runs this). A
# `mount -f` line is started in the background and unmounted once its mount is up. Mount
# lines need /dev/fuse: without it the script fails, unless ALLOW_NO_FUSE=1 (then it says
# which lines it did not run). Also checks that README names every package scripts/test.sh
# installs.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
flatfs="$(realpath "${1:-$repo/target/debug/flatfs}")"
[ -x "$flatfs" ] || { echo "readme-examples: no flatfs binary at $flatfs" >&2; exit 1; }

work="$(mktemp -d)"
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do
    mountpoint -q "$m" 2>/dev/null && "$flatfs" umount "$m" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/bin" "$work/mnt" "$work/layout"
ln -s "$flatfs" "$work/bin/flatfs"
ln -s "$repo/examples" "$work/examples"
cp "$repo/examples/demo.docker.tar" "$work/app.docker.tar"
cp "$repo/examples/demo.oci.tar" "$work/image.oci.tar"
tar -xf "$repo/examples/demo.oci.tar" -C "$work/layout"
export PATH="$work/bin:$PATH" FLATFS_CACHE_DIR="$work/cache"

# The README names what scripts/test.sh installs: all of it.
packages="$(sed -n 's/^packages+\{0,1\}=(\(.*\))$/\1/p' "$repo/scripts/test.sh")"
[ -n "$packages" ] || { echo "readme-examples: no packages=(...) in scripts/test.sh" >&2; exit 1; }
for p in $packages; do
  grep -q -- "$p" "$repo/README.md" ||
    { echo "readme-examples: README.md does not name $p, which scripts/test.sh installs" >&2; exit 1; }
done

# The command lines of the ```sh blocks, as "LINE_NUMBER<TAB>COMMAND".
commands="$(awk '/^```sh$/ {inside=1; next} /^```/ {inside=0} inside && NF {print NR "\t" $0}' \
  "$repo/README.md")"
[ -n "$commands" ] || { echo "readme-examples: no sh blocks in README.md" >&2; exit 1; }

ran=0 left_out=()
while IFS=$'\t' read -r number line; do
  case "$line" in
    *"(needs docker)"*) left_out+=("README.md:$number: $line"); continue ;;
    scripts/test.sh*) left_out+=("README.md:$number: $line (the suite running this)"); continue ;;
  esac
  if [[ "$line" == *docker\ * && "$line" != *flatfs* ]] || [[ "$line" =~ (^|[|;&]\ *)docker\  ]]; then
    echo "readme-examples: README.md:$number runs docker without the (needs docker) marker:" >&2
    echo "  $line" >&2
    exit 1
  fi
  cmd="${line//cargo run --release -- /flatfs }"
  cmd="${cmd//\/mnt\//$work/mnt/}"
  if [[ "$cmd" == *"flatfs mount"* || "$cmd" == *"$work/mnt/"* ]]; then
    if [ ! -e /dev/fuse ]; then
      if [ "${ALLOW_NO_FUSE:-}" = 1 ]; then
        left_out+=("README.md:$number: $line (no /dev/fuse)")
        continue
      fi
      echo "readme-examples: README.md:$number needs /dev/fuse (ALLOW_NO_FUSE=1 to leave it out)" >&2
      exit 1
    fi
    for m in $(grep -o "$work/mnt/[A-Za-z0-9_]*" <<<"$cmd"); do
      mkdir -p "$m"
      mounts+=("$m")
    done
  fi
  echo "+ $line" >&2
  if [[ "$cmd" == *"flatfs mount -f "* ]]; then
    # Serves until unmounted: start it, wait for the mount, take it down.
    mnt="$(grep -o "$work/mnt/[A-Za-z0-9_]*" <<<"$cmd" | tail -1)"
    (cd "$work" && bash -c "$cmd") &
    server=$!
    for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
    mountpoint -q "$mnt" || { echo "readme-examples: README.md:$number: no mount" >&2; exit 1; }
    flatfs umount "$mnt"
    wait "$server"
  else
    (cd "$work" && bash -o pipefail -c "$cmd") >/dev/null ||
      { echo "readme-examples: README.md:$number failed: $line" >&2; exit 1; }
  fi
  ran=$((ran + 1))
done <<<"$commands"

echo "readme-examples: ran $ran commands of README.md" >&2
for l in "${left_out[@]}"; do echo "  left out: $l" >&2; done
