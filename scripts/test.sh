#!/usr/bin/env bash
# Runs the whole test suite, installing first what it needs on Debian/Ubuntu:
# fuse3 (fusermount3) for the mount tests, umoci + skopeo + podman as independent oracles, attr, python3;
# docker-registry (+ apache2-utils for htpasswd, openssl for certificates) for the registry tests.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

# (jq, libcap2-bin, busybox-static and debootstrap are for ../shared/tools/make-images.sh, which
# the oracle tests run; installed here so that two of them never run apt-get at once.)
packages=(fuse3 umoci skopeo podman runc attr python3 tar gzip zstd pigz jq libcap2-bin busybox-static debootstrap time util-linux)
# The writer corpus (tests/it/writers.rs) archives with every tar writer there is.
packages+=(libarchive-tools golang-go pax git)
# The registry tests (tests/it/registry.rs): a real registry, htpasswd, certificates.
packages+=(docker-registry apache2-utils openssl)
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
cargo test --locked "$@"

# The oracle tests on real images are #[ignore]d, so that a plain `cargo test` says "ignored"
# rather than "ok" when it cannot run them: they need root and ../shared/tools. Run them here
# when those are there, or when CI requires them (then a missing piece fails); the Debian image
# (~2.5 min) only with FLATFS_TEST_DEBIAN=1. Not when a test filter was given.
shared="${FLATFS_SHARED_DIR:-$PWD/../shared}"
if [ $# -eq 0 ]; then
  if { [ "$(id -u)" = 0 ] && [ -x "$shared/tools/make-images.sh" ]; } ||
    [ "${FLATFS_REQUIRE_TOOLS:-}" = 1 ]; then
    oracles=(oracle::hello_image oracle::same_layer mount::mount_of_the_hello_image writers::)
    oracles+=(squash::every_keep_of_the_sample_unpacks squash::podman_runs registry::registry_to_registry registry::registry_pushed_flat)
    [ "${FLATFS_TEST_DEBIAN:-}" = 1 ] && oracles+=(oracle::debian_image)
    cargo test --locked --test it -- --ignored "${oracles[@]}"
  else
    echo "test.sh: oracle tests on real images not run: they need root and $shared/tools" >&2
  fi
fi
