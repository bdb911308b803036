//! Random access into gzip layers (issue 4): the checkpoints recorded while indexing a layer,
//! kept in the index cache, let a read anywhere in a layer start near its offset. Every read is
//! compared with the plainly decompressed layer. Multi-frame zstd layers get checkpoints at frame
//! starts the same way; the mount test checks, through the server's
//! I/O counters, that reading a file at the end of a big layer does not decompress all of it.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use flatfs::cache::Cache;
use flatfs::mount::is_mounted;
use flatfs::tree::Extent;
use flatfs::zran::{Checkpoints, SPAN};
use flatfs::{IndexOptions, Opened};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::util::*;

/// Bytes that compress about 3:1, like a layer of programs and text: words with back-references
/// mixed with runs of noise, so deflate blocks stay well under a span.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&[u8]] = &[
        b"/usr/lib/",
        b"x86_64-linux-gnu",
        b"python3",
        b"\n",
        b" ",
        b"libc.so.6",
        b"ELF",
        b"\0\0\0\0",
        b"share/doc/",
        b"copyright",
        b"debian",
        b"GLIBC_2.34",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let r = next();
        if r % 3 == 0 {
            out.extend((0..(r >> 8) % 40).map(|_| (next() >> 24) as u8));
        } else {
            out.extend_from_slice(WORDS[(r >> 8) as usize % WORDS.len()]);
        }
    }
    out.truncate(len);
    out
}

/// A one-layer image of `files` files of `size` bytes, its layer cut into `members` gzip
/// members; returns the layer's tar and where each member starts in it.
fn big_image(dir: &Path, files: usize, size: usize, members: usize) -> (PathBuf, Vec<u8>) {
    let entries = (0..files).map(|i| file(format!("f{i:03}"), filler(i as u64, size)));
    let layer = layer(entries).compression(Compression::GzipMembers(members));
    let tar = layer.tar();
    let path = dir.join("image");
    write_oci_layout(
        std::slice::from_ref(&layer),
        &default_config(std::slice::from_ref(&layer)),
        &path,
        None,
    );
    (path, tar)
}

/// The decompressed offset where the test harness starts gzip member `k` (see `util.rs`).
fn member_start(tar: &[u8], members: usize, k: usize) -> u64 {
    (((tar.len() / members).max(1) | 1) * k) as u64
}

fn open(image: &Path, cache: &Cache) -> Opened {
    flatfs::open_merged_with(
        image.to_str().expect("utf-8 path"),
        None,
        &IndexOptions {
            cache: Some(cache),
            ..IndexOptions::default()
        },
    )
    .expect("open image")
}

fn checkpoints(opened: &Opened) -> Arc<Checkpoints> {
    opened.checkpoints[0]
        .clone()
        .expect("a gzip or multi-frame zstd layer has checkpoints")
}

/// The whole of the first layer's tar, as if it were one file.
fn whole_layer(tar_len: u64) -> Extent<'static> {
    Extent {
        layer: 0,
        offset: 0,
        size: tar_len,
        sparse: None,
    }
}

/// Reads `len` bytes of the layer's tar at `offset` through the image's content reader.
fn read_tar(content: &flatfs::content::Content, tar_len: u64, offset: u64, len: usize) -> Vec<u8> {
    let extent = whole_layer(tar_len);
    let mut buf = vec![0; len];
    let n = content
        .read_at(&extent, offset, &mut buf)
        .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
    buf.truncate(n);
    buf
}

#[track_caller]
fn assert_range(got: &[u8], tar: &[u8], offset: u64, len: usize) {
    let start = (offset as usize).min(tar.len());
    let want = &tar[start..(start + len).min(tar.len())];
    if got != want {
        let diff = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{len} bytes at {offset}: got {} bytes, want {}; first difference at {diff:?}",
            got.len(),
            want.len()
        );
    }
}

#[test]
fn reads_at_every_checkpoint_and_both_ends_of_a_multi_member_layer() {
    let tmp = TempDir::new().expect("tempdir");
    let (image, tar) = big_image(tmp.path(), 48, 130_000, 3);
    let cache = Cache::new(tmp.path().join("cache"));
    let opened = open(&image, &cache);
    let points = checkpoints(&opened);
    let tar_len = tar.len() as u64;
    assert!(
        points.len() as u64 >= tar_len / SPAN / 2,
        "{} checkpoints for {tar_len} bytes",
        points.len()
    );
    for later in [1, 2] {
        let (start, end) = (
            member_start(&tar, 3, later),
            member_start(&tar, 3, later + 1).min(tar_len),
        );
        assert!(
            points
                .points()
                .iter()
                .any(|p| p.output > start && p.output < end),
            "no checkpoint inside member {later} ({start}..{end}): {points:?}"
        );
    }
    let content = opened.content();
    // Backwards, so the cursors that earlier reads leave behind are never the way in.
    for p in points.points().iter().rev() {
        for offset in [p.output - 1, p.output, p.output + 1] {
            for len in [1, 3, 70_000] {
                assert_range(&read_tar(&content, tar_len, offset, len), &tar, offset, len);
            }
        }
    }
    for (offset, len) in [
        (tar_len - 1, 1),
        (tar_len - 1, 100),
        (0, 1),
        (tar_len - 5000, 5000),
    ] {
        assert_range(&read_tar(&content, tar_len, offset, len), &tar, offset, len);
    }
    // And once all the way through, in reads the size the kernel makes.
    let mut offset = 0;
    while offset < tar_len {
        let got = read_tar(&content, tar_len, offset, 128 * 1024);
        assert_range(&got, &tar, offset, 128 * 1024);
        offset += got.len() as u64;
    }
}

#[test]
fn concurrent_readers_of_one_span_all_get_the_layer_bytes() {
    let tmp = TempDir::new().expect("tempdir");
    let (image, tar) = big_image(tmp.path(), 24, 130_000, 1);
    let opened = open(&image, &Cache::new(tmp.path().join("cache")));
    let points = checkpoints(&opened);
    let p = &points.points()[points.len() / 2];
    let (start, end) = (p.output - 200_000, p.output + 400_000);
    let content = opened.content();
    let tar_len = tar.len() as u64;
    thread::scope(|s| {
        for t in 0..8u64 {
            let (content, tar) = (&content, &tar);
            s.spawn(move || {
                let mut x = t * 7919 + 1;
                for _ in 0..30 {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let offset = start + (x >> 33) % (end - start);
                    let len = 1 + ((x >> 11) % 150_000) as usize;
                    assert_range(&read_tar(content, tar_len, offset, len), tar, offset, len);
                }
            });
        }
    });
}

#[test]
fn a_multi_frame_zstd_layer_is_read_from_its_frame_starts() {
    let tmp = TempDir::new().expect("tempdir");
    let entries = (0..40).map(|i| file(format!("f{i:03}"), filler(i as u64, 130_000)));
    let layer = layer(entries).compression(Compression::ZstdFrames(200_001));
    let tar = layer.tar();
    let tar_len = tar.len() as u64;
    let image = tmp.path().join("image");
    write_oci_layout(
        std::slice::from_ref(&layer),
        &default_config(std::slice::from_ref(&layer)),
        &image,
        None,
    );
    let cache = Cache::new(tmp.path().join("cache"));
    // An export first: it indexes without frame starts (it reads a spooled copy), so it must
    // not leave that index in the cache for the reads below.
    let out = flatfs()
        .env("FLATFS_CACHE_DIR", cache.dir())
        .args(["export", "-q", "--format", "rootfs", "-o"])
        .arg(tmp.path().join("rootfs.tar"))
        .arg(&image)
        .output()
        .expect("run flatfs export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Indexed, then from the cache: the same frame starts both times.
    let first = checkpoints(&open(&image, &cache));
    let opened = open(&image, &cache);
    let points = checkpoints(&opened);
    assert_eq!(*first, *points);
    assert!(
        points.len() as u64 >= tar_len / SPAN - 1,
        "{} checkpoints for {tar_len} bytes",
        points.len()
    );
    assert!(points.points().iter().all(|p| p.output % 200_001 == 0));
    let content = opened.content();
    for p in points.points().iter().rev() {
        for offset in [p.output - 1, p.output, p.output + 1] {
            assert_range(
                &read_tar(&content, tar_len, offset, 1000),
                &tar,
                offset,
                1000,
            );
        }
    }
    // With everything before the last frame start wrecked, the end of the layer still reads:
    // the read starts at that frame, not at the start of the layer.
    let last = points.points().last().expect("checkpoints").clone();
    let blob = fs::read_dir(image.join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("entry").path())
        .find(|p| fs::metadata(p).expect("stat").len() > last.input)
        .expect("the layer blob");
    let fresh = open(&image, &cache).content();
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new()
            .write(true)
            .open(&blob)
            .expect("open blob"),
        &vec![0xff; last.input as usize],
        0,
    )
    .expect("wreck");
    let at = tar_len - 3000;
    assert_range(&read_tar(&fresh, tar_len, at, 3000), &tar, at, 3000);
    let extent = whole_layer(tar_len);
    assert!(fresh.read_at(&extent, 10, &mut [0; 10]).is_err());
}

/// The one cache file of a single-layer image.
fn cache_file(cache: &Cache) -> PathBuf {
    let files: Vec<_> = fs::read_dir(cache.dir())
        .expect("cache dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

#[test]
fn a_corrupt_or_stale_cache_file_is_rebuilt_with_the_same_checkpoints() {
    let tmp = TempDir::new().expect("tempdir");
    let (image, tar) = big_image(tmp.path(), 24, 130_000, 2);
    let cache = Cache::new(tmp.path().join("cache"));
    let first = checkpoints(&open(&image, &cache));
    let path = cache_file(&cache);
    let cpt = path.with_extension("cpt");
    let good = fs::read(&path).expect("cache file");
    let good_cpt = fs::read(&cpt).expect("checkpoints file");
    // The windows, one zstd frame each, make up the checkpoints file; the index names them.
    assert!(good_cpt.len() as u64 > first.window_bytes() as u64 / 8);
    assert!((good.len() as u64) < first.window_bytes() as u64);

    // In the middle of the first window's frame.
    let mut flipped = good_cpt.clone();
    flipped[good_cpt.len() / (2 * first.len())] ^= 0x01;
    // A file of an older format, with a checksum that holds: ignored all the same.
    let mut stale = good[..good.len() - 32].to_vec();
    stale[8..12].copy_from_slice(&1u32.to_le_bytes());
    stale.extend_from_slice(&Sha256::digest(&stale));
    let truncated = good[..good.len() - 1000].to_vec();
    let truncated_cpt = good_cpt[..good_cpt.len() - 1000].to_vec();

    for (what, file, bad) in [
        ("flipped window", &cpt, Some(flipped)),
        ("stale", &path, Some(stale)),
        ("truncated", &path, Some(truncated)),
        ("truncated checkpoints", &cpt, Some(truncated_cpt)),
        ("missing checkpoints", &cpt, None),
    ] {
        match bad {
            Some(bad) => fs::write(file, &bad).expect("write bad cache file"),
            None => fs::remove_file(file).expect("remove"),
        }
        // Without its merged tree, so the layer's index is needed whole: a tree hit reads only
        // the index's head (tests/it/cache.rs), and a damaged body waits for the next miss.
        for e in fs::read_dir(cache.dir()).expect("cache dir").flatten() {
            if e.path().extension().is_some_and(|x| x == "tree") {
                fs::remove_file(e.path()).expect("remove tree");
            }
        }
        let opened = open(&image, &cache);
        assert_eq!(
            checkpoints(&opened),
            first,
            "{what}: rebuilt checkpoints differ"
        );
        assert_eq!(
            fs::read(&path).expect("cache file"),
            good,
            "{what}: the cache file was not rewritten"
        );
        assert_eq!(
            fs::read(&cpt).expect("checkpoints file"),
            good_cpt,
            "{what}: the checkpoints file was not rewritten"
        );
        let content = opened.content();
        let tar_len = tar.len() as u64;
        for p in first.points() {
            assert_range(
                &read_tar(&content, tar_len, p.output - 2, 4),
                &tar,
                p.output - 2,
                4,
            );
        }
    }
    // `cache ls` lists the checkpoints file beside its index, `cache clear` removes both.
    let run = |args: &[&str]| {
        let out = flatfs()
            .env("FLATFS_CACHE_DIR", cache.dir())
            .args(args)
            .output()
            .expect("run flatfs");
        assert_success(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ls = run(&["cache", "ls"]);
    assert!(ls.contains("gzip checkpoint windows"), "{ls}");
    run(&["cache", "clear"]);
    assert!(!cpt.exists() && !path.exists());
}

// ---------------------------------------------------------------------------------------
// Through a real mount

/// A foreground `flatfs mount -f`, unmounted and stopped on drop whatever the test did.
struct Served {
    mnt: PathBuf,
    server: Child,
}

impl Served {
    fn start(image: &Path, mnt: &Path, cache: &Path) -> Self {
        Self::start_with(image, mnt, cache, &[])
    }

    fn start_with(image: &Path, mnt: &Path, cache: &Path, options: &[&str]) -> Self {
        let server = flatfs()
            .env("FLATFS_CACHE_DIR", cache)
            .args(["mount", "-f"])
            .args(options)
            .arg(image)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn flatfs mount -f");
        let served = Served {
            mnt: mnt.to_path_buf(),
            server,
        };
        let start = Instant::now();
        while !is_mounted(mnt) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mount never appeared"
            );
            thread::sleep(Duration::from_millis(10));
        }
        served
    }

    /// Bytes the server has read with read(2)/pread(2) so far: blob reads, mostly. `None`
    /// where the kernel keeps no I/O accounting.
    fn bytes_read(&self) -> Option<u64> {
        let io = fs::read_to_string(format!("/proc/{}/io", self.server.id())).ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = flatfs().arg("umount").arg(&self.mnt).output();
        }
        if is_mounted(&self.mnt) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .output();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn read_file(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut out))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

#[test]
fn reading_the_last_file_of_a_big_gzip_layer_does_not_decompress_the_layer() {
    if !fuse_available("reading_the_last_file_of_a_big_gzip_layer_does_not_decompress_the_layer") {
        return;
    }
    let tmp = TempDir::new().expect("tempdir");
    // Incompressible, so the blob is as big as the layer and bytes read measure the work.
    let big = noise(1, 8 << 20);
    let last = b"the last file\n".repeat(10);
    let layer = layer([file("big", &big), file("zz/last", &last)]).compression(Compression::Gzip);
    let image = tmp.path().join("image");
    let layers = std::slice::from_ref(&layer);
    write_oci_layout(layers, &default_config(layers), &image, None);
    let blob_len = layer.blob(Compression::Gzip).bytes.len() as u64;
    let cache = tmp.path().join("cache");

    // Cold: the mount builds the index; warm: it loads it, checkpoints included, from the cache.
    for round in ["cold cache", "warm cache"] {
        let mnt = tmp.path().join("mnt");
        fs::create_dir_all(&mnt).expect("mountpoint");
        let served = Served::start(&image, &mnt, &cache);
        let before = served.bytes_read();
        assert_eq!(read_file(&mnt.join("zz/last")), last, "{round}");
        let after_one = served.bytes_read();
        assert!(
            read_file(&mnt.join("big")) == big,
            "{round}: big file differs"
        );
        let after_all = served.bytes_read();
        let (Some(before), Some(after_one), Some(after_all)) = (before, after_one, after_all)
        else {
            eprintln!("{round}: no /proc/PID/io here: contents checked, work not measured");
            continue;
        };
        let (one_file, whole) = (after_one - before, after_all - after_one);
        assert!(
            whole >= blob_len * 9 / 10,
            "{round}: {whole} bytes read for the big file"
        );
        assert!(
            one_file * 4 < whole,
            "{round}: reading the last file read {one_file} bytes; the whole layer is \
             {blob_len} bytes and reading all of it read {whole}"
        );
        drop(served);
    }
}

/// Whether every page of a file is in the page cache, found without reading it.
fn resident(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = file.metadata().expect("stat").len() as usize;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
    let mut pages = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of an open file of `len` bytes, unmapped before the
    // file closes; mincore writes one byte per page of it into `pages`, which has that many.
    let rc = unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED, "mmap {}", path.display());
        let rc = libc::mincore(ptr, len, pages.as_mut_ptr());
        libc::munmap(ptr, len);
        rc
    };
    assert_eq!(rc, 0, "mincore {}", path.display());
    pages.iter().all(|p| p & 1 == 1)
}

#[test]
fn listing_a_directory_pushes_its_small_files_into_the_page_cache() {
    if !fuse_available("listing_a_directory_pushes_its_small_files_into_the_page_cache") {
        return;
    }
    let tmp = TempDir::new().expect("tempdir");
    let small: Vec<Vec<u8>> = (0..120)
        .map(|i| filler(i, 1000 + 37 * i as usize))
        .collect();
    let big = filler(999, 100_000);
    let entries = small
        .iter()
        .enumerate()
        .map(|(i, data)| file(format!("d/s{i:03}"), data))
        .chain([file("d/zbig", &big)]);
    let layer = layer(entries).compression(Compression::Gzip);
    let image = tmp.path().join("image");
    let layers = std::slice::from_ref(&layer);
    write_oci_layout(layers, &default_config(layers), &image, None);
    let cache = tmp.path().join("cache");
    for prefetch in [true, false] {
        let mnt = tmp.path().join("mnt");
        fs::create_dir_all(&mnt).expect("mountpoint");
        let options: &[&str] = if prefetch { &[] } else { &["--no-prefetch"] };
        let served = Served::start_with(&image, &mnt, &cache, options);
        let listed = fs::read_dir(mnt.join("d")).expect("list d").count();
        assert_eq!(listed, small.len() + 1);
        // The pushes run on a thread of the server's own, after the listing: give them time.
        let paths: Vec<PathBuf> = (0..small.len())
            .map(|i| mnt.join(format!("d/s{i:03}")))
            .collect();
        let start = Instant::now();
        while prefetch
            && !paths.iter().all(|p| resident(p))
            && start.elapsed() < Duration::from_secs(20)
        {
            thread::sleep(Duration::from_millis(20));
        }
        if !prefetch {
            thread::sleep(Duration::from_millis(300));
        }
        for path in &paths {
            assert_eq!(
                resident(path),
                prefetch,
                "{} (prefetch {prefetch})",
                path.display()
            );
        }
        // Over the size limit: never pushed.
        assert!(!resident(&mnt.join("d/zbig")));
        for (i, data) in small.iter().enumerate() {
            assert!(
                read_file(&mnt.join(format!("d/s{i:03}"))) == *data,
                "s{i:03} differs"
            );
        }
        assert!(read_file(&mnt.join("d/zbig")) == big);
        drop(served);
    }
}

#[test]
fn cat_reads_the_end_of_a_multi_member_layer() {
    let tmp = TempDir::new().expect("tempdir");
    let (image, tar) = big_image(tmp.path(), 24, 130_000, 4);
    let out = flatfs()
        .arg("--no-cache")
        .args(["cat"])
        .arg(&image)
        .args(["f023", "f000", "f012"])
        .output()
        .expect("run flatfs cat");
    assert_success(&out);
    let files = tar_files(&tar);
    let want: Vec<u8> = ["f023", "f000", "f012"]
        .iter()
        .flat_map(|f| files[*f].clone())
        .collect();
    assert!(out.stdout == want, "flatfs cat gave other bytes");
}

/// The layer blob of the one-layer OCI layout `dir` and its diff_id.
fn only_layer(dir: &Path) -> (Vec<u8>, String) {
    let json = |digest: &str| -> serde_json::Value {
        let path = dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&fs::read(&path).expect("blob")).expect("json")
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).expect("index")).expect("json");
    let manifest = json(index["manifests"][0]["digest"].as_str().expect("manifest"));
    let config = json(manifest["config"]["digest"].as_str().expect("config"));
    let layer = manifest["layers"][0]["digest"].as_str().expect("layer");
    let blob = fs::read(dir.join("blobs/sha256").join(&layer[7..])).expect("layer blob");
    let diff_id = config["rootfs"]["diff_ids"][0].as_str().expect("diff_id");
    (blob, diff_id.to_string())
}

/// flatfs's own zstd export (issue 15, item 2) is many frames plus the seekable format's frame
/// table: one stream that `zstd -d` reads whole, that flatfs enters at its frame starts (so a
/// file at the end of the layer is read without decompressing the layer), and the same bytes
/// whatever the number of cores.
#[test]
fn a_zstd_export_is_one_stream_for_zstd_and_seekable_for_flatfs() {
    let found = std::process::Command::new("zstd").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "this test needs zstd (scripts/test.sh installs it)"
    );
    let tmp = TempDir::new().expect("tempdir");
    // Incompressible, so blob bytes read measure decompression work.
    let mut entries: Vec<_> = (0..12)
        .map(|i| file(format!("d/f{i:02}"), noise(100 + i, 1 << 20)))
        .collect();
    let last = b"the last file of the layer\n".repeat(20);
    entries.push(file("zz/last", &last));
    let source = layer(entries).compression(Compression::Gzip);
    let image = tmp.path().join("image");
    let layers = std::slice::from_ref(&source);
    write_oci_layout(layers, &default_config(layers), &image, None);

    let export = |out: &Path, one_core: bool| {
        let mut cmd = if one_core {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", "0"]).arg(env!("CARGO_BIN_EXE_flatfs"));
            c
        } else {
            flatfs()
        };
        let res = cmd
            .args([
                "--no-cache",
                "export",
                "-q",
                "--format",
                "oci",
                "--compression",
                "zstd",
            ])
            .arg(&image)
            .arg("-o")
            .arg(out)
            .output()
            .expect("run flatfs export");
        assert_success(&res);
        only_layer(out)
    };
    let flat = tmp.path().join("flat");
    let (blob, diff_id) = export(&flat, false);
    let (again, _) = export(&tmp.path().join("flat1"), true);
    assert!(
        blob == again,
        "zstd output differs between 1 core and all cores"
    );

    // The seekable format's footer: frames, descriptor, magic 0x8F92EAB1.
    let tail = &blob[blob.len() - 9..];
    let frames = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
    assert_eq!(tail[5..], [0xb1, 0xea, 0x92, 0x8f]);
    assert!(frames >= 6, "{frames} frames for 12 MiB of tar");

    // zstd reads it as one stream, skipping the frame table, and gives the diff_id's tar.
    let zst = tmp.path().join("layer.tar.zst");
    fs::write(&zst, &blob).expect("write blob");
    let out = std::process::Command::new("zstd")
        .args(["-dc", "-q"])
        .arg(&zst)
        .output()
        .expect("run zstd");
    assert!(out.status.success(), "zstd -d: {}", stderr_of(&out));
    assert_eq!(digest_of(&out.stdout), diff_id);
    assert_eq!(tar_files(&out.stdout)["zz/last"], last);

    // flatfs finds a checkpoint at every frame start and reads from them.
    let cache = Cache::new(tmp.path().join("cache"));
    let points = checkpoints(&open(&flat, &cache));
    assert!(
        points.len() as u32 >= frames - 1,
        "{} checkpoints for {frames} frames",
        points.len()
    );
    let cat = flatfs()
        .env("FLATFS_CACHE_DIR", cache.dir())
        .arg("cat")
        .arg(&flat)
        .args(["zz/last", "d/f07"])
        .output()
        .expect("run flatfs cat");
    assert_success(&cat);
    assert!(cat.stdout == [&last[..], &noise(107, 1 << 20)].concat());

    if !fuse_available("a_zstd_export_is_one_stream_for_zstd_and_seekable_for_flatfs") {
        return;
    }
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).expect("mountpoint");
    let served = Served::start(&flat, &mnt, cache.dir());
    let before = served.bytes_read();
    assert_eq!(read_file(&mnt.join("zz/last")), last);
    let after = served.bytes_read();
    for i in (0..12).rev() {
        assert!(
            read_file(&mnt.join(format!("d/f{i:02}"))) == noise(100 + i, 1 << 20),
            "d/f{i:02} differs"
        );
    }
    if let (Some(before), Some(after)) = (before, after) {
        assert!(
            (after - before) * 4 < blob.len() as u64,
            "reading the last file read {} bytes of a {}-byte layer",
            after - before,
            blob.len()
        );
    }
}

/// flatfs's own gzip export deflates 1 MiB blocks without a dictionary and says so in its
/// header (issue 15, item 2): indexing it keeps checkpoints at block starts with no 32 KiB
/// window, and reads from them give the layer's bytes.
#[test]
fn a_gzip_export_is_indexed_without_windows() {
    let tmp = TempDir::new().expect("tempdir");
    let entries = (0..6).map(|i| file(format!("f{i}"), filler(200 + i, 1 << 20)));
    let source = layer(entries).compression(Compression::Gzip);
    let image = tmp.path().join("image");
    let layers = std::slice::from_ref(&source);
    write_oci_layout(layers, &default_config(layers), &image, None);
    let flat = tmp.path().join("flat");
    let res = flatfs()
        .args([
            "--no-cache",
            "export",
            "-q",
            "--format",
            "oci",
            "--compression",
            "gzip",
        ])
        .arg(&image)
        .arg("-o")
        .arg(&flat)
        .output()
        .expect("run flatfs export");
    assert_success(&res);
    let (blob, diff_id) = only_layer(&flat);
    let tar = decompress(&blob);
    assert_eq!(digest_of(&tar), diff_id);
    let cache = Cache::new(tmp.path().join("cache"));
    let opened = open(&flat, &cache);
    let points = checkpoints(&opened);
    assert!(points.len() >= 5, "{points:?}");
    assert_eq!(points.window_bytes(), 0, "{:?}", points.points());
    let content = opened.content();
    let tar_len = tar.len() as u64;
    for p in points.points().iter().rev() {
        assert_range(
            &read_tar(&content, tar_len, p.output, 5000),
            &tar,
            p.output,
            5000,
        );
    }
}
