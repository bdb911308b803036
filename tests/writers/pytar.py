#!/usr/bin/env python3
"""Writes a layer tar from a directory with Python's tarfile, for the flatfs writer corpus
(tests/it/writers.rs): pytar.py gnu|pax|ustar SRC OUT.

tarfile.add walks the tree itself: hardlinks by inode, symlinks, devices and fifos, long
names as GNU L/K entries (gnu), PAX records (pax), or the ustar prefix field (ustar).
"""
import os
import sys
import tarfile

FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in FORMATS:
        sys.exit("usage: pytar.py gnu|pax|ustar SRC OUT")
    fmt, src, out = FORMATS[sys.argv[1]], sys.argv[2], sys.argv[3]
    with tarfile.open(out, "w", format=fmt) as t:
        # Children of SRC rather than SRC itself, so names carry no "./" prefix (as
        # `docker build` layers do); sorted so the layer is reproducible.
        for name in sorted(os.listdir(src)):
            t.add(os.path.join(src, name), arcname=name)


if __name__ == "__main__":
    main()
