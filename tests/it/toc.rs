//! Layers that carry their own table of contents (issue 14, items 3-4): zstd:chunked layers
//! written by skopeo, read from a local layout (the ordinary zstd path) and lazily from a
//! registry through their verified TOC, compared with flatfs's streaming pass over the same
//! image.

use std::path::Path;
use std::process::Command;

use crate::registry_harness::*;
use crate::util::*;

/// A layout of two gzip layers: directories, a big file of noise with a small file after it,
/// a symlink, a hardlink, an empty file, and a whiteout in the upper layer.
fn source_image(at: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let noise: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let layers = vec![
        layer([
            dir("data"),
            file("data/noise.bin", noise.clone()),
            file("data/gone.txt", b"deleted above\n"),
            file("data/empty", b""),
            symlink("data/link", "noise.bin"),
            file("data/tail.txt", b"the end of the big layer\n"),
            hardlink("data/same.txt", "data/tail.txt"),
        ])
        .compression(Compression::Gzip),
        layer([whiteout("data/gone.txt"), file("data/top.txt", b"top\n")])
            .compression(Compression::Gzip),
    ];
    let path = at.join("src");
    write_oci_layout(&layers, &default_config(&layers), &path, Some("latest"));
    (path, noise)
}

/// skopeo copy with zstd:chunked compression (bounded: a hung copy fails the test).
fn skopeo_chunked(from: &str, to: &str) {
    let out = Command::new("timeout")
        .args(["300", "skopeo", "copy", "-q", "--dest-tls-verify=false"])
        .args(["--dest-compress-format", "zstd:chunked", from, to])
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ls(cache: &Path, image: &str) -> String {
    let out = flatfs()
        .env("FLATFS_CACHE_DIR", cache)
        .env("HOME", cache)
        .args(["ls", "-R", "-l", image, "--tls-verify=false"])
        .output()
        .expect("run flatfs");
    assert_success(&out);
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn zstd_chunked_layout_reads_like_its_gzip_source() {
    registry_tools(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = source_image(tmp.path());
    let chunked = tmp.path().join("chunked");
    skopeo_chunked(
        &format!("oci:{}:latest", src.display()),
        &format!("oci:{}:latest", chunked.display()),
    );
    let manifest = std::fs::read_to_string(chunked.join("index.json")).unwrap();
    let cache = tmp.path().join("cache");
    let want = ls(&cache, src.to_str().unwrap());
    assert!(
        want.contains("data/top.txt") && !want.contains("gone"),
        "{want}"
    );
    let got = ls(&cache, chunked.to_str().unwrap());
    assert_eq!(got, want, "{manifest}");
}
