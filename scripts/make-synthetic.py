#!/usr/bin/env python3
"""make-synthetic.py OUTDIR [FILES]: a deterministic benchmark image of many small files.

Layer 1 holds FILES (default 200000) small files in 1000-file directories; layer 2 whites out
every tenth file and rewrites another tenth. Writes OUTDIR/synthetic/ (OCI layout, gzip layers,
tag latest) and OUTDIR/synthetic.oci.tar. Compression uses pigz when present (fast), else zlib.
"""
import io
import os
import random
import shutil
import sys
import tarfile

from oci_image import add_gzip_layer, write_image

MTIME = 1700000000


def add(tf, name, data=None, kind="f", mode=0o644):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid = MTIME, 0, 0
    if kind == "d":
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(ti)
    else:
        ti.mode, ti.size = mode, len(data)
        tf.addfile(ti, io.BytesIO(data))


def content(rng, i, gen):
    n = rng.randrange(0, 2048)
    head = f"file {i} generation {gen}\n".encode()
    return head + bytes(rng.getrandbits(8) if k % 4 == 0 else 97 + k % 26 for k in range(n))


def layer_tar(path, build):
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)




def main():
    out = sys.argv[1]
    files = int(sys.argv[2]) if len(sys.argv) > 2 else 200000
    root = os.path.join(out, "synthetic")
    shutil.rmtree(root, ignore_errors=True)
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs)
    work = os.path.join(out, ".synthetic-work")
    os.makedirs(work, exist_ok=True)

    def base(tf):
        rng = random.Random(1)
        for i in range(files):
            if i % 1000 == 0:
                add(tf, f"d{i // 1000:04d}", kind="d")
            add(tf, f"d{i // 1000:04d}/f{i:07d}", content(rng, i, 1))

    def update(tf):
        rng = random.Random(2)
        for i in range(files):
            d = f"d{i // 1000:04d}"
            if i % 10 == 3:
                add(tf, f"{d}/.wh.f{i:07d}", b"")
            elif i % 10 == 7:
                add(tf, f"{d}/f{i:07d}", content(rng, i, 2))

    layers, diff_ids = [], []
    for n, build in enumerate((base, update), 1):
        raw = os.path.join(work, f"layer{n}.tar")
        layer_tar(raw, build)
        desc, diff_id = add_gzip_layer(raw, blobs)
        layers.append(desc)
        diff_ids.append(diff_id)

    write_image(root, layers, diff_ids, [f"synthetic layer {n}" for n in (1, 2)])
    shutil.rmtree(work)
    with tarfile.open(os.path.join(out, "synthetic.oci.tar"), "w") as tf:
        tf.add(root, arcname=".")


if __name__ == "__main__":
    main()
