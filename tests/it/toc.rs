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
    let noise = noise(0x2545_f491_4f6c_dd1d, 4 << 20);
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

/// Blob bytes the proxy was asked for by GETs of `digest` from request `from` on (a GET
/// without a range counts the whole `size`), and how many requests.
fn fetched(proxy: &FaultProxy, digest: &str, from: usize, size: u64) -> (u64, usize) {
    let gets: Vec<Seen> = proxy.seen()[from..]
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with(&format!("/blobs/{digest}")))
        .cloned()
        .collect();
    let bytes = gets
        .iter()
        .map(|s| match s.header("range") {
            Some(range) => {
                let (a, b) = range
                    .strip_prefix("bytes=")
                    .and_then(|r| r.split_once('-'))
                    .expect("a single range");
                b.parse::<u64>().unwrap() + 1 - a.parse::<u64>().unwrap()
            }
            None => size,
        })
        .sum();
    (bytes, gets.len())
}

/// `flatfs mount -f -v IMAGE MNT` in the background, and once it serves, `then`; returns
/// what `then` returned and the server's log.
fn mounted<T>(cache: &Path, image: &str, mnt: &Path, then: impl FnOnce() -> T) -> (T, String) {
    mounted_with(cache, image, mnt, &[], then)
}

/// [`mounted`], with more mount options.
fn mounted_with<T>(
    cache: &Path,
    image: &str,
    mnt: &Path,
    extra: &[&str],
    then: impl FnOnce() -> T,
) -> (T, String) {
    let server = flatfs()
        .env("FLATFS_CACHE_DIR", cache)
        .env("HOME", cache)
        .args(["mount", "-f", "-v", image])
        .arg(mnt)
        .arg("--tls-verify=false")
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn flatfs mount -f");
    let start = std::time::Instant::now();
    while !mnt.join("data").exists() && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = then();
    let out = flatfs().arg("umount").arg(mnt).output().expect("umount");
    assert_success(&out);
    let log = String::from_utf8_lossy(&server.wait_with_output().unwrap().stderr).into_owned();
    (r, log)
}

/// Every path under `root` with its type, mode, owner, size, mtime, link count, symlink
/// target and a digest of its contents, one line each, in name order.
fn walk(root: &Path) -> String {
    use sha2::Digest as _;
    use std::os::unix::fs::MetadataExt;
    let mut out = String::new();
    let mut stack = vec![root.to_path_buf()];
    let mut paths = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths.sort();
    for p in paths {
        let m = p.symlink_metadata().unwrap();
        let extra = if m.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().display().to_string()
        } else if m.is_file() {
            format!(
                "{:?}",
                sha2::Sha256::digest(std::fs::read(&p).unwrap()).as_slice()
            )
        } else {
            String::new()
        };
        out += &format!(
            "{} {:o} {}:{} {} {} {} {extra}\n",
            p.strip_prefix(root).unwrap().display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.mtime(),
            m.nlink()
        );
    }
    out
}

#[test]
fn registry_zstd_chunked_lazy_mount_reads_through_the_verified_toc() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (src, noise) = source_image(tmp.path());
    skopeo_chunked(
        &format!("oci:{}:latest", src.display()),
        &reg.url("chunked:1"),
    );
    let out = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &reg.url("chunked:1"),
        ])
        .output()
        .expect("skopeo inspect");
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let big = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let size = manifest["layers"][0]["size"].as_u64().unwrap();
    assert!(
        manifest["layers"][0]["annotations"]
            .to_string()
            .contains("zstd-chunked.manifest-position"),
        "{manifest}"
    );
    // The streaming pass's answer (it downloads every layer), then a host with no index.
    let want = ls(&tmp.path().join("stream"), &reg.url("chunked:1"));
    if !fuse_available("registry_zstd_chunked_lazy_mount_reads_through_the_verified_toc") {
        return;
    }
    let proxy = FaultProxy::start(&reg.host);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = tmp.path().join("cache");
    let image = proxy.url("chunked:1");
    let ((at_mount, tail, after_tail, tampered, whole, listing), log) =
        mounted(&cache, &image, &mnt, || {
            let at_mount = fetched(&proxy, &big, 0, size);
            let tail = std::fs::read(mnt.join("data/tail.txt"));
            let after_tail = fetched(&proxy, &big, 0, size);
            // A lying registry: EIO, never the wrong bytes; right once it behaves.
            proxy.inject(Fault::Corrupt {
                path: format!("/blobs/{big}"),
                times: 1000,
            });
            let tampered = std::fs::read(mnt.join("data/noise.bin"));
            proxy.clear_faults();
            let whole = std::fs::read(mnt.join("data/noise.bin"));
            let listing = walk(&mnt);
            (at_mount, tail, after_tail, tampered, whole, listing)
        });
    eprintln!(
        "zstd:chunked lazy mount: {} bytes in {} requests at mount (the TOC), {} bytes in {} \
         requests after reading data/tail.txt, of a {size}-byte layer blob",
        at_mount.0, at_mount.1, after_tail.0, after_tail.1
    );
    assert!(log.contains("zstd:chunked TOC of"), "{log}");
    assert_eq!(tail.unwrap(), b"the end of the big layer\n");
    // The TOC at mount; then that file's chunk alone.
    assert_eq!(at_mount.1, 1, "{log}");
    assert_eq!(after_tail.1, 2, "{log}");
    assert!(after_tail.0 < 64 * 1024, "{after_tail:?}");
    let Err(err) = tampered else {
        panic!("tampered bytes were read");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(whole.unwrap() == noise, "noise.bin differs");
    assert!(
        !cache.join("blobs/sha256").join(&big[7..]).exists(),
        "a lazy mount stored the blob"
    );
    // The mount, listed as a directory, against the streaming pass's listing of the image.
    let ls_image = ls(&tmp.path().join("stream"), &reg.url("chunked:1"));
    assert_eq!(ls_image, want);
    assert!(
        listing.contains("data/top.txt") && !listing.contains("gone"),
        "{listing}"
    );

    // Again on the same host: the TOC kept by the first mount, verified again, no request
    // for it; reads are right.
    let (at_mount, again, log) = mount_reading_tail(&cache, &image, &mnt, &proxy, &big, size);
    assert!(
        log.contains("parsed zstd:chunked TOC kept on this host")
            && log.contains("merged tree of 2 layers from cache"),
        "{log}"
    );
    assert_eq!(at_mount, (0, 0), "{log}");
    assert_eq!(again.unwrap(), b"the end of the big layer\n");
    check_parsed_toc_refused_when_tampered(&cache, &image, &mnt, &proxy, &big, size);
    // A kept TOC tampered with (and no parsed one): refused by its manifest-checksum,
    // fetched again (and kept again), reads right.
    let kept = cache.join("blobs/toc").join(&big[7..]);
    tamper_kept_toc(&cache, &kept);
    let (at_mount, again, log) = mount_reading_tail(&cache, &image, &mnt, &proxy, &big, size);
    assert!(log.contains("does not hold"), "{log}");
    assert_eq!(at_mount.1, 1, "{log}");
    assert_eq!(again.unwrap(), b"the end of the big layer\n");
    let n = proxy.seen().len();
    let (_, log) = mounted(&cache, &image, &mnt, || ());
    assert!(log.contains("TOC kept on this host"), "{log}");
    assert_eq!(fetched(&proxy, &big, n, size), (0, 0));
    let out = flatfs()
        .env("FLATFS_CACHE_DIR", &cache)
        .args(["cache", "clear"])
        .output()
        .unwrap();
    assert_success(&out);
    assert!(!kept.exists(), "cache clear removes kept TOCs");
    assert!(parsed_tocs(&cache).is_empty(), "and parsed ones");

    // A TOC that does not match its manifest-checksum: refused, the layer read the ordinary
    // way (downloaded whole and indexed), and the files are right.
    proxy.inject(Fault::Corrupt {
        path: format!("/blobs/{big}"),
        times: 1,
    });
    let (tail, log) = mounted(&tmp.path().join("cache2"), &image, &mnt, || {
        std::fs::read(mnt.join("data/tail.txt"))
    });
    assert!(
        log.contains("does not match its manifest-checksum"),
        "{log}"
    );
    assert_eq!(tail.unwrap(), b"the end of the big layer\n");
}

/// `flatfs export SRC --format oci --compression C -o OUT`.
fn export(cache: &Path, src: &Path, compression: &str, out: &Path) {
    let o = flatfs()
        .env("FLATFS_CACHE_DIR", cache)
        .arg("export")
        .arg(src)
        .args(["--format", "oci", "--compression", compression, "-o"])
        .arg(out)
        .output()
        .expect("run flatfs export");
    assert_success(&o);
}

/// `umoci unpack --rootless` of a layout's `latest`, listed by `walk`.
fn umoci_tree(layout: &Path, at: &Path) -> String {
    let o = Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(at)
        .output()
        .expect("run umoci");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    walk(&at.join("rootfs"))
}

/// The layout's image manifest (the one `index.json` names).
fn layout_manifest(layout: &Path) -> (serde_json::Value, String) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = std::fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap();
    (serde_json::from_slice(&blob).unwrap(), digest)
}

#[test]
fn estargz_export_is_a_gzip_tar_any_tool_unpacks_like_the_gzip_export() {
    registry_tools(&["umoci", "tar", "gzip"]);
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = source_image(tmp.path());
    let cache = tmp.path().join("cache");
    let (esgz, gz) = (tmp.path().join("esgz"), tmp.path().join("gz"));
    export(&cache, &src, "estargz", &esgz);
    export(&cache, &src, "gzip", &gz);
    let (manifest, _) = layout_manifest(&esgz);
    let desc = &manifest["layers"][0];
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let toc_digest = desc["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        .as_str()
        .expect("toc.digest annotation");
    let blob = esgz
        .join("blobs/sha256")
        .join(&desc["digest"].as_str().unwrap()[7..]);
    let gzip_t = Command::new("gzip").arg("-t").arg(&blob).output().unwrap();
    assert!(gzip_t.status.success(), "gzip -t: {gzip_t:?}");
    let listing = Command::new("tar").arg("-tzf").arg(&blob).output().unwrap();
    assert!(listing.status.success(), "tar -tzf: {listing:?}");
    let names = String::from_utf8(listing.stdout).unwrap();
    assert_eq!(names.lines().last(), Some("stargz.index.json"), "{names}");
    assert_eq!(
        names.lines().next(),
        Some(".no.prefetch.landmark"),
        "{names}"
    );
    // The TOC entry is what the annotation's digest names.
    let toc = Command::new("tar")
        .args(["-xzOf"])
        .arg(&blob)
        .arg("stargz.index.json")
        .output()
        .unwrap();
    assert_eq!(toc_digest, digest_of(&toc.stdout));
    let uncompressed = Command::new("gzip").arg("-dc").arg(&blob).output().unwrap();
    assert_eq!(
        desc["annotations"]["io.containers.estargz.uncompressed-size"],
        uncompressed.stdout.len().to_string()
    );
    // umoci (eStargz-agnostic) unpacks the same tree as from the gzip export, plus the TOC
    // and the landmark.
    let want = umoci_tree(&gz, &tmp.path().join("u-gz"));
    let got = umoci_tree(&esgz, &tmp.path().join("u-esgz"));
    let got: String = got
        .lines()
        .filter(|l| {
            !l.starts_with("stargz.index.json ") && !l.starts_with(".no.prefetch.landmark ")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(got, want);
    // flatfs reads it as the image it holds: no TOC entry in the merged tree.
    let by_flatfs = ls(&cache, esgz.to_str().unwrap());
    assert!(!by_flatfs.contains("stargz.index.json"), "{by_flatfs}");
    assert_eq!(by_flatfs, ls(&cache, gz.to_str().unwrap()));
    // A docker archive has no descriptors: its eStargz layer is known by its footer.
    let docker = tmp.path().join("esgz.docker.tar");
    let o = flatfs()
        .env("FLATFS_CACHE_DIR", &cache)
        .arg("export")
        .arg(&src)
        .args([
            "--format",
            "docker-archive",
            "--compression",
            "estargz",
            "-o",
        ])
        .arg(&docker)
        .output()
        .expect("run flatfs export");
    assert_success(&o);
    assert_eq!(ls(&cache, docker.to_str().unwrap()), by_flatfs);
    // In a layer that is not eStargz, a file of that name is the image's own.
    let plain = vec![
        layer([
            file("stargz.index.json", b"{}"),
            file(".no.prefetch.landmark", b"x"),
        ])
        .compression(Compression::Gzip),
    ];
    let plain_at = tmp.path().join("plain");
    write_oci_layout(&plain, &default_config(&plain), &plain_at, Some("latest"));
    let listed = ls(&cache, plain_at.to_str().unwrap());
    assert!(
        listed.contains("stargz.index.json") && listed.contains(".no.prefetch.landmark"),
        "{listed}"
    );
}

/// The test image (`source_image`) exported as eStargz into a layout under `at`: the layout,
/// noise.bin's contents, and the one layer's digest and size.
fn estargz_image(at: &Path) -> (std::path::PathBuf, Vec<u8>, String, u64) {
    let (src, noise) = source_image(at);
    let esgz = at.join("esgz");
    export(&at.join("export-cache"), &src, "estargz", &esgz);
    let (manifest, _) = layout_manifest(&esgz);
    let layer = &manifest["layers"][0];
    let digest = layer["digest"].as_str().unwrap().to_string();
    (esgz, noise, digest, layer["size"].as_u64().unwrap())
}

/// `skopeo copy` of layout `layout` (tag latest) to `to` (bounded: a hung copy fails the test).
fn push_layout(layout: &Path, to: &str) {
    let out = Command::new("timeout")
        .args(["300", "skopeo", "copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(to)
        .output()
        .expect("run skopeo");
    assert_success(&out);
}

#[test]
fn registry_estargz_lazy_mount_reads_through_the_verified_toc() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (esgz, noise, big, size) = estargz_image(tmp.path());
    let copy = |layout: &Path, to: &str| push_layout(layout, &reg.url(to));
    copy(&esgz, "esgz:1");
    let want = ls(&tmp.path().join("stream"), &reg.url("esgz:1"));
    assert!(!want.contains("stargz.index.json"), "{want}");
    if !fuse_available("registry_estargz_lazy_mount_reads_through_the_verified_toc") {
        return;
    }
    let proxy = FaultProxy::start(&reg.host);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = tmp.path().join("cache");
    let image = proxy.url("esgz:1");
    let ((at_mount, tail, after_tail, tampered, whole, listing), log) =
        mounted(&cache, &image, &mnt, || {
            let at_mount = fetched(&proxy, &big, 0, size);
            let tail = std::fs::read(mnt.join("data/tail.txt"));
            let after_tail = fetched(&proxy, &big, 0, size);
            proxy.inject(Fault::Corrupt {
                path: format!("/blobs/{big}"),
                times: 1000,
            });
            let tampered = std::fs::read(mnt.join("data/noise.bin"));
            proxy.clear_faults();
            let whole = std::fs::read(mnt.join("data/noise.bin"));
            let listing = walk(&mnt);
            (at_mount, tail, after_tail, tampered, whole, listing)
        });
    eprintln!(
        "eStargz lazy mount: {} bytes in {} requests at mount (footer and TOC), {} bytes in {} \
         requests after reading data/tail.txt, of a {size}-byte layer blob",
        at_mount.0, at_mount.1, after_tail.0, after_tail.1
    );
    assert!(log.contains("eStargz TOC of"), "{log}");
    assert_eq!(tail.unwrap(), b"the end of the big layer\n");
    assert_eq!(at_mount.1, 2, "{log}");
    assert_eq!(after_tail.1, 3, "{log}");
    assert!(after_tail.0 < 64 * 1024, "{after_tail:?}");
    let Err(err) = tampered else {
        panic!("tampered bytes were read");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(whole.unwrap() == noise, "noise.bin differs");
    assert!(
        listing.contains("data/top.txt")
            && !listing.contains("gone")
            && !listing.contains("stargz.index.json"),
        "{listing}"
    );

    // Again on the same host: the footer and TOC kept, no request for them at mount.
    let kept = cache.join("blobs/toc").join(&big[7..]);
    assert!(kept.is_file());
    let (at_mount, again, log) = mount_reading_tail(&cache, &image, &mnt, &proxy, &big, size);
    assert!(
        log.contains("parsed eStargz TOC kept on this host"),
        "{log}"
    );
    assert_eq!(at_mount, (0, 0), "{log}");
    assert_eq!(again.unwrap(), b"the end of the big layer\n");
    check_parsed_toc_refused_when_tampered(&cache, &image, &mnt, &proxy, &big, size);
    // Its merged tree is cached (tied to the TOC's digest) and used.
    let trees = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("tree".as_ref()))
        .count();
    assert_eq!(trees, 1);
    assert!(log.contains("merged tree of 1 layers from cache"), "{log}");
    // Tampered with (and no parsed TOC): refused (it no longer matches toc.digest), fetched
    // again, reads right.
    tamper_kept_toc(&cache, &kept);
    let (at_mount, again, log) = mount_reading_tail(&cache, &image, &mnt, &proxy, &big, size);
    assert!(log.contains("does not hold"), "{log}");
    assert_eq!(at_mount.1, 2, "{log}");
    assert_eq!(again.unwrap(), b"the end of the big layer\n");

    // A manifest whose toc.digest does not match the TOC: refused, the layer read the
    // ordinary way, and the files are right.
    let (mut manifest, old) = layout_manifest(&esgz);
    manifest["layers"][0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] =
        digest_of(b"another TOC").into();
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let new = digest_of(&bytes);
    std::fs::write(esgz.join("blobs/sha256").join(&new[7..]), &bytes).unwrap();
    let index = std::fs::read_to_string(esgz.join("index.json")).unwrap();
    let index = index.replace(&old, &new).replace(
        &format!("\"size\":{}", manifest_len(&esgz, &old)),
        &format!("\"size\":{}", bytes.len()),
    );
    std::fs::write(esgz.join("index.json"), index).unwrap();
    copy(&esgz, "esgz:bad");
    // On a host that keeps the layer's (right) TOC too: the kept TOC is checked against this
    // manifest's annotation as a fetched one is, and refused alike.
    for cache in [tmp.path().join("cache2"), cache.clone()] {
        let (tail, log) = mounted(&cache, &proxy.url("esgz:bad"), &mnt, || {
            std::fs::read(mnt.join("data/tail.txt"))
        });
        assert!(
            log.contains("not using its eStargz TOC") && log.contains("does not match"),
            "{log}"
        );
        assert_eq!(tail.unwrap(), b"the end of the big layer\n");
    }
    assert!(!kept.exists(), "the kept TOC that did not hold is gone");
    assert!(!parsed_tocs(&cache).is_empty());
    // The same layer read as a tar (`cat` downloads it) on this host, which keeps its parsed TOC: a real tar index of its
    // own, by layer digest, used again the second time; never the parsed TOC's virtual offsets.
    for _ in 0..2 {
        let out = flatfs()
            .env("FLATFS_CACHE_DIR", &cache)
            .env("HOME", &cache)
            .args(["cat", &image, "data/noise.bin", "--tls-verify=false"])
            .output()
            .unwrap();
        assert_success(&out);
        assert!(out.stdout == noise, "noise.bin differs");
    }
    assert!(cache.join(format!("{}.idx", &big[7..])).is_file());
}

/// The size of blob `digest` in a layout.
fn manifest_len(layout: &Path, digest: &str) -> u64 {
    std::fs::metadata(layout.join("blobs/sha256").join(&digest[7..]))
        .unwrap()
        .len()
}

#[test]
fn an_estargz_layers_verified_chunks_are_kept_so_the_next_mount_reads_them_locally() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (esgz, noise, big, size) = estargz_image(tmp.path());
    push_layout(&esgz, &reg.url("esgz:1"));
    if !fuse_available(
        "an_estargz_layers_verified_chunks_are_kept_so_the_next_mount_reads_them_locally",
    ) {
        return;
    }
    let proxy = FaultProxy::start(&reg.host);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = tmp.path().join("cache");
    let image = proxy.url("esgz:1");
    let read = || {
        let from = proxy.seen().len();
        let noise = std::fs::read(mnt.join("data/noise.bin")).unwrap();
        let tail = std::fs::read(mnt.join("data/tail.txt")).unwrap();
        (noise, tail, fetched(&proxy, &big, from, size))
    };
    let ((n1, t1, first), _) = mounted(&cache, &image, &mnt, read);
    assert!(n1 == noise && t1 == b"the end of the big layer\n");
    assert!(
        first.0 >= 4 << 20,
        "the first mount fetched the chunks: {first:?}"
    );
    let ((n2, t2, second), log) = mounted(&cache, &image, &mnt, read);
    assert!(n2 == noise && t2 == b"the end of the big layer\n");
    assert_eq!(second, (0, 0), "the second mount read them locally\n{log}");
    assert!(
        log.contains("bytes of chunks read from the blob store"),
        "{log}"
    );

    // Stored bytes that no longer match are fetched again, never served.
    let partial = cache.join("blobs/partial").join(&big[7..]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&partial)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xa5; 1 << 20], size / 3).unwrap();
    let ((n3, t3, third), _) = mounted(&cache, &image, &mnt, read);
    assert!(
        n3 == noise && t3 == b"the end of the big layer\n",
        "damaged bytes were served"
    );
    // (noise.bin is one chunk: fetched again whole; tail.txt is still read locally.)
    assert_eq!(third.1, 1, "only the damaged chunk fetched: {third:?}");
    // And the fetched bytes mended the stored ones: the next mount reads all locally.
    let ((n4, t4, fourth), _) = mounted(&cache, &image, &mnt, read);
    assert!(n4 == noise && t4 == b"the end of the big layer\n");
    assert_eq!(fourth, (0, 0), "the damaged chunk is stored right now");
}

/// The parsed TOCs lazy mounts kept in `cache`.
fn parsed_tocs(cache: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(cache.join("blobs/toc")) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some("parsed".as_ref()))
        .collect()
}

/// On a host with the image's parsed TOCs (kept by an earlier mount of `image`): those files
/// tampered with are refused, the mount opens the kept TOCs instead (no request for layer
/// `big`), reads right, and writes the parsed TOCs again.
/// A mount on `cache` that reads data/tail.txt: the bytes and requests of blob `big` (`size`
/// bytes) the proxy saw meanwhile, what the read gave, and the server's log.
fn mount_reading_tail(
    cache: &Path,
    image: &str,
    mnt: &Path,
    proxy: &FaultProxy,
    big: &str,
    size: u64,
) -> ((u64, usize), std::io::Result<Vec<u8>>, String) {
    let n = proxy.seen().len();
    let ((at_mount, tail), log) = mounted(cache, image, mnt, || {
        (
            fetched(proxy, big, n, size),
            std::fs::read(mnt.join("data/tail.txt")),
        )
    });
    (at_mount, tail, log)
}

/// Damages the kept TOC `kept` and removes the parsed ones, so a mount must check `kept`.
fn tamper_kept_toc(cache: &Path, kept: &Path) {
    parsed_tocs(cache)
        .iter()
        .for_each(|p| std::fs::remove_file(p).unwrap());
    tamper_tail(kept);
}

fn check_parsed_toc_refused_when_tampered(
    cache: &Path,
    image: &str,
    mnt: &Path,
    proxy: &FaultProxy,
    big: &str,
    size: u64,
) {
    let parsed = parsed_tocs(cache);
    assert!(!parsed.is_empty());
    let good: Vec<_> = parsed.iter().map(|p| std::fs::read(p).unwrap()).collect();
    parsed.iter().for_each(|p| tamper_tail(p));
    let (at_mount, again, log) = mount_reading_tail(cache, image, mnt, proxy, big, size);
    assert!(
        log.contains("parsed TOC in") && log.contains("does not hold"),
        "{log}"
    );
    assert!(log.contains("TOC kept on this host"), "{log}");
    assert_eq!(at_mount, (0, 0), "{log}");
    assert_eq!(again.unwrap(), b"the end of the big layer\n");
    for (p, good) in parsed.iter().zip(good) {
        assert!(
            std::fs::read(p).unwrap() == good,
            "{} written again",
            p.display()
        );
    }
}

/// Flips a byte near the end of a file (a kept TOC's bytes).
fn tamper_tail(file: &Path) {
    let mut b = std::fs::read(file).unwrap();
    let n = b.len();
    b[n - 100] ^= 0x20;
    std::fs::write(file, b).unwrap();
}

/// An eStargz layer written here from the format's description (containerd/stargz-snapshotter
/// `docs/estargz.md`), not by flatfs's writer: each regular file's contents a gzip member of
/// their own, tar headers and padding in the members between, the TOC (`stargz.index.json`,
/// with the end of the archive) in a member of its own, then the 51-byte footer naming its
/// offset. `files` in blob order, `None` contents for a directory. Returns the blob, the TOC
/// digest, the diff_id, and the member of each regular file as `(name, start, end)`.
#[allow(clippy::type_complexity)]
fn handmade_estargz(
    files: &[(&str, Option<&[u8]>)],
) -> (Vec<u8>, String, String, Vec<(String, u64, u64)>) {
    use std::io::Write as _;
    let gz = |b: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    let (mut blob, mut plain, mut pending) = (Vec::new(), Vec::new(), Vec::new());
    let mut entries = Vec::new();
    let mut members = Vec::new();
    let header = |name: &str, size: u64, dir: bool| {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_mtime(1_700_000_000);
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_cksum();
        h.as_bytes().to_vec()
    };
    for (name, data) in files {
        let h = header(name, data.map_or(0, |d| d.len() as u64), data.is_none());
        pending.extend_from_slice(&h);
        plain.extend_from_slice(&h);
        let Some(data) = data else {
            entries.push(
                serde_json::json!({"name": name, "type": "dir", "mode": 0o755,
                "modtime": "2023-11-14T22:13:20Z"}),
            );
            continue;
        };
        blob.extend(gz(&pending));
        pending.clear();
        let start = blob.len() as u64;
        blob.extend(gz(data));
        members.push((name.to_string(), start, blob.len() as u64));
        plain.extend_from_slice(data);
        let pad = vec![0u8; (512 - data.len() % 512) % 512];
        pending.extend_from_slice(&pad);
        plain.extend_from_slice(&pad);
        let d = digest_of(data);
        entries.push(
            serde_json::json!({"name": name, "type": "reg", "size": data.len(),
            "mode": 0o644, "modtime": "2023-11-14T22:13:20Z", "offset": start,
            "digest": d, "chunkDigest": d}),
        );
    }
    let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries})).unwrap();
    // The padding after the last file closes the member before the TOC's.
    blob.extend(gz(&pending));
    let toc_at = blob.len() as u64;
    let mut toc = header("stargz.index.json", json.len() as u64, false);
    toc.extend_from_slice(&json);
    toc.resize(toc.len() + (512 - json.len() % 512) % 512 + 1024, 0);
    plain.extend_from_slice(&toc);
    blob.extend(gz(&toc));
    // The footer: an empty gzip member whose extra field holds subfield "SG" with the TOC
    // offset in 16 hex digits and "STARGZ".
    let mut footer = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    footer.extend_from_slice(format!("{toc_at:016x}STARGZ").as_bytes());
    footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(footer.len(), 51);
    blob.extend(footer);
    (blob, digest_of(&json), digest_of(&plain), members)
}

#[test]
fn registry_estargz_prefetch_landmark_fetches_the_first_files_before_any_read() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let first = noise(0x5eed_0001, 300_000);
    let later = noise(0x5eed_0002, 300_000);
    let files: [(&str, Option<&[u8]>); 6] = [
        ("data/", None),
        ("data/first.bin", Some(&first)),
        ("data/second.txt", Some(b"read at start\n")),
        (".prefetch.landmark", Some(&[0xf])),
        ("data/later.bin", Some(&later)),
        ("data/last.txt", Some(b"read later\n")),
    ];
    let (blob, toc_digest, diff_id, members) = handmade_estargz(&files);
    // An independent reader: GNU tar takes the blob as the ordinary gzip'd tar it also is.
    let file = tmp.path().join("layer.tar.gz");
    std::fs::write(&file, &blob).unwrap();
    let out = Command::new("tar").arg("-tzf").arg(&file).output().unwrap();
    assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "data/\ndata/first.bin\ndata/second.txt\n.prefetch.landmark\ndata/later.bin\n\
         data/last.txt\nstargz.index.json\n"
    );
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": host_arch(), "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let layer = digest_of(&blob);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest_of(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer, "size": blob.len(),
            "annotations": {"containerd.io/snapshot/stargz/toc.digest": toc_digest}}],
    }))
    .unwrap();
    reg.put_raw(
        "landmark",
        &[blob.clone(), config],
        &[(
            "1".into(),
            "application/vnd.oci.image.manifest.v1+json".into(),
            manifest,
        )],
    );
    if !fuse_available("registry_estargz_prefetch_landmark_fetches_the_first_files_before_any_read")
    {
        return;
    }
    let proxy = FaultProxy::start(&reg.host);
    let image = proxy.url("landmark:1");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = tmp.path().join("cache");
    // What the landmark asks for: the blob from the first file's member to the next file's
    // (a chunk runs to the next member holding a file's chunk: the padding, headers and the
    // landmark's own member between go along).
    let before = members[3].1 - members[0].1;
    let stats = || -> serde_json::Value {
        let out = flatfs()
            .args(["stats", "--json"])
            .arg(&mnt)
            .output()
            .unwrap();
        assert_success(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let gets = |from: usize| fetched(&proxy, &layer, from, blob.len() as u64);

    // The default: the files before the landmark are fetched with no read, then read locally.
    let ((prefetched, fg, read_first, read_later), log) = mounted(&cache, &image, &mnt, || {
        let start = std::time::Instant::now();
        let mut v = stats();
        while v["layers"][0]["prefetched_bytes"].as_u64() != Some(before)
            && start.elapsed().as_secs() < 30
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
            v = stats();
        }
        let n = proxy.seen().len();
        let fg = (
            std::fs::read(mnt.join("data/first.bin")).unwrap(),
            std::fs::read(mnt.join("data/second.txt")).unwrap(),
        );
        let read_first = gets(n);
        let later = std::fs::read(mnt.join("data/later.bin")).unwrap();
        let read_later = gets(n);
        (v, fg, read_first, (later, read_later))
    });
    let layer_stats = &prefetched["layers"][0];
    assert_eq!(prefetched["prefetch"], "landmark", "{prefetched}");
    assert_eq!(layer_stats["toc"], "eStargz", "{prefetched}");
    assert_eq!(
        layer_stats["prefetched_bytes"], before,
        "{prefetched}\n{log}"
    );
    assert_eq!(layer_stats["landmark_bytes"], before, "{prefetched}");
    assert_eq!(prefetched["content"]["read_bytes"], 0, "no read did it");
    assert!(log.contains("landmark prefetch done"), "{log}");
    // Prefetched bytes, checked, served with no request; after the landmark, fetched on read.
    assert!(fg.0 == first, "data/first.bin differs");
    assert_eq!(fg.1, b"read at start\n");
    assert_eq!(read_first, (0, 0), "{log}");
    assert!(read_later.0 == later, "data/later.bin differs");
    assert_eq!(read_later.1.1, 1, "{log}");
    assert!(
        read_later.1.0 >= members[3].2 - members[3].1,
        "{read_later:?}"
    );

    // `--prefetch none`: nothing but what is read (the TOC is kept from the first mount).
    let n = proxy.seen().len();
    let (v, _) = mounted_with(&cache, &image, &mnt, &["--prefetch", "none"], || {
        std::thread::sleep(std::time::Duration::from_millis(1000));
        stats()
    });
    assert_eq!(v["layers"][0]["prefetched_bytes"], 0, "{v}");
    assert_eq!(gets(n), (0, 0));
}

#[test]
fn prefetch_all_makes_an_estargz_layer_local_for_this_mount_and_the_next() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (esgz, noise, big, size) = estargz_image(tmp.path());
    push_layout(&esgz, &reg.url("esgz:1"));
    if !fuse_available("prefetch_all_makes_an_estargz_layer_local_for_this_mount_and_the_next") {
        return;
    }
    let proxy = FaultProxy::start(&reg.host);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = tmp.path().join("cache");
    let image = proxy.url("esgz:1");
    let stats = |mnt: &Path| -> serde_json::Value {
        let out = flatfs()
            .env("FLATFS_CACHE_DIR", &cache)
            .env("HOME", &cache)
            .args(["stats", "--json"])
            .arg(mnt)
            .output()
            .unwrap();
        assert_success(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (layer, log) = mounted_with(&cache, &image, &mnt, &["--prefetch", "all"], || {
        // No read: the prefetch alone brings the layer's chunks.
        let t = std::time::Instant::now();
        loop {
            let st = stats(&mnt);
            let l = st["layers"][0].clone();
            if l["local_bytes"].as_u64().unwrap() >= size - 64 * 1024 || t.elapsed().as_secs() > 60
            {
                break l;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    assert!(
        layer["local_bytes"].as_u64().unwrap() >= size - 64 * 1024,
        "not all local after the prefetch: {layer}\n{log}"
    );
    assert!(layer["prefetched_bytes"].as_u64().unwrap() > 0, "{layer}");
    assert!(!log.contains("nothing to prefetch"), "{log}");
    // The next mount reads every file with no request for the layer.
    let seen = proxy.seen().len();
    let ((whole, tail), _) = mounted(&cache, &image, &mnt, || {
        (
            std::fs::read(mnt.join("data/noise.bin")).unwrap(),
            std::fs::read(mnt.join("data/tail.txt")).unwrap(),
        )
    });
    assert!(whole == noise && tail == b"the end of the big layer\n");
    assert_eq!(fetched(&proxy, &big, seen, size), (0, 0));
}

#[test]
fn index_push_of_an_estargz_image_skips_its_toc_layer_and_pushes_nothing() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (esgz, _, layer, _) = estargz_image(tmp.path());
    reg.push(&format!("oci:{}:latest", esgz.display()), "esgz:1");
    let cache = tmp.path().join("cache");
    let run = |args: &[&str]| {
        flatfs()
            .env("FLATFS_CACHE_DIR", &cache)
            .args(args)
            .output()
            .expect("run flatfs")
    };
    // The trial: "layer 1 (sha256:…): its index has no span digests", exit 1, and a 0-byte
    // partial blob in `cache ls`.
    let out = run(&["index", "push", &reg.url("esgz:1"), "--tls-verify=false"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_success(&out);
    assert!(
        err.contains(&format!(
            "layer 1 ({}) carries its own eStargz TOC; a lazy mount needs no index for it",
            &layer[..19]
        )) && err.contains("no layer needs an index: nothing pushed"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let tags = reg.tags("esgz");
    assert_eq!(tags, vec!["1".to_string()], "an artifact was pushed");
    let ls = run(&["cache", "ls"]);
    assert_success(&ls);
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(!listing.contains("partial"), "{listing}");
}
