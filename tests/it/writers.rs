//! The writer corpus (issue 10, item 4): layers written by real tar writers (GNU tar, bsdtar,
//! busybox, Python's tarfile, Go's archive/tar, MirBSD pax, git archive, umoci) and images
//! converted or built by skopeo and podman, read by flatfs through `export --format rootfs`
//! and through a FUSE mount, each compared with an independent oracle: `umoci unpack` of the
//! same image, or, where umoci cannot read it, GNU tar's extraction.
//!
//! A test is a table: source trees are written to disk (as root: devices, ownership,
//! `security.capability`), each writer archives them in each of its formats, the tar goes
//! into an image as is ([`raw_layer`]), and every case is checked, so a failure lists every
//! failing writer × format at once with the differing lines of both listings. Listings come
//! from `../shared/tools/tree-manifest.py` (oracle and mount) and `tar-manifest.py` (export):
//! paths, types, modes, ids, sizes, sha256 of contents, link targets, xattrs, hardlink groups,
//! and through the mount mtimes (in seconds) too.
//! docs/design.md ("What flatfs reads, writer by writer") sums up what the tables show.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use flatfs::mount::is_mounted;

use crate::util::*;

// ---------------------------------------------------------------------------------------
// Prerequisites and commands

/// `../shared/tools` (or `$FLATFS_SHARED_DIR/tools`): the listing tools.
fn shared_tools() -> PathBuf {
    shared_tools_dir()
}

/// The tools dir if `test` can run: root (mknod, chown, `security.*` xattrs), the listing
/// tools, umoci (the oracle) and `programs`; otherwise a failure saying what is missing.
/// FUSE is checked per mount by [`fuse_available`].
fn prerequisites(test: &str, programs: &[&str]) -> PathBuf {
    let tools = shared_tools();
    let mut missing: Vec<String> = ["umoci", "python3"]
        .iter()
        .chain(programs)
        .filter(|p| !have(p))
        .map(|p| p.to_string())
        .collect();
    if !tools.join("tree-manifest.py").exists() {
        missing.push(format!("{}", tools.join("tree-manifest.py").display()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (mknod, chown and security.capability for the source trees)".into());
    }
    if missing.is_empty() {
        return tools;
    }
    // These tests are #[ignore]d, so they only run when asked for: then a missing piece fails.
    panic!("{test}: needs {}", missing.join(", "));
}

/// Runs `cmd`; its stdout, or an error naming the command with its status and stderr.
fn run(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    Ok(out.stdout)
}

/// How long one command of a check may take before it counts as hung: a mount that never
/// answers must fail the case, not hang the run.
const PATIENCE_SECS: u32 = 120;

/// `cmd` under coreutils' `timeout`: same program, arguments, environment and directory.
fn with_timeout(cmd: &Command) -> Command {
    let mut t = Command::new("timeout");
    t.args(["--kill-after=5", &PATIENCE_SECS.to_string()])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        t.current_dir(dir);
    }
    t
}

fn run_text(cmd: &mut Command) -> Result<String, String> {
    run(cmd).map(|o| String::from_utf8_lossy(&o).into_owned())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Source trees

/// What a source tree holds beyond the basics every format can store (files, directories
/// with odd modes and owners, setuid, symlinks, a hardlink, an empty file). Each format gets
/// the most it can hold: a writer refusing a feature is the writer's limit, not the case.
#[derive(Clone, Copy, Default)]
struct Features {
    /// Paths over 255 bytes, a symlink target and a hardlink target over 100 bytes.
    long_names: bool,
    /// A path over 100 bytes that the ustar prefix field can hold.
    ustar_names: bool,
    /// Character and block devices, a fifo.
    devices: bool,
    /// A uid and gid over 0o7777777, which need PAX or base-256.
    big_ids: bool,
    /// `user.*` (text and binary) and `security.capability` xattrs.
    xattrs: bool,
    /// Files with holes: inside, at the end, and more segments than an old GNU header holds.
    sparse: bool,
}

const V7: Features = Features {
    long_names: false,
    ustar_names: false,
    devices: false,
    big_ids: false,
    xattrs: false,
    sparse: false,
};
const USTAR: Features = Features {
    ustar_names: true,
    devices: true,
    ..V7
};
const FULL: Features = Features {
    long_names: true,
    big_ids: true,
    ..USTAR
};
const XATTRS: Features = Features {
    xattrs: true,
    ..FULL
};
const SPARSE: Features = Features { sparse: true, ..V7 };

fn mkdir(path: &Path, mode: u32, ids: (u32, u32)) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod dir");
    lchown(path, Some(ids.0), Some(ids.1)).expect("chown dir");
}

fn put(path: &Path, data: &[u8], mode: u32, ids: (u32, u32)) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    // chown before chmod: chown clears the setuid bit.
    lchown(path, Some(ids.0), Some(ids.1)).expect("chown file");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod file");
}

fn link(path: &Path, target: &str) {
    symlink(target, path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
}

fn setxattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = CString::new(name).expect("name");
    // SAFETY: NUL-terminated path and name; `value` is valid for its length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn mknod(path: &Path, kind: libc::mode_t, mode: u32, dev: (u32, u32)) {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a NUL-terminated path; mknod has no other preconditions.
    let rc = unsafe { libc::mknod(p.as_ptr(), kind | mode, libc::makedev(dev.0, dev.1)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod node");
}

/// A file of `size` bytes holding `chunks` at their offsets and holes elsewhere.
fn sparse_file(path: &Path, size: u64, chunks: &[(u64, Vec<u8>)]) {
    let f = File::create(path).expect("create sparse file");
    f.set_len(size).expect("set_len");
    for (at, data) in chunks {
        f.write_all_at(data, *at).expect("write sparse chunk");
    }
}

/// `security.capability` granting cap_net_raw, effective (VFS_CAP_REVISION_2, as `setcap
/// cap_net_raw+ep` writes it).
fn capability() -> Vec<u8> {
    let mut v = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

/// A path component of `n` copies of `c`.
fn rep(c: char, n: usize) -> String {
    std::iter::repeat_n(c, n).collect()
}

/// Writes the lower source tree at `root` (which must not exist).
fn make_tree(root: &Path, f: Features) {
    let r = |p: &str| root.join(p);
    // Not root's 0755: writers that archive `.` give the image root these attributes.
    mkdir(root, 0o750, (1000, 1001));
    mkdir(&r("etc"), 0o755, (0, 0));
    put(&r("etc/hostname"), b"corpus\n", 0o644, (0, 0));
    // Not a multiple of 512, so the data is followed by padding.
    put(&r("etc/motd"), &noise(1, 70_001), 0o644, (0, 0));
    mkdir(&r("bin"), 0o755, (0, 0));
    put(&r("bin/tool"), &noise(2, 3000), 0o4755, (0, 0));
    fs::hard_link(r("etc/motd"), r("bin/motd-hardlink")).expect("hardlink");
    mkdir(&r("home/user"), 0o700, (1000, 1000));
    put(
        &r("home/user/.profile"),
        b"export A=1\n",
        0o600,
        (1000, 1000),
    );
    put(&r("home/user/old"), b"old\n", 0o640, (1000, 100));
    mkdir(&r("tmp"), 0o1777, (0, 0));
    mkdir(&r("dir/sub"), 0o750, (0, 42));
    put(&r("dir/sub/leaf"), b"leaf\n", 0o444, (0, 0));
    put(&r("empty"), b"", 0o640, (0, 42));
    link(&r("rel"), "etc/hostname");
    link(&r("abs"), "/etc/motd");
    link(&r("dir/dangling"), "../nowhere");
    // link(2) on a symlink links the symlink (as `cp -al` trees have): a hardlink entry
    // whose target is a symlink.
    fs::hard_link(r("rel"), r("rel-hardlink")).expect("hardlink to a symlink");
    // Names are bytes: UTF-8, Latin-1 (not UTF-8: PAX writers add `hdrcharset=BINARY`),
    // a space, a newline.
    mkdir(&r("names"), 0o755, (0, 0));
    for name in [
        &b"caf\xc3\xa9"[..],
        b"latin1-\xe9",
        b"with space",
        b"new\nline",
    ] {
        put(
            &r("names").join(OsStr::from_bytes(name)),
            name,
            0o644,
            (0, 0),
        );
    }
    if f.ustar_names {
        // Each directory's own name fits the 100-byte name field; the file's path does not.
        let d = r(&format!("ustar-{}/{}", rep('p', 90), rep('q', 50)));
        mkdir(&d, 0o755, (0, 0));
        put(
            &d.join(format!("name-{}", rep('n', 60))),
            b"prefix\n",
            0o644,
            (0, 0),
        );
    }
    if f.long_names {
        let d = format!("long/{}/{}/{}", rep('a', 120), rep('b', 120), rep('c', 120));
        mkdir(&r(&d), 0o755, (0, 0));
        let file = format!("{d}/{}.txt", rep('f', 100));
        put(&r(&file), &noise(3, 1500), 0o644, (0, 0));
        link(&r("long/symlink"), &format!("/{}/target", rep('t', 150)));
        // A hardlink whose target name is over 100 bytes: GNU K, PAX linkpath.
        fs::hard_link(r(&file), r("long/hardlink")).expect("long hardlink");
    }
    if f.devices {
        mkdir(&r("dev"), 0o755, (0, 0));
        mknod(&r("dev/null"), libc::S_IFCHR, 0o666, (1, 3));
        mknod(&r("dev/loop0"), libc::S_IFBLK, 0o660, (7, 0));
        lchown(r("dev/loop0"), Some(0), Some(6)).expect("chown");
        mknod(&r("dev/fifo"), libc::S_IFIFO, 0o600, (0, 0));
        fs::hard_link(r("dev/fifo"), r("dev/fifo-hardlink")).expect("hardlink to a fifo");
    }
    if f.big_ids {
        put(&r("big"), b"big\n", 0o644, (3_000_000, 3_000_001));
    }
    if f.xattrs {
        setxattr(&r("etc/hostname"), "user.note", b"corpus");
        setxattr(&r("etc/motd"), "user.bin", b"\x00\x01\n=;\xff");
        setxattr(&r("dir/sub"), "user.dir", b"d");
        // The upper layers hold `etc` without xattrs: a directory's upper entry replaces
        // the lower one's xattrs, as the upper directory of an overlay does.
        setxattr(&r("etc"), "user.etc", b"lower");
        setxattr(&r("bin/tool"), "security.capability", &capability());
    }
    if f.sparse {
        mkdir(&r("var"), 0o755, (0, 0));
        let mib = 1 << 20;
        sparse_file(
            &r("var/sparse"),
            4 * mib,
            &[
                (0, b"head".to_vec()),
                (mib + 3, noise(4, 5000)),
                (4 * mib - 4, b"tail".to_vec()),
            ],
        );
        sparse_file(&r("var/hole-at-end"), 2 * mib, &[(4096, noise(5, 100))]);
        // Eight segments: more than the four an old GNU header holds.
        let chunks: Vec<(u64, Vec<u8>)> = (0..8).map(|i| (i * 65536, noise(6 + i, 100))).collect();
        sparse_file(&r("var/many"), 8 * 65536 + 10, &chunks);
    }
}

/// The upper source tree at `root`: new and replaced files, a directory that replaces a
/// file's place, and new content for `home/user` (which the upper layer makes opaque).
fn make_upper(root: &Path) {
    let r = |p: &str| root.join(p);
    mkdir(root, 0o755, (0, 0));
    mkdir(&r("etc"), 0o755, (0, 0));
    put(&r("etc/motd"), b"replaced motd\n", 0o600, (0, 0));
    put(&r("etc/new"), &noise(7, 900), 0o644, (0, 0));
    mkdir(&r("home/user"), 0o750, (1000, 1000));
    put(&r("home/user/fresh"), b"fresh\n", 0o644, (1000, 1000));
    mkdir(&r("empty"), 0o755, (0, 0));
}

/// What the upper layers of every writer delete, as whiteouts or an opaque marker.
/// `rel` and `long/hardlink` each have another name, which stays.
const WHITEOUTS: [&str; 4] = ["etc/hostname", "dir/sub", "rel", "long/hardlink"];
const OPAQUE: &str = "home/user";

/// [`make_upper`] plus the whiteouts and opaque marker as plain empty files, for writers that
/// know nothing of overlays (a layer built by hand with `tar`).
fn make_upper_with_markers(root: &Path) {
    make_upper(root);
    for w in WHITEOUTS {
        let (dir, name) = w.rsplit_once('/').unwrap_or(("", w));
        mkdir(&root.join(dir), 0o755, (0, 0));
        put(
            &root.join(dir).join(format!(".wh.{name}")),
            b"",
            0o644,
            (0, 0),
        );
    }
    put(&root.join(OPAQUE).join(".wh..wh..opq"), b"", 0o644, (0, 0));
}

/// A name for the tree with features `f`, e.g. `tree-long-ustar-dev-ids`.
fn tree_name(f: Features) -> String {
    let flags = [
        (f.long_names, "long"),
        (f.ustar_names, "ustar"),
        (f.devices, "dev"),
        (f.big_ids, "ids"),
        (f.xattrs, "xattrs"),
        (f.sparse, "sparse"),
    ];
    flags
        .iter()
        .filter(|(on, _)| *on)
        .fold("tree".to_string(), |n, (_, flag)| format!("{n}-{flag}"))
}

/// Source trees are made once per test and shared by its cases.
struct Trees {
    work: PathBuf,
    made: Vec<String>,
}

impl Trees {
    fn new(work: &Path) -> Self {
        Trees {
            work: work.join("trees"),
            made: Vec::new(),
        }
    }

    /// The tree named `name`, made by `make` the first time.
    fn get(&mut self, name: &str, make: impl FnOnce(&Path)) -> PathBuf {
        let path = self.work.join(name);
        if !self.made.iter().any(|m| m == name) {
            fs::create_dir_all(&self.work).expect("mkdir trees");
            make(&path);
            self.made.push(name.to_string());
        }
        path
    }

    /// The lower tree with features `f`.
    fn lower(&mut self, f: Features) -> PathBuf {
        self.get(&tree_name(f), |p| make_tree(p, f))
    }
}

// ---------------------------------------------------------------------------------------
// Cases and their check

/// Where the expected tree comes from.
enum Oracle {
    /// `umoci unpack` of this OCI layout, tag `latest`.
    Umoci(PathBuf),
    /// A directory GNU tar extracted as root (for what umoci cannot read): the writer's own
    /// extraction for GNU tar's layers.
    Extracted(PathBuf),
}

impl Oracle {
    fn name(&self) -> &'static str {
        match self {
            Oracle::Umoci(_) => "umoci unpack",
            Oracle::Extracted(_) => "GNU tar's extraction",
        }
    }
}

/// One image for flatfs and the oracle that says what its merged tree is.
struct Case {
    name: String,
    /// What flatfs is given: `DIR:latest`, or an archive.
    image: String,
    oracle: Oracle,
}

/// `DIR:latest`, the image flatfs and umoci read from an OCI layout.
fn tagged(dir: &Path) -> String {
    format!("{}:{OCI_REF}", dir.display())
}

/// The cases of a table, in a work dir shared by them.
struct Table {
    test: &'static str,
    tools: PathBuf,
    tmp: tempfile::TempDir,
    trees: Trees,
    cases: Vec<Result<Case, String>>,
}

impl Table {
    fn new(test: &'static str, tools: PathBuf) -> Self {
        // Under target/ rather than /tmp: sparse files and devices need a real filesystem,
        // and podman's storage must not sit on a tmpfs with nodev.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("writers");
        fs::create_dir_all(&base).expect("mkdir target/tmp/writers");
        let tmp = tempfile::Builder::new()
            .prefix(test)
            .tempdir_in(&base)
            .expect("tempdir");
        let trees = Trees::new(tmp.path());
        Table {
            test,
            tools,
            tmp,
            trees,
            cases: Vec::new(),
        }
    }

    fn work(&self) -> &Path {
        self.tmp.path()
    }

    /// A fresh directory for one case's files.
    fn case_dir(&self, name: &str) -> PathBuf {
        let d = self.work().join("cases").join(name);
        fs::create_dir_all(&d).expect("mkdir case");
        d
    }

    /// `layers` as an OCI layout, checked against umoci's unpack of that same layout.
    fn layers(&mut self, name: &str, layers: Vec<Layer>) {
        let dir = self.case_dir(name).join("image");
        write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
        self.image(name, Ok((tagged(&dir), Oracle::Umoci(dir))));
    }

    /// `layers`, which umoci cannot read, checked against GNU tar's extraction `extracted`.
    fn layers_extracted(&mut self, name: &str, layers: Vec<Layer>, extracted: PathBuf) {
        let dir = self.case_dir(name).join("image");
        write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
        self.image(name, Ok((tagged(&dir), Oracle::Extracted(extracted))));
    }

    /// `layers` (zstd) checked against umoci's unpack of `twins`, the same tars under gzip:
    /// the compression is only a wrapper, and umoci reads the tars.
    fn zstd_twin(&mut self, name: &str, tars: &[Vec<u8>]) {
        let dir = self.case_dir(name);
        let write = |c: Compression, path: &Path| {
            let layers: Vec<Layer> = tars
                .iter()
                .map(|t| raw_layer(t.clone()).compression(c))
                .collect();
            write_oci_layout(&layers, &default_config(&layers), path, Some(OCI_REF));
        };
        write(Compression::Zstd, &dir.join("image"));
        write(Compression::Gzip, &dir.join("gzip-twin"));
        let oracle = Oracle::Umoci(dir.join("gzip-twin"));
        self.image(name, Ok((tagged(&dir.join("image")), oracle)));
    }

    /// What `build` (a writer, or the steps that make an image) returns; on failure the
    /// case `name` fails with the error, listed with the others.
    fn writer<T>(&mut self, name: &str, build: impl FnOnce() -> Result<T, String>) -> Option<T> {
        build()
            .map_err(|e| {
                self.cases
                    .push(Err(format!("{name}: the writer failed: {e}")))
            })
            .ok()
    }

    /// An image a tool made: `built` is what flatfs reads and the oracle, or the failure.
    fn image(&mut self, name: &str, built: Result<(String, Oracle), String>) {
        self.cases.push(
            built
                .map(|(image, oracle)| Case {
                    name: name.to_string(),
                    image,
                    oracle,
                })
                .map_err(|e| format!("{name}: the writer failed: {e}")),
        );
    }

    /// Checks every case, two at a time; panics listing every failing one in table order.
    fn check(self) {
        let start = Instant::now();
        let fuse = fuse_available(self.test);
        let total = self.cases.len();
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
        // Two workers: a case waits mostly on child processes (umoci, python, flatfs).
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(case) = self.cases.get(i) else { break };
                        let failed = match case {
                            Err(e) => Some(e.clone()),
                            Ok(case) => {
                                let t = Instant::now();
                                let scratch = self.work().join("scratch").join(i.to_string());
                                fs::create_dir_all(&scratch).expect("mkdir scratch");
                                let res = check_case(&self.tools, case, &scratch, fuse);
                                let _ = fs::remove_dir_all(&scratch);
                                let secs = t.elapsed().as_secs_f64();
                                eprintln!(
                                    "{}: {}: {} ({secs:.1}s)",
                                    self.test,
                                    case.name,
                                    match &res {
                                        Ok(()) => "ok",
                                        Err(_) => "FAILED",
                                    }
                                );
                                res.err().map(|e| format!("{}: {e}", case.name))
                            }
                        };
                        if let Some(f) = failed {
                            results
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((i, f));
                        }
                    }
                });
            }
        });
        let mut failures = results.into_inner().unwrap_or_else(|e| e.into_inner());
        failures.sort();
        eprintln!(
            "{}: {} cases in {:.1}s",
            self.test,
            total,
            start.elapsed().as_secs_f64()
        );
        assert!(
            failures.is_empty(),
            "{}: {} of {total} cases failed:\n\n{}",
            self.test,
            failures.len(),
            failures
                .into_iter()
                .map(|(_, f)| f)
                .collect::<Vec<_>>()
                .join("\n\n")
        );
    }
}

/// The listing of a directory (`tree-manifest.py`, with mtimes) or a tar (`tar-manifest.py`,
/// which has no mtime column).
fn listing(tools: &Path, script: &str, arg: &Path) -> Result<String, String> {
    let mut cmd = Command::new("python3");
    cmd.arg(tools.join(script)).arg("--hardlinks");
    if script == "tree-manifest.py" {
        cmd.arg("--mtime");
    }
    cmd.arg(arg);
    run_text(&mut with_timeout(&cmd))
}

/// A `tree-manifest.py --hardlinks --mtime` listing without its MTIME column (the 9th), to
/// compare with `tar-manifest.py`'s.
fn without_mtime(listing: &str) -> String {
    listing
        .lines()
        .map(|l| {
            let mut cols: Vec<&str> = l.split('\t').collect();
            if cols.len() > 8 {
                cols.remove(8);
            }
            cols.join("\t") + "\n"
        })
        .collect()
}

/// The oracle's listing of `case`.
fn oracle_listing(tools: &Path, case: &Case, work: &Path) -> Result<String, String> {
    match &case.oracle {
        Oracle::Extracted(dir) => listing(tools, "tree-manifest.py", dir),
        Oracle::Umoci(layout) => {
            let bundle = work.join("bundle");
            let _ = fs::remove_dir_all(&bundle);
            run(Command::new("umoci")
                .args(["unpack", "--image", &tagged(layout)])
                .arg(&bundle))
            .map_err(|e| format!("the oracle failed: {e}"))?;
            let got = listing(tools, "tree-manifest.py", &bundle.join("rootfs"));
            fs::remove_dir_all(&bundle).expect("remove bundle");
            got
        }
    }
}

/// `Err` with both sides' differing lines if `got` (flatfs through `via`) is not `want`
/// (`oracle`'s listing).
fn compare(via: &str, got: &str, oracle: &Oracle, want: &str) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let only = |a: &str, b: &str| -> Vec<String> {
        a.lines()
            .filter(|l| !b.lines().any(|m| m == *l))
            .take(30)
            .map(|l| format!("    {l}"))
            .collect()
    };
    Err(format!(
        "{via} differs from {}\n  only in flatfs:\n{}\n  only in the oracle:\n{}",
        oracle.name(),
        only(got, want).join("\n"),
        only(want, got).join("\n")
    ))
}

/// A mountpoint with `flatfs mount` of an image on it; unmounted on drop, whatever happened.
struct Mount(PathBuf);

impl Mount {
    fn new(image: &str, mnt: &Path) -> Result<Self, String> {
        fs::create_dir_all(mnt).expect("mkdir mountpoint");
        let mut cmd = flatfs();
        cmd.arg("mount").arg(image).arg(mnt);
        let out = with_timeout(&cmd).output().expect("run flatfs mount");
        let m = Mount(mnt.to_path_buf());
        if !out.status.success() {
            return Err(format!(
                "flatfs mount failed ({}): {}",
                out.status,
                stderr_of(&out).trim_end()
            ));
        }
        if !is_mounted(mnt) {
            return Err("flatfs mount returned 0 but nothing is mounted".into());
        }
        Ok(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = flatfs().arg("umount").arg(&self.0).output();
        }
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).output();
        }
    }
}

/// Export and mount `case` with flatfs and compare both with the oracle; `work` is an empty
/// dir of this check's own.
fn check_case(tools: &Path, case: &Case, work: &Path, fuse: bool) -> Result<(), String> {
    let want = oracle_listing(tools, case, work)?;
    let mut errors = Vec::new();

    let rootfs = work.join("rootfs.tar");
    let mut cmd = flatfs();
    cmd.args(["export", &case.image, "-o"])
        .arg(&rootfs)
        .args(["--format", "rootfs"]);
    let out = with_timeout(&cmd).output().expect("run flatfs export");
    if out.status.success() {
        let got = listing(tools, "tar-manifest.py", &rootfs)?;
        let want = without_mtime(&want);
        errors.extend(compare("export --format rootfs", &got, &case.oracle, &want).err());
    } else {
        errors.push(format!(
            "flatfs export failed ({}): {}",
            out.status,
            stderr_of(&out).trim_end()
        ));
    }
    let _ = fs::remove_file(&rootfs);

    if fuse {
        match Mount::new(&case.image, &work.join("mnt")) {
            Ok(m) => {
                let got = listing(tools, "tree-manifest.py", &m.0)?;
                errors.extend(compare("the mount", &got, &case.oracle, &want).err());
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

// ---------------------------------------------------------------------------------------
// Writers

/// GNU tar's options for a PAX layer with every xattr and numeric ids.
const POSIX_XATTRS: &[&str] = &[
    "--format=posix",
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
];

/// `tar ARGS -cf OUT -C SRC .` with GNU tar, in name order so layers are reproducible.
fn gnu_tar(src: &Path, out: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    run(Command::new("tar")
        .args(args)
        .arg("--sort=name")
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(src)
        .arg("."))?;
    read(out)
}

/// Extracts `tar` with GNU tar as root (owners, modes, xattrs, devices) into `dir`.
fn gnu_extract(tar: &Path, dir: &Path) -> Result<(), String> {
    mkdir(dir, 0o755, (0, 0));
    run(Command::new("tar")
        .args(["-xpf"])
        .arg(tar)
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
        .arg(dir))?;
    // A root with no entry of its own is one flatfs makes up, with mtime 0; here it is the
    // extraction dir, which got the time of extraction.
    let names = run_text(Command::new("tar").arg("-tf").arg(tar))?;
    if !names.lines().any(|n| n == "./" || n == ".") {
        let epoch = std::time::SystemTime::UNIX_EPOCH;
        File::open(dir)
            .and_then(|d| d.set_modified(epoch))
            .map_err(|e| format!("set mtime of {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn bsdtar(src: &Path, out: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    run(Command::new("bsdtar")
        .args(args)
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(src)
        .arg("."))?;
    read(out)
}

/// The Go writer, built once per test process from tests/writers/gotar with Debian's Go,
/// offline, its caches under target/.
fn gotar() -> Result<PathBuf, String> {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = &*built {
        return Ok(bin.clone());
    }
    let go = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go");
    let bin = go.join("bin/gotar");
    run(Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/writers/gotar"))
        .env("GOCACHE", go.join("cache"))
        .env("GOPATH", go.join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0"))?;
    *built = Some(bin.clone());
    Ok(bin)
}

fn go_writer(src: &Path, out: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    run(Command::new(gotar()?).args(args).arg(src).arg(out))?;
    read(out)
}

fn pytar(format: &str, src: &Path, out: &Path) -> Result<Vec<u8>, String> {
    run(Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/writers/pytar.py"))
        .arg(format)
        .arg(src)
        .arg(out))?;
    read(out)
}

// ---------------------------------------------------------------------------------------
// The tables

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn gnu_tar_layers_in_every_format_match_the_oracle() {
    let test = "gnu_tar_layers_in_every_format_match_the_oracle";
    let tools = prerequisites(test, &["tar"]);
    let mut t = Table::new(test, tools);
    let formats: [(&str, Features, &[&str]); 5] = [
        ("gnu", FULL, &["--format=gnu", "--numeric-owner"]),
        // Owner names as well as ids: readers must take the ids.
        ("oldgnu", FULL, &["--format=oldgnu"]),
        ("posix", XATTRS, POSIX_XATTRS),
        ("ustar", USTAR, &["--format=ustar", "--numeric-owner"]),
        ("v7", V7, &["--format=v7", "--numeric-owner"]),
    ];
    for (format, features, args) in formats {
        let name = format!("gnu-tar-{format}");
        let src = t.trees.lower(features);
        let out = t.case_dir(&name).join("layer.tar");
        let Some(tar) = t.writer(&name, || gnu_tar(&src, &out, args)) else {
            continue;
        };
        t.layers(&name, vec![raw_layer(tar.clone())]);
        t.layers(
            &format!("{name}-gzip"),
            vec![raw_layer(tar.clone()).compression(Compression::Gzip)],
        );
        let extracted = t.case_dir(&name).join("extracted");
        if t.writer(&format!("{name}-zstd"), || gnu_extract(&out, &extracted))
            .is_some()
        {
            let layers = vec![raw_layer(tar).compression(Compression::Zstd)];
            t.layers_extracted(&format!("{name}-zstd"), layers, extracted);
        }
    }
    // An xattr with an empty value, which umoci drops on unpack: GNU tar's extraction keeps
    // it, as flatfs does.
    let src = t.trees.get("empty-xattr", |root| {
        make_tree(root, V7);
        setxattr(&root.join("etc/hostname"), "user.empty", b"");
        setxattr(&root.join("etc"), "user.empty-dir", b"");
    });
    let dir = t.case_dir("gnu-tar-posix-empty-xattr");
    let extracted = dir.join("extracted");
    let tar = t.writer("gnu-tar-posix-empty-xattr", || {
        let tar = gnu_tar(&src, &dir.join("layer.tar"), POSIX_XATTRS)?;
        gnu_extract(&dir.join("layer.tar"), &extracted)?;
        Ok(tar)
    });
    if let Some(tar) = tar {
        let layers = vec![raw_layer(tar).compression(Compression::Gzip)];
        t.layers_extracted("gnu-tar-posix-empty-xattr", layers, extracted);
    }
    // `tar -r` appends entries for paths the layer already holds: the last one wins, and a
    // hardlink made in the appended part points at the new file.
    let lower = t.trees.lower(V7);
    let again = t.trees.get("append", |root| {
        mkdir(root, 0o755, (0, 0));
        mkdir(&root.join("etc"), 0o755, (0, 0));
        put(&root.join("etc/hostname"), b"appended\n", 0o600, (0, 0));
        mkdir(&root.join("dir/sub"), 0o700, (0, 0));
        fs::hard_link(root.join("etc/hostname"), root.join("dir/sub/leaf")).expect("hardlink");
        link(&root.join("empty"), "etc/hostname");
        put(&root.join("rel"), b"no longer a symlink\n", 0o644, (0, 0));
    });
    let out = t.case_dir("gnu-tar-append").join("layer.tar");
    let appended = t.writer("gnu-tar-append", || {
        gnu_tar(&lower, &out, &["--format=gnu"])?;
        run(Command::new("tar")
            .args(["--format=gnu", "-rf"])
            .arg(&out)
            .arg("-C")
            .arg(&again)
            .args(["./etc/hostname", "./dir/sub/leaf", "./empty", "./rel"]))?;
        read(&out)
    });
    if let Some(tar) = appended {
        t.layers("gnu-tar-append", vec![raw_layer(tar)]);
    }
    // A layer built by hand: the whiteouts and opaque marker are files in the tree.
    let lower = t.trees.lower(XATTRS);
    let upper = t.trees.get("upper-markers", make_upper_with_markers);
    let dir = t.case_dir("gnu-tar-whiteouts");
    let layers = t.writer("gnu-tar-whiteouts", || {
        Ok(vec![
            raw_layer(gnu_tar(&lower, &dir.join("lower.tar"), POSIX_XATTRS)?),
            raw_layer(gnu_tar(&upper, &dir.join("upper.tar"), POSIX_XATTRS)?),
        ])
    });
    if let Some(layers) = layers {
        t.layers("gnu-tar-whiteouts", layers);
    }
    t.check();
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn bsdtar_layers_in_every_format_match_the_oracle() {
    let test = "bsdtar_layers_in_every_format_match_the_oracle";
    let tools = prerequisites(test, &["bsdtar"]);
    let mut t = Table::new(test, tools);
    // libarchive's names: `paxr` is the restricted pax bsdtar writes by default (ustar
    // headers, a PAX header only for what ustar cannot hold).
    let formats: [(&str, &str, Features, &[&str]); 6] = [
        ("pax", "pax", XATTRS, &["--xattrs"]),
        ("restricted", "paxr", XATTRS, &["--xattrs"]),
        ("gnutar", "gnutar", FULL, &[]),
        ("ustar", "ustar", USTAR, &[]),
        ("v7", "v7", V7, &[]),
        // xattrs only as LIBARCHIVE.xattr.* records, which Go's reader (so Docker,
        // containerd, podman and umoci) does not take for xattrs: neither does flatfs.
        (
            "pax-libarchive-xattrs",
            "pax",
            XATTRS,
            &["--xattrs", "--options", "xattrheader=LIBARCHIVE"],
        ),
    ];
    for (label, format, features, args) in formats {
        let name = format!("bsdtar-{label}");
        let src = t.trees.lower(features);
        let out = t.case_dir(&name).join("layer.tar");
        let mut all = vec!["--format", format];
        all.extend_from_slice(args);
        if let Some(tar) = t.writer(&name, || bsdtar(&src, &out, &all)) {
            t.layers(&name, vec![raw_layer(tar).compression(Compression::Gzip)]);
        }
    }
    t.check();
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn busybox_tar_layer_matches_the_oracle() {
    let test = "busybox_tar_layer_matches_the_oracle";
    let tools = prerequisites(test, &["busybox"]);
    let mut t = Table::new(test, tools);
    let src = t.trees.lower(FULL);
    let out = t.case_dir("busybox").join("layer.tar");
    let tar = t.writer("busybox", || {
        run(Command::new("busybox")
            .args(["tar", "-cf"])
            .arg(&out)
            .arg("-C")
            .arg(&src)
            .arg("."))?;
        read(&out)
    });
    if let Some(tar) = tar {
        t.layers("busybox", vec![raw_layer(tar)]);
    }
    t.check();
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn python_tarfile_layers_in_every_format_match_the_oracle() {
    let test = "python_tarfile_layers_in_every_format_match_the_oracle";
    let tools = prerequisites(test, &[]);
    let mut t = Table::new(test, tools);
    for (format, features) in [("gnu", FULL), ("pax", FULL), ("ustar", USTAR)] {
        let name = format!("python-{format}");
        let src = t.trees.lower(features);
        let out = t.case_dir(&name).join("layer.tar");
        if let Some(tar) = t.writer(&name, || pytar(format, &src, &out)) {
            t.layers(&name, vec![raw_layer(tar).compression(Compression::Gzip)]);
        }
    }
    t.check();
}

/// The Go writer's flags for the upper layer: whiteouts for [`WHITEOUTS`], an opaque marker
/// in [`OPAQUE`], moby's headers.
fn go_upper_args() -> Vec<&'static str> {
    let mut args = vec!["-moby", "-opaque", OPAQUE];
    for w in WHITEOUTS {
        args.extend(["-whiteout", w]);
    }
    args
}

/// The upper layer of the multi-layer cases, written by the Go writer.
fn go_upper_layer(t: &mut Table, dir: &Path) -> Option<Vec<u8>> {
    let upper = t.trees.get("upper", make_upper);
    t.writer("go-upper", || {
        go_writer(&upper, &dir.join("upper.tar"), &go_upper_args())
    })
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn go_archive_tar_layers_and_their_whiteouts_match_the_oracle() {
    let test = "go_archive_tar_layers_and_their_whiteouts_match_the_oracle";
    let tools = prerequisites(test, &["go"]);
    let mut t = Table::new(test, tools);
    let lower = t.trees.lower(XATTRS);
    let dir = t.case_dir("go");
    if let Some(tar) = t.writer("go-default-format", || {
        go_writer(&lower, &dir.join("lower.tar"), &[])
    }) {
        t.layers("go-default-format", vec![raw_layer(tar)]);
    }
    let full = t.trees.lower(FULL);
    if let Some(tar) = t.writer("go-gnu-format", || {
        go_writer(&full, &dir.join("lower-gnu.tar"), &["-gnu"])
    }) {
        t.layers("go-gnu-format", vec![raw_layer(tar)]);
    }
    let moby = t.writer("go-moby", || {
        go_writer(&lower, &dir.join("lower-moby.tar"), &["-moby"])
    });
    let upper = go_upper_layer(&mut t, &dir);
    if let Some(moby) = moby {
        let gzip = |tar: &[u8]| raw_layer(tar).compression(Compression::Gzip);
        t.layers("go-moby", vec![gzip(&moby)]);
        if let Some(upper) = upper {
            t.layers("go-moby-whiteouts-opaque", vec![gzip(&moby), gzip(&upper)]);
        }
    }
    t.check();
}

/// `git archive` of a commit of `src`, with the repository in `git_dir`.
fn git_archive(src: &Path, git_dir: &Path, out: &Path) -> Result<Vec<u8>, String> {
    let git = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.arg("--git-dir")
            .arg(git_dir)
            .arg("--work-tree")
            .arg(src)
            .args(args)
            // Nothing from the user's or the system's git config.
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "corpus")
            .env("GIT_AUTHOR_EMAIL", "corpus@example.com")
            .env("GIT_AUTHOR_DATE", "1700000000 +0000")
            .env("GIT_COMMITTER_NAME", "corpus")
            .env("GIT_COMMITTER_EMAIL", "corpus@example.com")
            .env("GIT_COMMITTER_DATE", "1700000000 +0000");
        run(&mut cmd)
    };
    run(Command::new("git")
        .args(["init", "-q", "--bare"])
        .arg(git_dir))?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "corpus"])?;
    git(&[
        "archive",
        "--format=tar",
        "-o",
        &out.display().to_string(),
        "HEAD",
    ])?;
    read(out)
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn pax_and_git_archive_layers_match_the_oracle() {
    let test = "pax_and_git_archive_layers_match_the_oracle";
    let tools = prerequisites(test, &["pax", "git"]);
    let mut t = Table::new(test, tools);
    // MirBSD pax: `ustar` and `tar` (v7) are its tar formats.
    for (format, features) in [("ustar", USTAR), ("tar", V7)] {
        let name = format!("pax-{format}");
        let src = t.trees.lower(features);
        let out = t.case_dir(&name).join("layer.tar");
        let tar = t.writer(&name, || {
            run(Command::new("pax")
                .args(["-w", "-x", format, "-f"])
                .arg(&out)
                .arg(".")
                .current_dir(&src))?;
            read(&out)
        });
        if let Some(tar) = tar {
            t.layers(&name, vec![raw_layer(tar).compression(Compression::Gzip)]);
        }
    }
    // git keeps files, symlinks and the executable bit, no owners or special files; its
    // archive starts with a global PAX header holding the commit id, and gives 0664/0775.
    let long = Features {
        long_names: true,
        ustar_names: true,
        ..V7
    };
    let src = t.trees.lower(long);
    let dir = t.case_dir("git-archive");
    let tar = t.writer("git-archive", || {
        git_archive(&src, &dir.join("repo.git"), &dir.join("layer.tar"))
    });
    // umoci 0.4.7 stops at the global header ("unknown typeflag 'g'"): GNU tar extracts.
    let extracted = dir.join("extracted");
    let extract = || gnu_extract(&dir.join("layer.tar"), &extracted);
    if let Some(tar) = tar.and_then(|tar| t.writer("git-archive", extract).map(|()| tar)) {
        t.layers_extracted("git-archive", vec![raw_layer(tar)], extracted);
    }
    t.check();
}

/// True if `tar` holds a sparse entry: an old GNU `S` header or PAX `GNU.sparse.*` records.
fn has_sparse_entry(tar: &[u8]) -> bool {
    tar.windows(10).any(|w| w == b"GNU.sparse")
        || tar
            .chunks_exact(512)
            .any(|h| h[156] == b'S' && &h[257..262] == b"ustar")
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn sparse_files_from_gnu_tar_and_bsdtar_match_the_oracle() {
    let test = "sparse_files_from_gnu_tar_and_bsdtar_match_the_oracle";
    let tools = prerequisites(test, &["tar", "bsdtar"]);
    let mut t = Table::new(test, tools);
    let src = t.trees.lower(SPARSE);
    let cases: [(&str, &[&str]); 6] = [
        ("gnu-tar-gnu-sparse", &["--format=gnu", "--sparse"]),
        ("gnu-tar-oldgnu-sparse", &["--format=oldgnu", "--sparse"]),
        (
            "gnu-tar-posix-sparse-0.0",
            &["--format=posix", "--sparse", "--sparse-version=0.0"],
        ),
        (
            "gnu-tar-posix-sparse-0.1",
            &["--format=posix", "--sparse", "--sparse-version=0.1"],
        ),
        (
            "gnu-tar-posix-sparse-1.0",
            &["--format=posix", "--sparse", "--sparse-version=1.0"],
        ),
        // bsdtar finds holes by itself and writes them as PAX 1.0.
        ("bsdtar-pax-sparse", &["--format", "pax"]),
    ];
    for (name, args) in cases {
        let out = t.case_dir(name).join("layer.tar");
        let tar = t.writer(name, || {
            let tar = if name.starts_with("bsdtar") {
                bsdtar(&src, &out, args)?
            } else {
                gnu_tar(&src, &out, &[args, &["--numeric-owner"][..]].concat())?
            };
            // Holes the filesystem did not keep would make this an ordinary layer.
            if has_sparse_entry(&tar) {
                Ok(tar)
            } else {
                Err("the writer wrote no sparse entry".into())
            }
        });
        let Some(tar) = tar else { continue };
        if args.contains(&"--format=posix") || name.starts_with("bsdtar") {
            t.layers(name, vec![raw_layer(tar.clone())]);
            t.zstd_twin(&format!("{name}-zstd"), &[tar]);
        } else {
            // umoci 0.4.7 stops at the old GNU `S` typeflag ("unknown typeflag"), though Go's
            // reader expands the data: GNU tar's own extraction is the oracle.
            let extracted = t.case_dir(name).join("extracted");
            if t.writer(name, || gnu_extract(&out, &extracted)).is_some() {
                let layers = vec![raw_layer(tar.clone())];
                t.layers_extracted(name, layers, extracted.clone());
                let layers = vec![raw_layer(tar).compression(Compression::Zstd)];
                t.layers_extracted(&format!("{name}-zstd"), layers, extracted);
            }
        }
    }
    t.check();
}

/// Where the last entry's data ends in `tar` (ustar or GNU headers, no PAX): the offset
/// after its last byte, before padding.
fn end_of_last_data(tar: &[u8]) -> usize {
    let mut at = 0;
    let mut end = 0;
    while let Some(h) = tar.get(at..at + 512) {
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let digits = String::from_utf8_lossy(&h[124..136]);
        let size = usize::from_str_radix(digits.trim_matches(|c: char| c == '\0' || c == ' '), 8)
            .expect("octal size");
        end = at + 512 + size;
        at += 512 + size.next_multiple_of(512);
    }
    end
}

/// The three ways a GNU tar stream is cut: after the last data byte, after its padding
/// (no end-of-archive blocks), and with only the first end-of-archive block.
fn cut_streams(t: &mut Table) -> Option<Vec<(&'static str, Vec<u8>)>> {
    let src = t.trees.get("cut", |root| {
        mkdir(root, 0o755, (0, 0));
        mkdir(&root.join("a"), 0o755, (0, 0));
        put(&root.join("a/file"), &noise(8, 1000), 0o644, (0, 0));
        // Last in name order, and 777 bytes: its data ends inside a block.
        put(&root.join("z-last"), &noise(9, 777), 0o644, (0, 0));
    });
    let out = t.case_dir("cut").join("layer.tar");
    let tar = t.writer("cut", || gnu_tar(&src, &out, &["--format=gnu"]))?;
    let end = end_of_last_data(&tar);
    assert_eq!(end % 512, 777 % 512, "the last entry is z-last");
    let padded = end.next_multiple_of(512);
    Some(vec![
        ("after-data", tar[..end].to_vec()),
        ("after-padding", tar[..padded].to_vec()),
        ("one-eof-block", tar[..padded + 512].to_vec()),
    ])
}

/// The cut streams named `cuts`, each plain, gzip and zstd.
fn check_cut_streams(test: &'static str, cuts: &[&str]) {
    let tools = prerequisites(test, &["tar"]);
    let mut t = Table::new(test, tools);
    for (cut, tar) in cut_streams(&mut t).into_iter().flatten() {
        if !cuts.contains(&cut) {
            continue;
        }
        t.layers(&format!("cut-{cut}"), vec![raw_layer(tar.clone())]);
        t.layers(
            &format!("cut-{cut}-gzip"),
            vec![raw_layer(tar.clone()).compression(Compression::Gzip)],
        );
        t.zstd_twin(&format!("cut-{cut}-zstd"), &[tar]);
    }
    t.check();
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn gnu_tar_streams_cut_after_padding_or_one_eof_block_match_the_oracle() {
    check_cut_streams(
        "gnu_tar_streams_cut_after_padding_or_one_eof_block_match_the_oracle",
        &["after-padding", "one-eof-block"],
    );
}

/// umoci 0.4.7 writes every layer this way (see `umoci_layers_match_the_oracle`).
#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn gnu_tar_stream_cut_after_the_last_data_byte_matches_the_oracle() {
    check_cut_streams(
        "gnu_tar_stream_cut_after_the_last_data_byte_matches_the_oracle",
        &["after-data"],
    );
}

/// `umoci ARGS` on the layout `image` (tag `latest`).
fn umoci(args: &[&str], image: &Path, rest: &[&Path]) -> Result<(), String> {
    run(Command::new("umoci")
        .args(args)
        .arg("--image")
        .arg(format!("{}:latest", image.display()))
        .args(rest))
    .map(drop)
}

/// An image written by umoci itself: `insert` of the lower tree, `insert --whiteout` and
/// `insert --opaque` for the upper changes, then (when `repack`) an unpack, edits of the
/// rootfs, and `repack`, whose layer holds the whiteouts umoci computes from the edits.
fn umoci_image(image: &Path, lower: &Path, upper: &Path, repack: bool) -> Result<(), String> {
    run(Command::new("umoci").args(["init", "--layout"]).arg(image))?;
    umoci(&["new"], image, &[])?;
    umoci(&["insert"], image, &[lower, Path::new("/")])?;
    for w in WHITEOUTS {
        umoci(&["insert", "--whiteout"], image, &[&Path::new("/").join(w)])?;
    }
    umoci(
        &["insert", "--opaque"],
        image,
        &[&upper.join(OPAQUE), &Path::new("/").join(OPAQUE)],
    )?;
    if !repack {
        return Ok(());
    }
    let bundle = image.with_extension("bundle");
    umoci(&["unpack"], image, &[&bundle])?;
    let root = bundle.join("rootfs");
    let edit = || -> std::io::Result<()> {
        fs::remove_file(root.join("abs"))?;
        fs::remove_dir_all(root.join("dev"))?;
        fs::write(root.join("etc/motd"), b"repacked\n")?;
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o755))?;
        fs::create_dir_all(root.join("srv/new"))?;
        fs::write(root.join("srv/new/file"), noise(10, 2000))?;
        fs::hard_link(root.join("srv/new/file"), root.join("srv/new/link"))
    };
    edit().map_err(|e| format!("editing the unpacked rootfs: {e}"))?;
    umoci(&["repack"], image, &[&bundle])?;
    fs::remove_dir_all(&bundle).map_err(|e| e.to_string())
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn umoci_layers_match_the_oracle() {
    let test = "umoci_layers_match_the_oracle";
    let tools = prerequisites(test, &[]);
    let mut t = Table::new(test, tools);
    let lower = t.trees.lower(XATTRS);
    let upper = t.trees.get("upper", make_upper);
    for (name, repack) in [("umoci-insert", false), ("umoci-repack", true)] {
        let image = t.case_dir(name).join("image");
        let built = umoci_image(&image, &lower, &upper, repack);
        t.image(name, built.map(|()| (tagged(&image), Oracle::Umoci(image))));
    }
    t.check();
}

fn skopeo_copy(args: &[&str], from: &str, to: &str) -> Result<(), String> {
    run(Command::new("skopeo")
        .args(["copy", "-q"])
        .args(args)
        .arg(from)
        .arg(to))
    .map(drop)
}

/// True if every layer blob of the OCI layout `dir` is zstd.
fn layers_are_zstd(dir: &Path) -> Result<bool, String> {
    let index: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("index.json"))?).map_err(|e| e.to_string())?;
    let blob = |digest: &str| {
        dir.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or("no manifest")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(&blob(manifest))?).map_err(|e| e.to_string())?;
    let layers = manifest["layers"].as_array().ok_or("no layers")?;
    for layer in layers {
        let digest = layer["digest"].as_str().ok_or("no digest")?;
        if !read(&blob(digest))?.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Ok(false);
        }
    }
    Ok(!layers.is_empty())
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn skopeo_conversions_match_the_oracle() {
    let test = "skopeo_conversions_match_the_oracle";
    let tools = prerequisites(test, &["skopeo", "tar", "go"]);
    let mut t = Table::new(test, tools);
    // The source: a GNU tar layer under a Go layer with whiteouts and an opaque directory.
    let lower = t.trees.lower(XATTRS);
    let dir = t.case_dir("source");
    let base = t.writer("gnu-tar-lower", || {
        gnu_tar(&lower, &dir.join("lower.tar"), POSIX_XATTRS)
    });
    let (Some(base), Some(upper)) = (base, go_upper_layer(&mut t, &dir)) else {
        return t.check();
    };
    let layers = [raw_layer(base), raw_layer(upper)];
    let source = dir.join("image");
    write_oci_layout(&layers, &default_config(&layers), &source, Some(OCI_REF));
    let oci = |p: &Path| format!("oci:{}", tagged(p));

    // A conversion is checked against umoci's unpack of the source unless umoci reads the
    // converted image itself.
    let docker = t.case_dir("skopeo-docker-archive").join("image.tar");
    let docker_ref = format!("docker-archive:{}:corpus:latest", docker.display());
    let to_docker = skopeo_copy(&[], &oci(&source), &docker_ref);
    let docker_ok = to_docker.is_ok();
    let image = docker.display().to_string();
    t.image(
        "skopeo-docker-archive",
        to_docker.map(|()| (image, Oracle::Umoci(source.clone()))),
    );
    if docker_ok {
        let back = t.case_dir("skopeo-docker-archive-to-oci").join("image");
        let built = skopeo_copy(&[], &docker_ref, &oci(&back));
        t.image(
            "skopeo-docker-archive-to-oci",
            built.map(|()| (tagged(&back), Oracle::Umoci(back.clone()))),
        );
        let archive = t.case_dir("skopeo-oci-archive-gzip").join("image.tar");
        let built = skopeo_copy(
            &["--dest-compress", "--dest-compress-format", "gzip"],
            &docker_ref,
            &format!("oci-archive:{}:latest", archive.display()),
        );
        let image = archive.display().to_string();
        t.image(
            "skopeo-oci-archive-gzip",
            built.map(|()| (image, Oracle::Umoci(source.clone()))),
        );
    }
    let zstd = t.case_dir("skopeo-zstd").join("image");
    let built = skopeo_copy(
        &["--dest-compress-format", "zstd"],
        &oci(&source),
        &oci(&zstd),
    )
    .and_then(|()| match layers_are_zstd(&zstd)? {
        true => Ok((tagged(&zstd), Oracle::Umoci(source.clone()))),
        false => Err("skopeo did not recompress the layers with zstd".into()),
    });
    t.image("skopeo-zstd", built);
    t.check();
}

/// `podman` with storage, runroot and settings of its own under `dir`: the settings of
/// ../shared/tools/make-images.sh (no network, cgroupfs, rlimits the sandbox allows), with
/// the overlay driver where the kernel has it, as podman uses by default.
fn podman(dir: &Path) -> Command {
    let conf = dir.join("containers.conf");
    if !conf.exists() {
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
        let driver = match fs::read_to_string("/proc/filesystems") {
            Ok(f) if f.lines().any(|l| l.ends_with("\toverlay")) => "overlay",
            _ => "vfs",
        };
        fs::create_dir_all(dir).expect("mkdir podman");
        fs::write(
            &conf,
            format!(
                "[containers]\nnetns = \"none\"\ndefault_ulimits = [\"nofile={n}:{n}\", \
                 \"nproc=4096:4096\"]\n[engine]\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\n",
                n = nofile.rlim_max
            ),
        )
        .expect("write containers.conf");
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"{driver}\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.join("run").display(),
                dir.join("graph").display()
            ),
        )
        .expect("write storage.conf");
    }
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf)
        .env("CONTAINERS_STORAGE_CONF", dir.join("storage.conf"));
    cmd
}

/// Podman's storage under a test's work dir: on drop, its images go and the overlay driver's
/// own mount of its storage dir (which it leaves behind) is undone, so the dir can be removed.
struct PodmanStore(PathBuf);

impl Drop for PodmanStore {
    fn drop(&mut self) {
        if !self.0.join("containers.conf").exists() {
            return;
        }
        let _ = podman(&self.0).args(["rmi", "-a", "-f"]).output();
        let overlay = self.0.join("graph/overlay");
        if is_mounted(&overlay) {
            let _ = Command::new("umount").arg(&overlay).output();
        }
    }
}

/// The names in every layer of the OCI layout `dir` that start with `.wh.`.
fn whiteout_names(dir: &Path) -> Result<Vec<String>, String> {
    let json = |p: &Path| -> Result<serde_json::Value, String> {
        serde_json::from_slice(&read(p)?).map_err(|e| e.to_string())
    };
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index = json(&dir.join("index.json"))?;
    let manifest = json(&blob(
        index["manifests"][0]["digest"]
            .as_str()
            .ok_or("no manifest")?,
    ))?;
    let mut names = Vec::new();
    for layer in manifest["layers"].as_array().ok_or("no layers")? {
        let tar = decompress(&read(&blob(layer["digest"].as_str().ok_or("no digest")?))?);
        let mut archive = tar::Archive::new(tar.as_slice());
        for entry in archive.entries().map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            if path
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with(".wh."))
            {
                names.push(path);
            }
        }
    }
    Ok(names)
}

/// `Err` unless the layout `dir` holds a whiteout and an opaque marker: the case is about
/// the merge.
fn has_whiteouts_and_opaque(dir: &Path) -> Result<(), String> {
    let names = whiteout_names(dir)?;
    if names.iter().any(|n| n.ends_with(".wh..wh..opq"))
        && names.iter().any(|n| !n.ends_with(".wh..wh..opq"))
    {
        Ok(())
    } else {
        Err(format!(
            "{}: expected whiteouts and an opaque marker in its layers, found {names:?}",
            dir.display()
        ))
    }
}

/// Builds `containerfile` in `ctx` as `tag` and pushes it to the OCI layout `out`.
fn podman_build(
    pod: &Path,
    ctx: &Path,
    containerfile: &str,
    tag: &str,
    out: &Path,
) -> Result<(), String> {
    fs::write(ctx.join("Containerfile"), containerfile).map_err(|e| e.to_string())?;
    // RUN steps in a chroot: no OCI runtime needed (crun 1.8 refuses this host's hybrid
    // cgroups, and runc is not a podman dependency); chroot isolation needs host networking.
    run(podman(pod)
        .args([
            "build",
            "-q",
            "--isolation",
            "chroot",
            "--timestamp",
            "1700000000",
            "-t",
            tag,
        ])
        .arg(ctx))?;
    run(podman(pod)
        .args(["push", "-q", tag])
        .arg(format!("oci:{}:latest", out.display())))
    .map(drop)
}

#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn podman_built_images_match_the_oracle() {
    let test = "podman_built_images_match_the_oracle";
    let tools = prerequisites(test, &["podman", "skopeo", "tar", "go", "busybox"]);
    let mut t = Table::new(test, tools);
    // Declared after `t`, so dropped before `t` removes the work dir.
    let store = PodmanStore(t.work().join("podman"));
    let pod = store.0.clone();
    let lower = t.trees.lower(XATTRS);
    let upper = t.trees.get("upper", make_upper);
    let ctx = t.case_dir("context");
    let prepared = t.writer("context", || {
        gnu_tar(&lower, &ctx.join("lower.tar"), POSIX_XATTRS)?;
        run(Command::new("cp")
            .arg("-a")
            .arg(&upper)
            .arg(ctx.join("upper")))?;
        let busybox = run_text(Command::new("sh").args(["-c", "command -v busybox"]))?;
        fs::copy(busybox.trim(), ctx.join("busybox"))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let Some(()) = prepared else { return t.check() };

    // podman writes every layer: ADD extracts the tar into its storage, COPY copies a tree,
    // and the RUN steps delete (whiteouts) and recreate a directory (an opaque marker under
    // the overlay driver). /etc/hostname is bind-mounted during RUN, so it stays.
    let image = t.case_dir("podman-build").join("image");
    let built = podman_build(
        &pod,
        &ctx,
        "FROM scratch\n\
         ADD lower.tar /\n\
         COPY upper/ /\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"rm\", \"-rf\", \"/etc/new\", \"/dir/sub\", \"/rel\"]\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"rm -rf /home/user && mkdir /home/user && \
         echo again > /home/user/again\"]\n",
        "localhost/corpus-build:latest",
        &image,
    )
    .and_then(|()| has_whiteouts_and_opaque(&image));
    let built_ok = built.is_ok();
    t.image(
        "podman-build",
        built.map(|()| (tagged(&image), Oracle::Umoci(image.clone()))),
    );
    if built_ok {
        // The docker archive `podman save` writes from the same storage.
        let saved = t.case_dir("podman-save").join("image.tar");
        let c = run(podman(&pod)
            .args(["save", "-q", "--format", "docker-archive", "-o"])
            .arg(&saved)
            .arg("localhost/corpus-build:latest"));
        let name = saved.display().to_string();
        t.image(
            "podman-save",
            c.map(|_| (name, Oracle::Umoci(image.clone()))),
        );
    }

    // No RUN: the whiteouts come from a Go-written base image that podman stores and pushes
    // again, under a COPY layer of podman's own.
    let dir = t.case_dir("podman-from-oci");
    let moby = t.writer("go-lower", || {
        go_writer(&lower, &dir.join("lower.tar"), &["-moby"])
    });
    let (Some(moby), Some(up)) = (moby, go_upper_layer(&mut t, &dir)) else {
        return t.check();
    };
    let layers = [raw_layer(moby), raw_layer(up)];
    let base = dir.join("base");
    write_oci_layout(&layers, &default_config(&layers), &base, Some(OCI_REF));
    let image = dir.join("image");
    // Into podman's storage with skopeo: `FROM oci:PATH` makes an image name of the path,
    // which fails on the temp dir's capital letters.
    let mut store_base = Command::new("skopeo");
    for (k, v) in podman(&pod).get_envs() {
        store_base.env(k, v.expect("set"));
    }
    let built = run(store_base
        .args(["copy", "-q"])
        .arg(format!("oci:{}", tagged(&base)))
        .arg("containers-storage:localhost/corpus-go:latest"))
    .and_then(|_| {
        podman_build(
            &pod,
            &ctx,
            "FROM localhost/corpus-go:latest\nCOPY busybox /bin/busybox\n",
            "localhost/corpus-from-oci:latest",
            &image,
        )
    })
    .and_then(|()| has_whiteouts_and_opaque(&image));
    t.image(
        "podman-from-oci",
        built.map(|()| (tagged(&image), Oracle::Umoci(image.clone()))),
    );
    t.check();
}

/// GNU tar's incremental dumps (`-g`: directories as `D` entries listing their contents) and
/// volume labels (`-V`: a `V` entry) are refused, by name, as Docker's and containerd's
/// appliers and umoci refuse them ("unhandled tar header type", "unknown typeflag"): no
/// runtime can run such a layer, so no image holds one. (With `--format=posix`, `-V` writes
/// a global PAX header instead, which every reader, flatfs included, skips.)
#[test]
#[ignore = "needs root, ../shared/tools and every tar writer: scripts/test.sh runs it with the oracle tests"]
fn gnu_tar_incremental_and_volume_label_layers_are_refused_as_runtimes_refuse_them() {
    let test = "gnu_tar_incremental_and_volume_label_layers_are_refused_as_runtimes_refuse_them";
    let _tools = prerequisites(test, &["tar"]);
    // A table for its work dir and trees; its cases are not the kind `check` runs.
    let mut t = Table::new(test, PathBuf::new());
    let src = t.trees.lower(V7);
    let mut failures = Vec::new();
    let snapshot = format!("--listed-incremental={}", t.work().join("snar").display());
    let cases: [(&str, &[&str], char); 2] = [
        ("incremental", &["--format=gnu", &snapshot], 'D'),
        ("label", &["--format=gnu", "--label=corpus"], 'V'),
    ];
    for (name, args, typeflag) in cases {
        let dir = t.case_dir(name);
        let tar = gnu_tar(&src, &dir.join("layer.tar"), args).expect("GNU tar");
        let image = dir.join("image");
        let layers = [raw_layer(tar)];
        write_oci_layout(&layers, &default_config(&layers), &image, Some(OCI_REF));
        let umoci = run(Command::new("umoci")
            .args(["unpack", "--image", &tagged(&image)])
            .arg(dir.join("bundle")));
        if umoci.is_ok() {
            failures.push(format!(
                "{name}: umoci reads the layer: is it still refused?"
            ));
        }
        let out = run_flatfs([
            "export".as_ref(),
            tagged(&image).as_ref(),
            "-o".as_ref(),
            dir.join("rootfs.tar").as_os_str(),
        ]);
        let stderr = stderr_of(&out);
        let want = format!("unsupported tar entry type '{typeflag}'");
        if out.status.code() != Some(1)
            || !stderr.contains(&want)
            || dir.join("rootfs.tar").exists()
        {
            failures.push(format!(
                "{name}: expected exit 1 with {want:?} and no output, got {}: {stderr}",
                out.status
            ));
        }
        if fuse_available(test) {
            match Mount::new(&tagged(&image), &dir.join("mnt")) {
                Err(e) if e.contains(&want) => {}
                Err(e) => failures.push(format!("{name}: mount: expected {want:?}, got {e}")),
                Ok(_) => failures.push(format!("{name}: the layer mounts")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
