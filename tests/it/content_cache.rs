//! The decompressed-content cache through real mounts (issue 15, item 1): a single-frame zstd
//! layer read in random order gives the right bytes, is decompressed about once (counted by the
//! mount's own log, not timed) and leaves `content/DIFFID.tar` in the cache directory, which a
//! later mount uses; a damaged file is detected and replaced; the bound evicts the least
//! recently used; concurrent readers; a full disk leaves reads correct.
//!
//! FUSE tests skip (saying why) only when /dev/fuse is missing, and fail instead under
//! `FLATFS_REQUIRE_FUSE=1`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use flatfs::mount::is_mounted;
use tempfile::TempDir;

use crate::util::*;

/// Files in the test layer, and the size of each (over the 64 KiB the mount pushes into the
/// page cache on a listing, so every read goes through the content path).
const FILES: usize = 120;
const FILE_SIZE: usize = 100_000;

/// Text-like bytes, different for every seed, compressing about 3:1.
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&[u8]] = &[
        b"usr", b"lib", b"share", b"doc", b"the", b"of", b"config", b"x86_64", b"\n", b"/", b" ",
        b"debian", b"python3",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize]);
        if x.is_multiple_of(5) {
            out.push((x >> 32) as u8);
        }
    }
    out.truncate(len);
    out
}

/// The files of a test layer: `fNNN` with content unique to `seed` and the file.
fn files(seed: u64) -> Vec<(String, Vec<u8>)> {
    (0..FILES)
        .map(|i| (format!("f{i:03}"), text(seed * 1000 + i as u64, FILE_SIZE)))
        .collect()
}

/// An OCI layout of one single-frame zstd layer holding `files`; returns its diff_id hex and
/// the tar's length.
fn zstd_image(dir: &Path, files: &[(String, Vec<u8>)]) -> (String, u64) {
    let l = layer(files.iter().map(|(n, d)| file(n.as_str(), d))).compression(Compression::Zstd);
    let tar = l.tar();
    let layers = [l];
    write_oci_layout(&layers, &default_config(&layers), dir, None);
    (sha256_hex(&tar), tar.len() as u64)
}

/// Scattered indexes into the files, deterministic for a seed, each file once.
fn shuffled(seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..FILES).collect();
    let mut x = seed | 1;
    for i in (1..order.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    order
}

/// A foreground mount with its own cache directory; its log (`-vv`) is collected at unmount.
struct Mount {
    mnt: PathBuf,
    server: Option<Child>,
    _tmp: TempDir,
}

impl Mount {
    fn new(image: &Path, cache: &Path, env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).expect("mountpoint");
        let mnt = mnt.canonicalize().expect("canonical");
        let mut cmd = flatfs();
        cmd.env("FLATFS_CACHE_DIR", cache)
            .envs(env.iter().copied())
            .args(["mount", "-f", "-vv"])
            .arg(image)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let server = cmd.spawn().expect("spawn flatfs mount -f");
        let m = Mount {
            mnt,
            server: Some(server),
            _tmp: tmp,
        };
        wait_until(|| is_mounted(&m.mnt), "the mount to appear");
        m
    }

    fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.mnt.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    /// Unmounts, waits for the server, and returns its log.
    fn finish(mut self) -> String {
        let out = flatfs()
            .arg("umount")
            .arg(&self.mnt)
            .output()
            .expect("umount");
        assert_success(&out);
        let mut server = self.server.take().expect("server");
        let mut log = String::new();
        server
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut log)
            .expect("read log");
        let status = server.wait().expect("wait");
        assert!(status.success(), "mount server: {status}\n{log}");
        log
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = flatfs().arg("umount").arg(&self.mnt).output();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
        if let Some(server) = &mut self.server {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

fn wait_until(mut ok: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// (block reads, content cache) decompressed bytes of layer 1, from the mount's log.
fn decompressed(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("layer 1: decompressed"))
        .unwrap_or_else(|| panic!("no decompression count in the log:\n{log}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 2, "{line}");
    (numbers[0], numbers[1])
}

fn cache_file(cache: &Path, diff_id: &str) -> PathBuf {
    cache.join("content").join(format!("{diff_id}.tar"))
}

/// Reads every file in a scattered order and checks it.
fn read_all_shuffled(m: &Mount, files: &[(String, Vec<u8>)], seed: u64) {
    for i in shuffled(seed) {
        let (name, data) = &files[i];
        assert!(m.read(name) == *data, "{name}: wrong bytes");
    }
}

macro_rules! require_fuse {
    ($name:expr) => {
        if !fuse_available($name) {
            return;
        }
    };
}

#[test]
fn a_single_frame_zstd_layer_read_in_random_order_is_decompressed_about_once() {
    require_fuse!("a_single_frame_zstd_layer_read_in_random_order_is_decompressed_about_once");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let image = tmp.path().join("image");
    let files = files(1);
    let (diff_id, tar_len) = zstd_image(&image, &files);

    let m = Mount::new(&image, &cache, &[]);
    read_all_shuffled(&m, &files, 7);
    let file = cache_file(&cache, &diff_id);
    wait_until(|| file.exists(), "the cache file");
    let log = m.finish();
    let (blocks, pass) = decompressed(&log);
    assert_eq!(pass, tar_len, "{log}");
    // Before the pass: at most the read that started it (from the start of the layer).
    assert!(
        blocks + pass <= tar_len * 3 / 2,
        "{blocks} + {pass} bytes decompressed for a {tar_len}-byte layer"
    );
    let cached = fs::read(&file).expect("cache file");
    assert_eq!(cached.len() as u64, tar_len);
    assert_eq!(sha256_hex(&cached), diff_id);

    // A second mount verifies the file and decompresses nothing once it has.
    let m = Mount::new(&image, &cache, &[]);
    read_all_shuffled(&m, &files, 8);
    let (_, pass) = decompressed(&m.finish());
    assert_eq!(pass, 0);

    // `flatfs cache` shows and clears it.
    let env_cache = |args: &[&str]| {
        let out = flatfs()
            .env("FLATFS_CACHE_DIR", &cache)
            .args(args)
            .output()
            .expect("flatfs cache");
        assert_success(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ls = env_cache(&["cache", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.contains(&diff_id) && l.contains("decompressed layer")),
        "{ls}"
    );
    assert!(env_cache(&["cache", "du"]).contains("1 decompressed layers"));
    env_cache(&["cache", "clear"]);
    assert!(!file.exists());
}

#[test]
fn a_damaged_cache_file_is_detected_and_not_used() {
    require_fuse!("a_damaged_cache_file_is_detected_and_not_used");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let image = tmp.path().join("image");
    let files = files(2);
    let (diff_id, tar_len) = zstd_image(&image, &files);
    let file = cache_file(&cache, &diff_id);
    let m = Mount::new(&image, &cache, &[]);
    read_all_shuffled(&m, &files, 9);
    wait_until(|| file.exists(), "the cache file");
    m.finish();

    // Flip bytes inside the last file's data (same length), then read it first.
    let mut bytes = fs::read(&file).expect("cache file");
    let at = bytes.len() - 20_000;
    for b in &mut bytes[at..at + 100] {
        *b ^= 0x5a;
    }
    fs::write(&file, &bytes).expect("damage");
    let m = Mount::new(&image, &cache, &[]);
    read_all_shuffled(&m, &files, 10);
    wait_until(
        || fs::read(&file).is_ok_and(|b| sha256_hex(&b) == diff_id),
        "the file to be rebuilt",
    );
    let log = m.finish();
    assert!(log.contains("does not hold layer"), "{log}");
    assert_eq!(decompressed(&log).1, tar_len, "rebuilt by a pass");
}

#[test]
fn the_bound_evicts_the_least_recently_used_layer() {
    require_fuse!("the_bound_evicts_the_least_recently_used_layer");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (files_a, files_b) = (files(3), files(4));
    let (id_a, len) = zstd_image(&a, &files_a);
    let (id_b, _) = zstd_image(&b, &files_b);
    // Room for one decompressed layer, not two.
    let max = (len * 3 / 2).to_string();
    let env = [("FLATFS_CONTENT_CACHE_MAX", max.as_str())];
    let m = Mount::new(&a, &cache, &env);
    read_all_shuffled(&m, &files_a, 11);
    wait_until(|| cache_file(&cache, &id_a).exists(), "layer a's file");
    m.finish();
    let m = Mount::new(&b, &cache, &env);
    read_all_shuffled(&m, &files_b, 12);
    wait_until(|| cache_file(&cache, &id_b).exists(), "layer b's file");
    wait_until(|| !cache_file(&cache, &id_a).exists(), "layer a's eviction");
    m.finish();

    // A bound smaller than the layer (with a unit, as a user writes it): no file at all,
    // reads as before.
    let small = tmp.path().join("small");
    let env = [("FLATFS_CONTENT_CACHE_MAX", "97K")];
    let m = Mount::new(&a, &small, &env);
    read_all_shuffled(&m, &files_a, 13);
    assert_eq!(decompressed(&m.finish()).1, 0);
    assert!(!small.join("content").exists());
}

#[test]
fn concurrent_readers_get_the_right_bytes() {
    require_fuse!("concurrent_readers_get_the_right_bytes");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let image = tmp.path().join("image");
    let files = files(5);
    let (diff_id, tar_len) = zstd_image(&image, &files);
    let m = Mount::new(&image, &cache, &[]);
    thread::scope(|s| {
        for t in 0..6 {
            let (m, files) = (&m, &files);
            s.spawn(move || read_all_shuffled(m, files, 100 + t));
        }
    });
    wait_until(|| cache_file(&cache, &diff_id).exists(), "the cache file");
    let (_, pass) = decompressed(&m.finish());
    assert_eq!(pass, tar_len, "one pass for all readers");
}

/// A full disk: the cache directory is a 2 MiB tmpfs, the layer 12 MB. Needs root to mount it.
#[test]
fn a_full_disk_leaves_reads_correct() {
    require_fuse!("a_full_disk_leaves_reads_correct");
    if !nix::unistd::Uid::effective().is_root() {
        let msg = "a_full_disk_leaves_reads_correct: SKIPPED: mounting a small tmpfs needs root";
        let required = ["FLATFS_REQUIRE_FUSE", "FLATFS_REQUIRE_TOOLS"]
            .iter()
            .any(|v| std::env::var(v).as_deref() == Ok("1"));
        assert!(!required, "{msg}, and CI requires it to run");
        eprintln!("{msg}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    fs::create_dir(&cache).expect("cache dir");
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "flatfs-test"])
        .arg(&cache)
        .output()
        .expect("mount tmpfs");
    assert_success(&out);
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).output();
        }
    }
    let _unmount = Unmount(&cache);
    let image = tmp.path().join("image");
    let files = files(6);
    zstd_image(&image, &files);
    let m = Mount::new(&image, &cache, &[]);
    read_all_shuffled(&m, &files, 14);
    // Reads after the pass gave up are still right.
    read_all_shuffled(&m, &files, 15);
    let log = m.finish();
    assert!(log.contains("cannot cache layer"), "{log}");
    assert_eq!(log.matches("cannot cache layer").count(), 1, "once: {log}");
    let left: Vec<_> = fs::read_dir(cache.join("content"))
        .expect("content dir")
        .collect();
    assert!(left.is_empty(), "the abandoned file is removed: {left:?}");
}

#[test]
fn two_mounts_of_one_image_share_the_cache_without_harm() {
    require_fuse!("two_mounts_of_one_image_share_the_cache_without_harm");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let image = tmp.path().join("image");
    let files = files(7);
    let (diff_id, _) = zstd_image(&image, &files);
    // Index once, so the two mounts do not race to write the index either.
    assert_success(
        &flatfs()
            .env("FLATFS_CACHE_DIR", &cache)
            .arg("ls")
            .arg(&image)
            .output()
            .expect("flatfs ls"),
    );
    let (a, b) = (
        Mount::new(&image, &cache, &[]),
        Mount::new(&image, &cache, &[]),
    );
    // Both fill the same layer at once: each its own temp file, the last rename wins.
    thread::scope(|s| {
        for (m, seed) in [(&a, 20), (&b, 21)] {
            let files = &files;
            s.spawn(move || read_all_shuffled(m, files, seed));
        }
    });
    let file = cache_file(&cache, &diff_id);
    wait_until(|| file.exists(), "the cache file");
    for log in [a.finish(), b.finish()] {
        assert!(!log.contains("cannot cache"), "{log}");
    }
    assert_eq!(sha256_hex(&fs::read(&file).expect("cache file")), diff_id);
    // The file is anonymous until complete: the mount that lost left nothing behind.
    let names: Vec<_> = fs::read_dir(cache.join("content"))
        .expect("content dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, [file.file_name().expect("name")], "{names:?}");
    // A third mount uses it.
    let m = Mount::new(&image, &cache, &[]);
    read_all_shuffled(&m, &files, 22);
    assert_eq!(decompressed(&m.finish()).1, 0);
}
