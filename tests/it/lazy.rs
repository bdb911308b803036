//! Lazy registry mounts across mounts (issue 14): the persistent span cache, `--prefetch all`,
//! a registry outage mid-mount, tampered spans with the cache, and `flatfs stats`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::registry::{lazy_image, ranged_bytes};
use crate::registry_harness::*;
use crate::util::*;

/// Where the middle of the big file is read: far from the spans the mount and the tail read.
const MIDDLE: u64 = 6 << 20;

/// One host: a cache dir and a runtime dir (for stats files), both in the test's tempdir.
struct Host {
    cache: PathBuf,
    runtime: PathBuf,
    /// `$FLATFS_REGISTRY_TIMEOUT`, seconds.
    timeout: &'static str,
}

impl Host {
    fn new(at: &Path) -> Host {
        let runtime = at.join("run");
        std::fs::create_dir_all(&runtime).unwrap();
        Host {
            cache: at.join("cache"),
            runtime,
            timeout: "10",
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        flatfs()
            .env("FLATFS_CACHE_DIR", &self.cache)
            .env("FLATFS_REGISTRY_TIMEOUT", self.timeout)
            .env("HOME", &self.cache)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_CONFIG")
            .args(args)
            .output()
            .expect("run flatfs")
    }

    fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert_success(&out);
        out.stdout
    }

    fn mount(&self, image: &str, mnt: &Path, extra: &[&str]) {
        let mut args = vec!["mount", image, mnt.to_str().unwrap(), "--tls-verify=false"];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    fn umount(&self, mnt: &Path) {
        self.ok(&["umount", mnt.to_str().unwrap()]);
    }

    fn stats(&self, mnt: &Path) -> Value {
        serde_json::from_slice(&self.ok(&["stats", "--json", mnt.to_str().unwrap()])).unwrap()
    }
}

/// A pushed lazy image, indexed on a host whose blobs are gone since, and a proxy to it.
struct Setup {
    _reg: Registry,
    proxy: FaultProxy,
    host: Host,
    noise: Vec<u8>,
    /// The big layer's digest and its blob.
    big: String,
    blob: Vec<u8>,
    mnt: PathBuf,
    tmp: tempfile::TempDir,
}

fn setup(test: &str) -> Option<Setup> {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, noise, big, _) = lazy_image(tmp.path());
    let blob = std::fs::read(img.join("blobs/sha256").join(&big[7..])).unwrap();
    reg.push(&format!("oci:{}:latest", img.display()), "lazy:1");
    let host = Host::new(tmp.path());
    host.ok(&["ls", "-R", &reg.url("lazy:1"), "--tls-verify=false"]);
    std::fs::remove_dir_all(host.cache.join("blobs")).unwrap();
    if !fuse_available(test) {
        return None;
    }
    let proxy = FaultProxy::start(&reg.host);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    Some(Setup {
        _reg: reg,
        proxy,
        host,
        noise,
        big,
        blob,
        mnt,
        tmp,
    })
}

impl Setup {
    fn image(&self) -> String {
        self.proxy.url("lazy:1")
    }

    fn read_at(&self, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let f = std::fs::File::open(self.mnt.join("data/noise.bin"))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, at)?;
        Ok(buf)
    }

    fn noise_at(&self, at: u64, len: usize) -> &[u8] {
        &self.noise[at as usize..at as usize + len]
    }

    fn partial(&self) -> PathBuf {
        self.host.cache.join("blobs/partial").join(&self.big[7..])
    }

    /// Every span the map marks holds the blob's true bytes in the partial file; returns how
    /// many are marked.
    fn marked_spans_are_true(&self) -> usize {
        let map = std::fs::read(self.partial().with_extension("spans")).unwrap();
        let data = std::fs::read(self.partial()).unwrap();
        assert_eq!(data.len(), self.blob.len());
        let span = 256 * 1024;
        let mut marked = 0;
        for (i, &m) in map.iter().enumerate() {
            if m == 1 {
                let r = i * span..((i + 1) * span).min(data.len());
                assert!(
                    data[r.clone()] == self.blob[r],
                    "span {i} is marked but wrong"
                );
                marked += 1;
            }
        }
        marked
    }
}

/// A layer's entry in `flatfs stats --json`, by layer number.
fn layer_stats(stats: &Value, n: u64) -> &Value {
    stats["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["layer"] == n)
        .unwrap()
}

#[test]
fn lazy_second_mount_reads_what_the_first_fetched_with_no_blob_bytes() {
    let Some(s) = setup("lazy_second_mount_reads_what_the_first_fetched_with_no_blob_bytes") else {
        return;
    };
    s.host.mount(&s.image(), &s.mnt, &[]);
    // The index is in the cache and the manifest says how the layer is compressed: the
    // mount itself asks for none of its bytes.
    let at_mount = ranged_bytes(&s.proxy, &s.big, 0);
    let tail = std::fs::read(s.mnt.join("data/tail.txt")).unwrap();
    let middle = s.read_at(MIDDLE, 100_000).unwrap();
    let first = ranged_bytes(&s.proxy, &s.big, 0);
    // The serving process rewrites the file within a moment of a change.
    let t = Instant::now();
    let stats = loop {
        let st = s.host.stats(&s.mnt);
        if layer_stats(&st, 1)["fetched_bytes"] == first.0 || t.elapsed() > Duration::from_secs(5) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let human = String::from_utf8(s.host.ok(&["stats", s.mnt.to_str().unwrap()])).unwrap();
    s.host.umount(&s.mnt);
    assert_eq!(
        at_mount,
        (0, 0),
        "the mount fetched blob bytes before any read"
    );
    assert_eq!(tail, b"the end of the big layer\n");
    assert_eq!(middle, s.noise_at(MIDDLE, 100_000));
    // The stats count what the registry was asked for.
    let big = layer_stats(&stats, 1);
    assert_eq!(big["lazy"], true, "{stats}");
    assert_eq!(big["fetched_bytes"], first.0, "{stats}");
    assert_eq!(big["requests"], first.1 as u64, "{stats}");
    assert!(
        human.contains("LAYER") && human.contains("FETCHED"),
        "{human}"
    );
    assert!(s.marked_spans_are_true() > 0);
    let ls = String::from_utf8(s.host.ok(&["cache", "ls"])).unwrap();
    assert!(ls.contains(&s.big) && ls.contains("partial"), "{ls}");

    // Again: what was read is local, checked again against the index, fetched from nowhere.
    let seen = s.proxy.seen().len();
    let t = Instant::now();
    s.host.mount(&s.image(), &s.mnt, &[]);
    let mount_time = t.elapsed();
    let tail2 = std::fs::read(s.mnt.join("data/tail.txt")).unwrap();
    let middle2 = s.read_at(MIDDLE, 100_000).unwrap();
    let second = ranged_bytes(&s.proxy, &s.big, seen);
    // The serving process rewrites the stats within a moment of the reads.
    let t = Instant::now();
    let stats2 = loop {
        let st = s.host.stats(&s.mnt);
        if layer_stats(&st, 1)["spans_reused"] != 0 || t.elapsed() > Duration::from_secs(5) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    s.host.umount(&s.mnt);
    eprintln!(
        "first mount: {} blob bytes in {} requests; second: {} bytes in {} requests (mount took \
         {mount_time:?})",
        first.0, first.1, second.0, second.1
    );
    assert_eq!(tail2, b"the end of the big layer\n");
    assert_eq!(middle2, s.noise_at(MIDDLE, 100_000));
    assert_eq!(second, (0, 0), "the second mount fetched blob bytes");
    assert_eq!(layer_stats(&stats2, 1)["fetched_bytes"], 0, "{stats2}");
    assert!(
        layer_stats(&stats2, 1)["spans_reused"].as_u64().unwrap() > 0,
        "{stats2}"
    );

    // A stored span damaged on disk is caught by the check before use and fetched again.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.partial())
        .unwrap();
    let size = s.blob.len() as u64;
    let at = MIDDLE + 1000;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    drop(f);
    let seen = s.proxy.seen().len();
    s.host.mount(&s.image(), &s.mnt, &[]);
    let middle3 = s.read_at(MIDDLE, 100_000).unwrap();
    s.host.umount(&s.mnt);
    assert_eq!(middle3, s.noise_at(MIDDLE, 100_000));
    let third = ranged_bytes(&s.proxy, &s.big, seen);
    assert!(third.1 >= 1 && third.0 < size, "{third:?}");
    s.marked_spans_are_true();
    drop(s.tmp);
}

#[test]
fn lazy_prefetch_all_makes_the_mount_local() {
    let Some(s) = setup("lazy_prefetch_all_makes_the_mount_local") else {
        return;
    };
    let t = Instant::now();
    // In the foreground with -v: the log says when the prefetch is done.
    let server = flatfs()
        .env("FLATFS_CACHE_DIR", &s.host.cache)
        .env("HOME", &s.host.cache)
        .env("XDG_RUNTIME_DIR", &s.host.runtime)
        .args(["mount", "-f", "-v", "--prefetch", "all", &s.image()])
        .arg(&s.mnt)
        .arg("--tls-verify=false")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn flatfs mount -f");
    while !s.mnt.join("data").exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reads go on while it fetches.
    assert_eq!(std::fs::read(s.mnt.join("data/top.txt")).unwrap(), b"top\n");
    let stats = loop {
        let st = s.host.stats(&s.mnt);
        if st["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["local_bytes"] == l["blob_bytes"])
        {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "prefetch never ended: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t.elapsed();
    let seen = s.proxy.seen().len();
    let all = std::fs::read(s.mnt.join("data/noise.bin")).unwrap();
    let after = ranged_bytes(&s.proxy, &s.big, seen);
    s.host.umount(&s.mnt);
    let log = String::from_utf8_lossy(&server.wait_with_output().unwrap().stderr).into_owned();
    assert!(log.contains("prefetch: 2 lazy layers local after"), "{log}");
    assert!(log.contains("is complete and checked; kept whole"), "{log}");
    eprintln!(
        "prefetch all: {} bytes local after {took:?}; {} prefetched; {} bytes fetched by the \
         read after it",
        layer_stats(&stats, 1)["local_bytes"],
        layer_stats(&stats, 1)["prefetched_bytes"],
        after.0
    );
    assert!(all == s.noise, "noise.bin read back wrong");
    assert_eq!(after, (0, 0), "a read after the prefetch fetched");
    assert_eq!(stats["prefetch"], "all");
    assert!(layer_stats(&stats, 1)["prefetched_bytes"].as_u64().unwrap() > 0);
    // Complete: checked whole and kept as a whole blob; the next mount needs no ranges at all.
    let whole = s.host.cache.join("blobs/sha256").join(&s.big[7..]);
    let start = Instant::now();
    while !whole.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read(&whole).unwrap(), s.blob);
    assert!(!s.partial().exists());
    let seen = s.proxy.seen().len();
    s.host.mount(&s.image(), &s.mnt, &[]);
    let tail = std::fs::read(s.mnt.join("data/tail.txt")).unwrap();
    s.host.umount(&s.mnt);
    assert_eq!(tail, b"the end of the big layer\n");
    let blob_gets = s.proxy.seen()[seen..]
        .iter()
        .filter(|x| x.path.contains("/blobs/"))
        .count();
    assert_eq!(blob_gets, 0, "a mount of a kept blob went to the registry");
}

/// A little more than how long a span whose fetch failed fails again at once.
const FAIL_FAST: Duration = Duration::from_millis(2100);

#[test]
fn lazy_registry_outage_gives_eio_then_the_mount_recovers() {
    let Some(mut s) = setup("lazy_registry_outage_gives_eio_then_the_mount_recovers") else {
        return;
    };
    // Range requests then give up on a silent registry after 2 s a try.
    s.host.timeout = "2";
    s.host.mount(&s.image(), &s.mnt, &[]);
    s.proxy.inject(Fault::Refuse {
        path: format!("/blobs/{}", s.big),
        times: 1000,
    });
    let t = Instant::now();
    let away = s.read_at(MIDDLE, 4096);
    let failed_after = t.elapsed();
    // Back: once a failed span's fail-fast window (2 s) is over, the same read works, no
    // state stuck from the failure.
    s.proxy.clear_faults();
    std::thread::sleep(FAIL_FAST);
    let back = s.read_at(MIDDLE, 4096);
    // A 5xx storm is the same story.
    s.proxy.inject(Fault::Status {
        path: format!("/blobs/{}", s.big),
        status: 503,
        retry_after: None,
        times: 1000,
    });
    let busy = s.read_at(MIDDLE + (3 << 20), 4096);
    s.proxy.clear_faults();
    std::thread::sleep(FAIL_FAST);
    let back2 = s.read_at(MIDDLE + (3 << 20), 4096);
    // A registry that takes the request and says nothing: bounded too.
    s.proxy.inject(Fault::Stall {
        path: format!("/blobs/{}", s.big),
        after: 0,
        secs: 60,
        times: 1000,
    });
    let t = Instant::now();
    let silent = s.read_at(MIDDLE - (3 << 20), 4096);
    let silent_after = t.elapsed();
    s.proxy.clear_faults();
    std::thread::sleep(FAIL_FAST);
    let back3 = s.read_at(MIDDLE - (3 << 20), 4096);
    s.host.umount(&s.mnt);
    eprintln!("silent registry: EIO after {silent_after:?}");
    let err = silent.expect_err("a read from a silent registry succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // 3 tries of 2 s and the 0.5 + 1 s between them, once: the kernel's retry of the failed
    // read (readahead, then the page) fails at once rather than waiting as long again (15 s).
    assert!(silent_after < Duration::from_secs(12), "{silent_after:?}");
    assert_eq!(back3.unwrap(), s.noise_at(MIDDLE - (3 << 20), 4096));
    eprintln!("outage: EIO after {failed_after:?}");
    let err = away.expect_err("a read needing an absent registry succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // 3 refused tries and the 0.5 + 1 s between them, once (not 3 s).
    assert!(
        failed_after < Duration::from_millis(2800),
        "{failed_after:?}"
    );
    assert_eq!(back.unwrap(), s.noise_at(MIDDLE, 4096));
    let err = busy.expect_err("a read through a 503 storm succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(back2.unwrap(), s.noise_at(MIDDLE + (3 << 20), 4096));
    s.marked_spans_are_true();
}

#[test]
fn lazy_tampered_span_is_eio_and_never_stored_as_verified() {
    let Some(s) = setup("lazy_tampered_span_is_eio_and_never_stored_as_verified") else {
        return;
    };
    s.host.mount(&s.image(), &s.mnt, &[]);
    let marked_before = s.marked_spans_are_true();
    s.proxy.inject(Fault::Corrupt {
        path: format!("/blobs/{}", s.big),
        times: 1000,
    });
    let tampered = s.read_at(MIDDLE, 4096);
    s.proxy.clear_faults();
    s.host.umount(&s.mnt);
    let err = tampered.expect_err("tampered bytes were read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        s.marked_spans_are_true(),
        marked_before,
        "a tampered span was recorded"
    );
    // The next mount fetches it honestly.
    s.host.mount(&s.image(), &s.mnt, &[]);
    let honest = s.read_at(MIDDLE, 4096);
    s.host.umount(&s.mnt);
    assert_eq!(honest.unwrap(), s.noise_at(MIDDLE, 4096));
    assert!(s.marked_spans_are_true() > marked_before);
}

#[test]
fn lazy_a_read_waiting_for_the_registry_blocks_only_its_reader() {
    let Some(s) = setup("lazy_a_read_waiting_for_the_registry_blocks_only_its_reader") else {
        return;
    };
    s.host.mount(&s.image(), &s.mnt, &[]);
    let tail = std::fs::read(s.mnt.join("data/tail.txt")).unwrap();
    // The next blob request hangs for 4 s before the connection drops (then it is retried).
    s.proxy.inject(Fault::Stall {
        path: format!("/blobs/{}", s.big),
        after: 0,
        secs: 4,
        times: 1,
    });
    let (slow, others) = std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            let t = Instant::now();
            (s.read_at(MIDDLE, 4096), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let local = std::fs::read(s.mnt.join("data/tail.txt")).unwrap();
        let top = std::fs::read(s.mnt.join("data/top.txt")).unwrap();
        let fetched = s.read_at(MIDDLE + (4 << 20), 4096).unwrap();
        let others = (local, top, fetched, t.elapsed());
        (slow.join().unwrap(), others)
    });
    s.host.umount(&s.mnt);
    eprintln!(
        "stalled reader: {:?}; other readers meanwhile: {:?}",
        slow.1, others.3
    );
    assert_eq!(tail, b"the end of the big layer\n");
    assert_eq!(slow.0.unwrap(), s.noise_at(MIDDLE, 4096));
    assert!(
        slow.1 >= Duration::from_secs(3),
        "the stall did not happen: {:?}",
        slow.1
    );
    assert_eq!(others.0, tail);
    assert_eq!(others.1, b"top\n");
    assert_eq!(others.2, s.noise_at(MIDDLE + (4 << 20), 4096));
    assert!(
        others.3 < Duration::from_secs(2),
        "other readers waited for the stalled one: {:?}",
        others.3
    );
}

/// Any mount has stats (bytes read and decompressed); once unmounted, `flatfs stats` says
/// nothing serves the directory.
#[test]
fn stats_of_a_local_mount_count_reads_and_go_at_unmount() {
    if !fuse_available("stats_of_a_local_mount_count_reads_and_go_at_unmount") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let layers = vec![layer([file("big.bin", big.clone())]).compression(Compression::Gzip)];
    let img = tmp.path().join("img");
    write_oci_layout(&layers, &default_config(&layers), &img, Some("latest"));
    let host = Host::new(tmp.path());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // `--prefetch all` has nothing to do on a local image: a warning says so.
    let out = host.run(&[
        "mount",
        img.to_str().unwrap(),
        mnt.to_str().unwrap(),
        "--prefetch",
        "all",
    ]);
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "warning: --prefetch all: a local image is read in place; nothing to prefetch"
        ),
        "{err}"
    );
    let read = std::fs::read(mnt.join("big.bin")).unwrap();
    let t = Instant::now();
    let stats = loop {
        let st = host.stats(&mnt);
        if st["content"]["read_bytes"] == big.len() as u64 || t.elapsed() > Duration::from_secs(5) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // A path inside the mount means the mount.
    let inside = host.stats(&mnt.join("big.bin"));
    assert_eq!(
        inside["mountpoint"].as_str(),
        mnt.canonicalize().unwrap().to_str(),
        "{inside}"
    );
    host.umount(&mnt);
    assert!(read == big);
    assert_eq!(stats["content"]["read_bytes"], big.len() as u64, "{stats}");
    assert!(
        stats["content"]["decompressed_bytes"].as_u64().unwrap() >= big.len() as u64,
        "{stats}"
    );
    assert_eq!(layer_stats(&stats, 1)["lazy"], false, "{stats}");
    let out = host.run(&["stats", mnt.to_str().unwrap()]);
    assert!(!out.status.success(), "stats of an unmounted directory");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no flatfs mount is serving it"), "{err}");
}

/// A server killed mid-fetch (SIGKILL, while a prefetch request hangs half-answered) leaves a
/// span map that marks only true bytes, and the next mount reads the whole file right.
#[test]
fn lazy_a_killed_server_leaves_only_true_spans_marked() {
    let Some(s) = setup("lazy_a_killed_server_leaves_only_true_spans_marked") else {
        return;
    };
    // Every blob request hangs after 300 KB of its answer: the mount's first-span fetch
    // (256 KiB) goes through, the prefetch's 1 MiB requests stall part-way. (Injected after
    // the mount, a quick prefetch could finish first.)
    s.proxy.inject(Fault::Stall {
        path: format!("/blobs/{}", s.big),
        after: 300_000,
        secs: 60,
        times: 1000,
    });
    s.host.mount(&s.image(), &s.mnt, &["--prefetch", "all"]);
    std::thread::sleep(Duration::from_millis(1000));
    let stats = s.host.stats(&s.mnt);
    let pid = stats["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the server's own pid, read from its stats file.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    s.host.umount(&s.mnt);
    s.proxy.clear_faults();
    let marked = s.marked_spans_are_true();
    eprintln!(
        "killed with {marked} spans marked of {}",
        s.blob.len().div_ceil(256 * 1024)
    );
    assert!(
        marked < s.blob.len().div_ceil(256 * 1024),
        "the prefetch finished before the kill: the test proved nothing"
    );
    s.host.mount(&s.image(), &s.mnt, &[]);
    let all = std::fs::read(s.mnt.join("data/noise.bin"));
    s.host.umount(&s.mnt);
    assert!(all.unwrap() == s.noise, "noise.bin read back wrong");
    // Reading it all may complete the blob, which is then kept whole (checked) instead.
    let whole = s.host.cache.join("blobs/sha256").join(&s.big[7..]);
    if s.partial().exists() {
        s.marked_spans_are_true();
    } else {
        assert!(
            std::fs::read(whole).unwrap() == s.blob,
            "the kept blob is wrong"
        );
    }
}

#[test]
fn lazy_reads_in_order_find_the_next_mibs_fetched_ahead_by_the_daemon() {
    let Some(s) = setup("lazy_reads_in_order_find_the_next_mibs_fetched_ahead_by_the_daemon")
    else {
        return;
    };
    // A daemon mount (the read-ahead thread must start after its fork), no --prefetch.
    s.host.mount(&s.image(), &s.mnt, &[]);
    let seen = s.proxy.seen().len();
    let all = std::fs::read(s.mnt.join("data/noise.bin")).unwrap();
    // The serving process rewrites the stats within a moment of the reads.
    let t = Instant::now();
    let stats = loop {
        let st = s.host.stats(&s.mnt);
        let pre = layer_stats(&st, 1)["prefetched_bytes"].as_u64().unwrap();
        if pre > 0 || t.elapsed() > Duration::from_secs(5) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let fetched = ranged_bytes(&s.proxy, &s.big, seen);
    s.host.umount(&s.mnt);
    assert!(all == s.noise, "noise.bin read back wrong");
    let big = layer_stats(&stats, 1);
    assert!(
        big["prefetched_bytes"].as_u64().unwrap() > 0,
        "nothing fetched ahead of the reads: {stats}"
    );
    // Each byte fetched once: what was fetched ahead was used, not fetched again.
    assert!(
        fetched.0 <= s.blob.len() as u64,
        "{fetched:?} for {}",
        s.blob.len()
    );
}

#[test]
fn lazy_mount_while_the_registry_is_down_goes_on_from_what_this_host_resolved() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, _, _, _) = lazy_image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "lazy:1");
    reg.push(&format!("oci:{}:latest", img.display()), "lazy:2");
    let host = Host::new(tmp.path());
    host.ok(&["ls", "-R", &reg.url("lazy:1"), "--tls-verify=false"]);
    std::fs::remove_dir_all(host.cache.join("blobs")).unwrap();
    if !fuse_available("lazy_mount_while_the_registry_is_down_goes_on_from_what_this_host_resolved")
    {
        return;
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let image = reg.url("lazy:1");
    // A mount while the registry is up: resolves the tag, reads the tail.
    host.mount(&image, &mnt, &[]);
    assert_eq!(
        std::fs::read(mnt.join("data/tail.txt")).unwrap(),
        b"the end of the big layer\n"
    );
    host.umount(&mnt);
    let unresolved = reg.url("lazy:2");
    drop(reg);

    // Down (the port refuses): the mount goes on from the manifest this host resolved, says
    // so, and reads what is here; what is not fails with EIO.
    let out = host.run(&["mount", &image, mnt.to_str().unwrap(), "--tls-verify=false"]);
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect")
            && err.contains("as this host resolved it")
            && err.contains(" s ago (sha256:"),
        "{err}"
    );
    let tail = std::fs::read(mnt.join("data/tail.txt"));
    let f = std::fs::File::open(mnt.join("data/noise.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    let middle = f.read_exact_at(&mut buf, MIDDLE);
    let listing = std::fs::read_dir(mnt.join("data")).map(|d| d.count());
    drop(f);
    host.umount(&mnt);
    assert_eq!(tail.unwrap(), b"the end of the big layer\n");
    let e = middle.expect_err("a span nobody fetched, with the registry down");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(listing.unwrap(), 3);

    // A tag this host never resolved: the registry's error, as before.
    let out = host.run(&[
        "mount",
        &unresolved,
        mnt.to_str().unwrap(),
        "--tls-verify=false",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("GET manifest lazy:2: cannot connect") && !err.contains("resolved"),
        "{err}"
    );
    // Not a mount: no going on from an old answer.
    let out = host.run(&["ls", &image, "--tls-verify=false"]);
    assert!(!out.status.success());
}

#[test]
fn lazy_mount_of_a_silent_registry_goes_on_from_what_this_host_resolved_in_seconds() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, _, _, _) = lazy_image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "lazy:1");
    let mut host = Host::new(tmp.path());
    if !fuse_available("lazy_mount_of_a_silent_registry_goes_on_from_what_this_host_resolved") {
        return;
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let image = reg.url("lazy:1");
    host.mount(&image, &mnt, &[]);
    std::fs::read(mnt.join("data/tail.txt")).unwrap();
    host.umount(&mnt);
    let addr = image["docker://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string();
    drop(reg);

    // The registry's port accepts and never answers (the trial: 3 min 43 s, each try
    // "timed out (connect)" although the TCP connection was made).
    let silent = std::net::TcpListener::bind(&addr).unwrap();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming() {
            conns.push(c);
            if conns.len() > 20 {
                break;
            }
        }
    });
    host.timeout = "1";
    let t = Instant::now();
    let out = host.run(&["mount", &image, mnt.to_str().unwrap(), "--tls-verify=false"]);
    let took = t.elapsed();
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("silent registry: mounted after {took:?}\n{err}");
    let tail = std::fs::read(mnt.join("data/tail.txt"));
    host.umount(&mnt);
    assert_eq!(tail.unwrap(), b"the end of the big layer\n");
    assert!(
        err.contains("GET manifest lazy:1: timed out")
            && err.contains("trying 3 times, 1 s each")
            && err.contains("as this host resolved it")
            && !err.contains("connect"),
        "{err}"
    );
    // 3 tries of 1 s (one more when the remembered plain HTTP gives way to HTTPS) and the
    // pauses: well under the 5 tries of 10 s a command without a fallback takes.
    assert!(took < Duration::from_secs(12), "{took:?}");
    drop(held);
}
