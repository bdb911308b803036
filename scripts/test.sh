#!/usr/bin/env bash
# Runs the whole test suite, installing first what it needs on Debian/Ubuntu:
# fuse3 (fusermount3) for the mount tests, umoci + skopeo + podman as independent oracles, attr, python3;
# docker-registry (+ apache2-utils for htpasswd, openssl for certificates) for the registry tests.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

# (jq, libcap2-bin and busybox-static are for ../shared/tools/make-images.sh, which the oracle
# tests run; installed here so that two of them never run apt-get at once.)
packages=(fuse3 umoci skopeo podman attr python3 tar gzip zstd pigz jq libcap2-bin busybox-static time util-linux docker-registry apache2-utils openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "test.sh: please install: ${missing[*]}" >&2
    exit 1
  fi
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "test.sh: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A cache of the suite's own, started empty, so that runs do not depend on ~/.cache.
export FLATFS_CACHE_DIR="${FLATFS_CACHE_DIR:-$PWD/target/test-cache}"
rm -rf "$FLATFS_CACHE_DIR"
exec cargo test --locked "$@"
