#!/usr/bin/env python3
"""make-million.py OUTDIR [ENTRIES]: one gzip layer of ENTRIES (default 1,000,000) empty files
in directories of 1000, for bench.sh's peak-RSS-while-merging row (issue 15, item 5).

Writes OUTDIR/million/ (OCI layout, tag latest) and OUTDIR/million-1/, the same with one file
(the RSS of a near-empty merge, subtracted by bench.sh). Names: `dNNNN/fNNNNNNN`.
"""
import os
import shutil
import sys
import tarfile

from oci_image import add_gzip_layer, write_image


def build(root, entries):
    shutil.rmtree(root, ignore_errors=True)
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs)
    raw = os.path.join(root, "layer.tar")
    with tarfile.open(raw, "w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(entries):
            if i % 1000 == 0:
                d = tarfile.TarInfo(f"d{i // 1000:04d}")
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                tf.addfile(d)
            f = tarfile.TarInfo(f"d{i // 1000:04d}/f{i:07d}")
            f.mode, f.mtime = 0o644, 1700000000
            tf.addfile(f)
    desc, diff_id = add_gzip_layer(raw, blobs)
    write_image(root, [desc], [diff_id], [f"{entries} empty files"])


def main():
    out = sys.argv[1]
    entries = int(sys.argv[2]) if len(sys.argv) > 2 else 1000000
    build(os.path.join(out, "million-1"), 1)
    build(os.path.join(out, "million"), entries)


if __name__ == "__main__":
    main()
