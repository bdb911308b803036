"""Shared by the benchmark image generators (make-synthetic.py, make-manylayers.py): gzip a
layer tar into an OCI layout's blobs and write the config, manifest and index around them."""

import hashlib
import json
import os
import shutil
import subprocess


def gzip_file(src, dst):
    if shutil.which("pigz"):
        with open(dst, "wb") as out:
            subprocess.run(["pigz", "-6", "-n", "-c", src], stdout=out, check=True)
    else:
        import gzip
        with open(src, "rb") as i, gzip.GzipFile(dst, "wb", mtime=0) as o:
            shutil.copyfileobj(i, o, 1 << 20)


def sha_file(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return "sha256:" + h.hexdigest()


def add_gzip_layer(raw, blobs):
    """Moves the gzip of the layer tar `raw` into `blobs` (and removes `raw`); returns the
    layer's descriptor and diff_id."""
    diff_id = sha_file(raw)
    gz = raw + ".gz"
    gzip_file(raw, gz)
    d = sha_file(gz)
    size = os.path.getsize(gz)
    os.replace(gz, os.path.join(blobs, d[7:]))
    os.remove(raw)
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size}, diff_id


def write_image(root, layers, diff_ids, history):
    """Writes config, manifest (tagged `latest`), oci-layout and index.json into the layout
    `root`, whose blobs/sha256 already holds the layers."""
    blobs = os.path.join(root, "blobs", "sha256")

    def blob(obj):
        b = json.dumps(obj, sort_keys=True).encode()
        d = "sha256:" + hashlib.sha256(b).hexdigest()
        with open(os.path.join(blobs, d[7:]), "wb") as f:
            f.write(b)
        return d, len(b)

    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": h} for h in history]}
    cd, cs = blob(config)
    md, ms = blob({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                   "layers": layers})
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}, f)
