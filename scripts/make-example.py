#!/usr/bin/env python3
"""Builds the small demo image in examples/ (stdlib only, deterministic).

Three layers that exercise the overlay rules: a base, a layer that adds a file with an xattr,
a hardlink and an opaque directory, and a layer that deletes and changes files. Writes
examples/demo.oci.tar (OCI archive, gzip layers) and examples/demo.docker.tar (docker save
layout, plain layers). Run it again to check the committed files are what it builds.
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MTIME = 1700000000


def entry(tf, name, kind="f", data=b"", mode=0o644, link="", pax=None):
    ti = tarfile.TarInfo(name)
    ti.mtime = MTIME
    ti.mode = mode
    ti.uid = ti.gid = 0
    if kind == "f":
        ti.size = len(data)
    elif kind == "d":
        ti.type = tarfile.DIRTYPE
    elif kind == "l":
        ti.type = tarfile.SYMTYPE
        ti.linkname = link
    elif kind == "h":
        ti.type = tarfile.LNKTYPE
        ti.linkname = link
    if pax:
        ti.pax_headers = pax
    tf.addfile(ti, io.BytesIO(data) if kind == "f" else None)


def layer(build):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)
    return buf.getvalue()


def base(tf):
    entry(tf, "bin", "d", mode=0o755)
    entry(tf, "bin/hello", data=b"#!/bin/sh\necho 'Hello from a flattened image!'\n", mode=0o755)
    entry(tf, "etc", "d", mode=0o755)
    entry(tf, "etc/motd", data=b"welcome to the base layer\n")
    entry(tf, "etc/os-release", data=b'NAME="demo"\nVERSION="1"\n')
    entry(tf, "var", "d", mode=0o755)
    entry(tf, "var/cache", "d", mode=0o755)
    entry(tf, "var/cache/stale.bin", data=bytes(range(256)) * 256)
    entry(tf, "usr", "d", mode=0o755)
    entry(tf, "usr/bin", "l", link="../bin", mode=0o777)


def app(tf):
    entry(tf, "message.txt", data=b"Hello, World!\n",
          pax={"SCHILY.xattr.user.demo": "flatfs"})
    entry(tf, "bin/hi", "h", link="bin/hello", mode=0o755)
    entry(tf, "var/cache", "d", mode=0o755)
    entry(tf, "var/cache/.wh..wh..opq")
    entry(tf, "var/cache/fresh.txt", data=b"rebuilt cache\n")


def cleanup(tf):
    entry(tf, "etc", "d", mode=0o755)
    entry(tf, "etc/.wh.motd")
    entry(tf, "etc/os-release", data=b'NAME="demo"\nVERSION="2"\n')


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "examples")
    tars = [layer(f) for f in (base, app, cleanup)]
    created = "2023-11-14T22:13:20Z"
    history = [{"created": created, "created_by": s} for s in (
        "COPY rootfs /", "RUN echo Hello > /message.txt && rebuild cache", "RUN rm /etc/motd && bump version")]
    history.append({"created": created, "created_by": 'CMD ["cat", "/message.txt"]', "empty_layer": True})
    config = {
        "architecture": "amd64", "os": "linux", "created": created,
        "config": {"Cmd": ["cat", "/message.txt"], "Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/",
                   "Labels": {"org.opencontainers.image.title": "flatfs demo"}},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
        "history": history,
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()

    # OCI archive, gzip layers.
    gz = [gzip.compress(t, mtime=0) for t in tars]
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config_bytes),
                   "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(g), "size": len(g)}
                   for g in gz],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest_bytes),
        "size": len(manifest_bytes), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    with tarfile.open(os.path.join(out, "demo.oci.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
        add(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        for blob in gz + [config_bytes, manifest_bytes]:
            add(tf, "blobs/sha256/" + sha(blob)[7:], blob)
        add(tf, "index.json", json.dumps(index, sort_keys=True).encode())

    # docker save, classic layout, plain layers.
    with tarfile.open(os.path.join(out, "demo.docker.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
        for t in tars:
            add(tf, sha(t)[7:] + "/layer.tar", t)
        add(tf, sha(config_bytes)[7:] + ".json", config_bytes)
        add(tf, "manifest.json", json.dumps([{
            "Config": sha(config_bytes)[7:] + ".json", "RepoTags": ["flatfs-demo:latest"],
            "Layers": [sha(t)[7:] + "/layer.tar" for t in tars]}]).encode())


if __name__ == "__main__":
    main()
