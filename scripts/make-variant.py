#!/usr/bin/env python3
"""make-variant.py TAR OUTDIR gzip|zstd: a one-layer OCI layout (tag latest) holding TAR.

bench.sh's issue-15 variants of an image: its merged tree re-tarred in directory order and
gzipped (pigz -6), or its merged rootfs tar as one zstd frame (`zstd -3`, no --long, one
thread), as most encoders write layers. TAR is left in place; OUTDIR is replaced only once the
new layout is complete (built in OUTDIR.part), so an interrupted run leaves no half-made one.
"""
import os
import shutil
import subprocess
import sys

from oci_image import add_gzip_layer, sha_file, write_image


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in ("gzip", "zstd"):
        sys.exit(__doc__.splitlines()[0])
    tar, out, kind = sys.argv[1:]
    root = out + ".part"
    shutil.rmtree(root, ignore_errors=True)
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs)
    raw = os.path.join(root, "layer.tar")
    if kind == "gzip":
        shutil.copyfile(tar, raw)
        desc, diff_id = add_gzip_layer(raw, blobs)
    else:
        diff_id = sha_file(tar)
        subprocess.run(["zstd", "-3", "-T1", "-q", "-f", tar, "-o", raw + ".zst"], check=True)
        d = sha_file(raw + ".zst")
        desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": d,
                "size": os.path.getsize(raw + ".zst")}
        os.replace(raw + ".zst", os.path.join(blobs, d[7:]))
    write_image(root, [desc], [diff_id], [f"bench.sh {kind} variant"])
    shutil.rmtree(out, ignore_errors=True)
    os.rename(root, out)


if __name__ == "__main__":
    main()
