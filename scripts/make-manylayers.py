#!/usr/bin/env python3
"""make-manylayers.py OUTDIR [LAYERS] [ENTRIES]: a deterministic benchmark image of many layers.

Layer 1 holds a tree of ENTRIES (default 50000) entries: directories `dNNN/eNN/` of small files
and a few symlinks. Each of the LAYERS - 1 later layers (default 100 layers in all, as a long
Dockerfile or `buildah` without squash gives) touches 1-2% of the tree as it then stands:
rewrites of files, new files (in existing and new directories), whiteouts of files and of whole
directories, and opaque directories refilled with a few files. The same arguments always give
the same bytes. Writes OUTDIR/manylayers/ (OCI layout, gzip layers, tag latest); the merged
tree's size goes to stdout. Compression uses pigz when present (fast), else zlib.
"""
import io
import os
import random
import shutil
import sys
import tarfile

from oci_image import add_gzip_layer, write_image

MTIME = 1700000000


def content(rng, tag):
    """Text-like bytes of 0-3 KiB that compress about 3:1, starting with `tag`."""
    n = rng.randrange(0, 3072)
    words = (b"usr ", b"lib ", b"share\n", b"x86_64 ", b"config ", b"python3 ", b"0 ", b"1 ")
    body = b"".join(words[b % 8] for b in rng.randbytes(n // 5))
    noise = rng.randbytes(n // 8)
    return tag.encode() + b"\n" + body + noise


def add_dir(tf, name):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid, ti.type, ti.mode = MTIME, 0, 0, tarfile.DIRTYPE, 0o755
    tf.addfile(ti)


def add_file(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid, ti.mode, ti.size = MTIME, 0, 0, 0o644, len(data)
    tf.addfile(ti, io.BytesIO(data))


def add_symlink(tf, name, target):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid, ti.type, ti.linkname = MTIME, 0, 0, tarfile.SYMTYPE, target
    tf.addfile(ti)


def base(tf, tree, entries):
    """Layer 1: `entries` entries in directories of about 100 files, 20 per parent directory."""
    rng = random.Random(1)
    made = 0
    d = 0
    while made < entries:
        top = f"d{d // 20:03d}"
        if d % 20 == 0:
            add_dir(tf, top)
            made += 1
        sub = f"{top}/e{d % 20:02d}"
        add_dir(tf, sub)
        made += 1
        tree[sub] = set()
        for i in range(min(100, entries - made)):
            name = f"f{i:03d}"
            if i % 50 == 49:
                add_symlink(tf, f"{sub}/{name}", f"f{i - 1:03d}")
            else:
                add_file(tf, f"{sub}/{name}", content(rng, f"{sub}/{name} 1"))
            tree[sub].add(name)
            made += 1
        d += 1


def touch(tf, tree, n, entries):
    """Layer n: touch 1-2% of `entries` in the tree as it stands, in tar order of directories."""
    rng = random.Random(n)
    budget = rng.randrange(entries // 100, entries // 50 + 1)
    dirs = sorted(tree)
    # Adds (new files, new directories of 40) about balance whiteouts (of files, of
    # directories, opaque refills), so the tree keeps its size. Changes grouped by directory, as a build step that writes a few packages gives.
    plan = {}
    while budget > 0:
        d = rng.choice(dirs)
        kind = rng.choices(["rewrite", "add", "whiteout", "dir-whiteout", "opaque", "new-dir"],
                           weights=[50, 25, 15, 0.3, 0.5, 1.5])[0]
        plan.setdefault(d, []).append(kind)
        budget -= {"rewrite": 1, "add": 1, "whiteout": 1}.get(kind, 20)
    new_dirs = 0
    for d in sorted(plan):
        if d not in tree:
            continue  # whited out earlier in this layer's plan
        kinds = plan[d]
        if "dir-whiteout" in kinds:
            parent, _, leaf = d.rpartition("/")
            add_file(tf, f"{parent}/.wh.{leaf}", b"")
            del tree[d]
            continue
        add_dir(tf, d)
        files = tree[d]
        if "opaque" in kinds:
            add_file(tf, f"{d}/.wh..wh..opq", b"")
            files.clear()
            for i in range(10):
                name = f"o{n:03d}-{i}"
                add_file(tf, f"{d}/{name}", content(rng, f"{d}/{name} {n}"))
                files.add(name)
        for kind in kinds:
            regular = sorted(f for f in files if not f.endswith("9"))  # not the symlinks' names
            if kind == "rewrite" and regular:
                name = rng.choice(regular)
                add_file(tf, f"{d}/{name}", content(rng, f"{d}/{name} {n}"))
            elif kind == "add":
                name = f"a{n:03d}-{rng.randrange(1 << 20):06x}"
                add_file(tf, f"{d}/{name}", content(rng, f"{d}/{name} {n}"))
                files.add(name)
            elif kind == "whiteout" and files:
                name = rng.choice(sorted(files))
                add_file(tf, f"{d}/.wh.{name}", b"")
                files.discard(name)
            elif kind == "new-dir":
                sub = f"{d.partition('/')[0]}/n{n:03d}-{new_dirs}"
                new_dirs += 1
                add_dir(tf, sub)
                tree[sub] = set()
                for i in range(40):
                    name = f"f{i:03d}"
                    add_file(tf, f"{sub}/{name}", content(rng, f"{sub}/{name} {n}"))
                    tree[sub].add(name)




def main():
    out = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    entries = int(sys.argv[3]) if len(sys.argv) > 3 else 50000
    root = os.path.join(out, "manylayers")
    shutil.rmtree(root, ignore_errors=True)
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs)
    work = os.path.join(out, ".manylayers-work")
    os.makedirs(work, exist_ok=True)

    tree = {}  # directory -> names of its entries, as the merged tree stands
    layers, diff_ids, total = [], [], 0
    for n in range(1, count + 1):
        raw = os.path.join(work, f"layer{n}.tar")
        with open(raw, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            if n == 1:
                base(tf, tree, entries)
            else:
                touch(tf, tree, n, entries)
            total += len(tf.getmembers())
        desc, diff_id = add_gzip_layer(raw, blobs)
        layers.append(desc)
        diff_ids.append(diff_id)

    write_image(root, layers, diff_ids, [f"manylayers layer {n}" for n in range(1, count + 1)])
    shutil.rmtree(work)
    merged = len(tree) + sum(len(f) for f in tree.values())
    gz = sum(layer["size"] for layer in layers)
    print(f"manylayers: {count} layers, {total} tar entries, {gz / 2**20:.1f} MiB gzip, "
          f"about {merged} merged entries below the top directories")


if __name__ == "__main__":
    main()
