//! `flatfs mount` end to end (issue 3): real mounts of images built in code, checked through the
//! kernel: the tree listing, contents, symlinks, devices, xattrs, hardlinks, EROFS, `--layers`,
//! parallel readers, signals, `flatfs umount` of a dead mount, and the error contract.
//!
//! FUSE tests skip (saying why) only when /dev/fuse is missing, and fail instead under
//! `FLATFS_REQUIRE_FUSE=1`. Every mount is made through a [`Mounted`] guard, which unmounts it
//! whatever the test did, so a failing test leaves no mount behind.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use flatfs::mount::is_mounted;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::util::*;

/// How long a mount, an unmount or a server's exit may take before the test calls it hung.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Harness

macro_rules! require_fuse {
    ($name:expr) => {
        if !fuse_available($name) {
            return;
        }
    };
}

/// A mountpoint in a temp dir; on drop, whatever is mounted there is unmounted (by
/// `flatfs umount`, else `umount -l`) and a foreground server is killed.
struct Mounted {
    mnt: PathBuf,
    server: Option<Child>,
    tmp: TempDir,
}

impl Mounted {
    /// An empty mountpoint (canonical, as the mount table shows it) in a fresh temp dir.
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).expect("create mountpoint");
        let mnt = mnt.canonicalize().expect("canonical mountpoint");
        Mounted {
            mnt,
            server: None,
            tmp,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// A file beside the mountpoint (where images are written).
    fn beside(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Runs `flatfs mount ARGS IMAGE MNT` (daemon mode) and asserts it worked.
    #[track_caller]
    fn mount(&self, image: &Path, args: &[&str]) {
        let out = self.try_mount(image, args);
        assert_success(&out);
        assert!(
            is_mounted(&self.mnt),
            "flatfs returned 0 but nothing is mounted"
        );
    }

    fn try_mount(&self, image: &Path, args: &[&str]) -> Output {
        let mut cmd = flatfs();
        cmd.arg("mount").args(args).arg(image).arg(&self.mnt);
        run_within(cmd)
    }

    /// Starts `flatfs mount -f IMAGE MNT` and waits until the mount is live.
    fn mount_foreground(&mut self, image: &Path) -> Pid {
        let child = flatfs()
            .arg("mount")
            .arg("-f")
            .arg(image)
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flatfs mount -f");
        let pid = Pid::from_raw(child.id() as i32);
        self.server = Some(child);
        wait_for(|| is_mounted(&self.mnt), "the foreground mount to appear");
        pid
    }

    /// The daemon serving this mount.
    fn server_pid(&self) -> Pid {
        server_pid(&self.mnt).expect("a flatfs process serving the mount")
    }
}

impl Drop for Mounted {
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

/// Runs `cmd` with stdout and stderr piped, failing the test if it takes longer than
/// [`PATIENCE`]: a daemon that kept the pipes open, or a hung mount, must not hang the run.
fn run_within(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(out) => out.unwrap_or_else(|e| panic!("cannot run {shown}: {e}")),
        Err(_) => panic!("{shown} did not finish within {PATIENCE:?}"),
    }
}

#[track_caller]
fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The flatfs process whose command line ends with `mnt`: the daemon has the command line
/// of the `flatfs mount` it forked from.
fn server_pid(mnt: &Path) -> Option<Pid> {
    let bin = Path::new(env!("CARGO_BIN_EXE_flatfs"));
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        if args.first() == Some(&bin.as_os_str().as_bytes())
            && args.get(1) == Some(&&b"mount"[..])
            && args.last() == Some(&mnt.as_os_str().as_bytes())
            && alive(Pid::from_raw(pid))
        {
            return Some(Pid::from_raw(pid));
        }
    }
    None
}

/// True while the process exists and is not a zombie.
fn alive(pid: Pid) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // pid (comm) STATE …; comm may hold spaces and parentheses, so look after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Name and blocked signals of each thread of `pid`, for failure messages.
fn signal_masks(pid: Pid) -> String {
    let mut out = String::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let fields: Vec<&str> = status
            .lines()
            .filter(|l| l.starts_with("Name:") || l.starts_with("SigBlk:"))
            .collect();
        out.push_str(&format!("{:?} {}\n", task.file_name(), fields.join(" ")));
    }
    out
}

fn signal(pid: Pid, sig: Signal) {
    kill(pid, sig).unwrap_or_else(|e| panic!("kill {pid} {sig}: {e}"));
}

/// Writes `layers` as a docker archive beside the mountpoint.
fn docker_image(m: &Mounted, layers: &[Layer]) -> PathBuf {
    let path = m.beside("image.docker.tar");
    write_docker_archive(layers, &default_config(layers), &path);
    path
}

/// Writes `layers` as an OCI layout beside the mountpoint.
fn oci_image(m: &Mounted, layers: &[Layer]) -> PathBuf {
    let path = m.beside("image-oci");
    write_oci_layout(layers, &default_config(layers), &path, Some(OCI_REF));
    path
}

fn errno_of<T: std::fmt::Debug>(res: io::Result<T>) -> i32 {
    let err = res.expect_err("the operation must fail");
    err.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {err}"))
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// `lgetxattr(2)` with a buffer of `size` bytes: the length it returns and the bytes, or errno.
fn lgetxattr(path: &Path, name: &str, size: usize) -> Result<(usize, Vec<u8>), i32> {
    let (path, name) = (c_path(path), CString::new(name).expect("name"));
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: both strings are NUL-terminated; `ptr` is null with size 0, else `size` bytes.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), ptr, size) };
    if n < 0 {
        return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(n as usize);
    Ok((n as usize, buf))
}

/// `llistxattr(2)`: the names, in the order the filesystem gives them.
fn llistxattr(path: &Path) -> Vec<Vec<u8>> {
    let path = c_path(path);
    // SAFETY: a NUL-terminated path; a null buffer with size 0 asks for the length.
    let len = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(len >= 0, "llistxattr: {}", io::Error::last_os_error());
    let mut buf = vec![0u8; len as usize];
    // SAFETY: `buf` holds `len` bytes.
    let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr: {}", io::Error::last_os_error());
    buf.truncate(n as usize);
    buf.split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// An xattr value as the listing shows it (as `util::tar_listing` does).
fn xattr_text(v: &[u8]) -> String {
    if v.iter()
        .all(|b| b.is_ascii_graphic() && !b";=\"\\".contains(b))
    {
        format!("\"{}\"", String::from_utf8_lossy(v))
    } else {
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

fn order_key(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect()
}

/// The tree under `root` as the kernel shows it, in the format of `util::tar_listing`
/// (`PATH TYPE MODE UID GID SIZE CONTENT XATTRS MTIME LINK`): a later name of a hardlinked
/// inode, in rootfs order, shows `=>FIRST` as a tar's link entry does.
fn mount_listing(root: &Path) -> String {
    let mut entries: Vec<(Vec<u8>, fs::Metadata)> = Vec::new();
    let mut dirs = vec![Vec::new()];
    while let Some(rel) = dirs.pop() {
        let full = root.join(OsStr::from_bytes(&rel));
        for entry in fs::read_dir(&full).unwrap_or_else(|e| panic!("read_dir {full:?}: {e}")) {
            let entry = entry.expect("dir entry");
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(entry.file_name().as_bytes());
            let meta = fs::symlink_metadata(entry.path()).expect("lstat");
            if meta.is_dir() {
                dirs.push(path.clone());
            }
            entries.push((path, meta));
        }
    }
    entries.push((Vec::new(), fs::symlink_metadata(root).expect("lstat root")));
    entries.sort_by(|a, b| order_key(&a.0).cmp(&order_key(&b.0)));

    let mut first_name: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut lines = Vec::new();
    for (rel, meta) in &entries {
        let full = root.join(OsStr::from_bytes(rel));
        let ft = meta.file_type();
        let none = || "-".to_string();
        let (kind, size, content_col) = if ft.is_dir() {
            ("d", none(), none())
        } else if ft.is_file() {
            let data = fs::read(&full).unwrap_or_else(|e| panic!("read {full:?}: {e}"));
            assert_eq!(
                data.len() as u64,
                meta.len(),
                "{full:?}: st_size vs bytes read"
            );
            ("f", meta.len().to_string(), content(&data))
        } else if ft.is_symlink() {
            let target = fs::read_link(&full).expect("readlink");
            let target = target.as_os_str().as_bytes();
            assert_eq!(target.len() as u64, meta.len(), "{full:?}: symlink st_size");
            ("l", meta.len().to_string(), format!("->{}", esc(target)))
        } else if ft.is_char_device() || ft.is_block_device() {
            let dev = format!("{},{}", libc::major(meta.rdev()), libc::minor(meta.rdev()));
            (if ft.is_char_device() { "c" } else { "b" }, none(), dev)
        } else if ft.is_fifo() {
            ("p", none(), none())
        } else {
            ("?", none(), none())
        };
        let mut xattrs: Vec<(Vec<u8>, String)> = llistxattr(&full)
            .into_iter()
            .map(|name| {
                let value = match lgetxattr(&full, &String::from_utf8_lossy(&name), 65536) {
                    Ok((_, v)) => xattr_text(&v),
                    Err(e) => format!("!errno{e}"),
                };
                (name, value)
            })
            .collect();
        xattrs.sort();
        let xattrs = if xattrs.is_empty() {
            none()
        } else {
            let parts: Vec<String> = xattrs
                .iter()
                .map(|(n, v)| format!("{}={v}", esc(n)))
                .collect();
            parts.join(";")
        };
        let mtime = if meta.mtime_nsec() == 0 {
            meta.mtime().to_string()
        } else {
            format!("{}.{:09}", meta.mtime(), meta.mtime_nsec())
        };
        let link = if !ft.is_dir() && meta.nlink() > 1 {
            match first_name.get(&meta.ino()) {
                Some(first) => format!("=>{}", esc(first)),
                None => {
                    first_name.insert(meta.ino(), rel.clone());
                    none()
                }
            }
        } else {
            none()
        };
        let shown = if rel.is_empty() {
            ".".to_string()
        } else {
            esc(rel)
        };
        lines.push(format!(
            "{shown} {kind} {:04o} {} {} {size} {content_col} {xattrs} {mtime} {link}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
        ));
    }
    expected(&lines.join("\n"))
}

// ---------------------------------------------------------------------------------------
// The sample image

/// A valid VFS_CAP_REVISION_2 `security.capability` (cap_net_raw permitted): the kernel parses
/// this xattr on the way out, so it must be well-formed to come back at all.
const CAP_NET_RAW: &[u8] =
    b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

fn busybox() -> Vec<u8> {
    noise(1, 100_000)
}

fn big() -> Vec<u8> {
    noise(2, 3 * 1024 * 1024 + 123)
}

/// Three layers (gzip, zstd, plain) touching every kind of node and most overlay rules.
fn sample_layers() -> Vec<Layer> {
    vec![
        layer([
            dir("etc"),
            file("etc/passwd", "root:x:0:0"),
            file("etc/shadow", "root:*:1").mode(0o640).gid(42),
            dir("bin"),
            file("bin/busybox", busybox()).mode(0o755),
            hardlink("bin/sh", "bin/busybox"),
            hardlink("bin/ls", "bin/busybox"),
            symlink("lib", "usr/lib"),
            file("usr/lib/libc.so", "ELF"),
            chardev("dev/null", 1, 3),
            chardev("dev/big", 4095, 1_048_575),
            blockdev("dev/sda", 8, 0),
            fifo("run/fifo"),
            fifo("run/initctl"),
            file("ping", "p")
                .mode(0o4755)
                .xattr("security.capability", CAP_NET_RAW),
            file("attrs", "a")
                .xattr("user.text", "hello")
                .xattr("user.bin", b"\x00\xff\n")
                .xattr("user.empty", ""),
            dir("tmp").mode(0o1777),
            file("owned", "o").uid(3_000_000).gid(7),
            file("precise", "t").mtime_ns(1_700_000_000, 123_456_789),
            file("sp ace", "s"),
            file(b"\xff\xfe", "u"),
            dir("old"),
            file("old/a", "1"),
            file("old/b", "2"),
            file("gone", "bye"),
            hardlink("kept", "gone"),
        ])
        .compression(Compression::Gzip),
        layer([
            whiteout("gone"),
            opaque("old"),
            file("old/c", "3"),
            file("etc/passwd", "root:x:0:0:root"),
            dir("etc").mode(0o750),
        ])
        .compression(Compression::Zstd),
        layer([
            whiteout("run/fifo"),
            file("big", big()),
            symlink("dangling", "/no/such/file"),
        ])
        .compression(Compression::None),
    ]
}

fn sample_listing() -> String {
    let bb = sha256_hex(&busybox());
    let big = sha256_hex(&big());
    let cap: String = CAP_NET_RAW.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        r#"
        .               d 0755 0       0  -       -                 -  0    -
        attrs           f 0644 0       0  1       "a"               user.bin=0x00ff0a;user.empty="";user.text="hello" 1000 -
        big             f 0644 0       0  3145851 sha256:{big}      -  1000 -
        bin             d 0755 0       0  -       -                 -  1000 -
        bin/busybox     f 0755 0       0  100000  sha256:{bb}       -  1000 -
        bin/ls          f 0755 0       0  100000  sha256:{bb}       -  1000 =>bin/busybox
        bin/sh          f 0755 0       0  100000  sha256:{bb}       -  1000 =>bin/busybox
        dangling        l 0777 0       0  13      ->/no/such/file   -  1000 -
        dev             d 0755 0       0  -       -                 -  0    -
        dev/big         c 0666 0       0  -       4095,1048575      -  1000 -
        dev/null        c 0666 0       0  -       1,3               -  1000 -
        dev/sda         b 0660 0       0  -       8,0               -  1000 -
        etc             d 0750 0       0  -       -                 -  1000 -
        etc/passwd      f 0644 0       0  15      "root:x:0:0:root" -  1000 -
        etc/shadow      f 0640 0       42 8       "root:*:1"        -  1000 -
        kept            f 0644 0       0  3       "bye"             -  1000 -
        lib             l 0777 0       0  7       ->usr/lib         -  1000 -
        old             d 0755 0       0  -       -                 -  1000 -
        old/c           f 0644 0       0  1       "3"               -  1000 -
        owned           f 0644 3000000 7  1       "o"               -  1000 -
        ping            f 4755 0       0  1       "p"               security.capability=0x{cap} 1000 -
        precise         f 0644 0       0  1       "t"               -  1700000000.123456789 -
        run             d 0755 0       0  -       -                 -  0    -
        run/initctl     p 0644 0       0  -       -                 -  1000 -
        sp\x20ace       f 0644 0       0  1       "s"               -  1000 -
        tmp             d 1777 0       0  -       -                 -  1000 -
        usr             d 0755 0       0  -       -                 -  0    -
        usr/lib         d 0755 0       0  -       -                 -  0    -
        usr/lib/libc.so f 0644 0       0  3       "ELF"             -  1000 -
        \xff\xfe        f 0644 0       0  1       "u"               -  1000 -
        "#
    )
}

// ---------------------------------------------------------------------------------------
// What the filesystem shows

#[test]
fn mount_shows_the_merged_tree_through_the_kernel() {
    require_fuse!("mount_shows_the_merged_tree_through_the_kernel");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &[]);
    assert_listing(&mount_listing(&m.mnt), &sample_listing());
}

#[test]
fn an_ending_server_leaves_the_next_mount_at_its_place_alone() {
    require_fuse!("an_ending_server_leaves_the_next_mount_at_its_place_alone");
    // `mount && fusermount3 -u` in a loop: each server ends while the next mount is made at the
    // same place. fuser's own unmount-by-path at the end of serving took that new mount down
    // (14 rounds in 60 with the demo image before the fix); a server must never touch it.
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    for round in 0..40 {
        m.mount(&image, &[]);
        let out = Command::new("fusermount3")
            .arg("-u")
            .arg(&m.mnt)
            .output()
            .expect("run fusermount3");
        assert!(
            out.status.success(),
            "round {round}: the mount was gone before its unmount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn mount_and_export_show_the_same_tree() {
    require_fuse!("mount_and_export_show_the_same_tree");
    // One model, two consumers: the mount lists exactly what `export --format rootfs` writes.
    let m = Mounted::new();
    let image = oci_image(&m, &sample_layers());
    m.mount(&image, &[]);
    assert_listing(&mount_listing(&m.mnt), &rootfs_listing(&image));
}

#[test]
fn mount_reads_file_contents_at_any_offset() {
    require_fuse!("mount_reads_file_contents_at_any_offset");
    let m = Mounted::new();
    let image = oci_image(&m, &sample_layers());
    m.mount(&image, &[]);
    for (path, want) in [("big", big()), ("bin/busybox", busybox())] {
        let path = m.path(path);
        assert!(
            fs::read(&path).expect("read") == want,
            "{path:?}: whole file"
        );
        let file = File::open(&path).expect("open");
        let len = want.len() as u64;
        for (offset, size) in [
            (0, 1),
            (1, 4095),
            (4095, 2),
            (65_535, 131_073),
            (len / 2, 1_048_576),
            (len - 1, 10),
            (len, 10),
            (len + 4096, 10),
        ] {
            let mut buf = vec![0u8; size];
            let n = file.read_at(&mut buf, offset).expect("pread");
            let start = offset.min(len) as usize;
            let end = (offset + size as u64).min(len) as usize;
            assert_eq!(n, end - start, "{path:?}: pread({offset}, {size}) length");
            assert!(
                buf[..n] == want[start..end],
                "{path:?}: pread({offset}, {size}) bytes"
            );
        }
    }
    assert_eq!(
        fs::read(m.path("etc/passwd")).expect("read"),
        b"root:x:0:0:root"
    );
    assert_eq!(fs::read(m.path("kept")).expect("read"), b"bye");
}

#[test]
fn mount_serves_symlinks_devices_and_fifos() {
    require_fuse!("mount_serves_symlinks_devices_and_fifos");
    let long_target = format!("/{}/end", "x".repeat(300));
    let layers = [layer([
        symlink("rel", "../a/b"),
        symlink("abs", "/etc/passwd"),
        symlink("long", &long_target),
        symlink("self", "self"),
        chardev("null", 1, 3),
        chardev("big", 4095, 1_048_575),
        blockdev("loop0", 7, 0),
        fifo("pipe").mode(0o600),
    ])];
    let m = Mounted::new();
    m.mount(&docker_image(&m, &layers), &[]);
    let target = |p: &str| fs::read_link(m.path(p)).expect("readlink");
    assert_eq!(target("rel"), Path::new("../a/b"));
    assert_eq!(target("abs"), Path::new("/etc/passwd"));
    assert_eq!(target("long"), Path::new(&long_target));
    assert_eq!(target("self"), Path::new("self"));
    assert_eq!(
        errno_of(fs::metadata(m.path("self"))),
        libc::ELOOP,
        "the kernel follows our symlinks"
    );
    assert_eq!(errno_of(fs::read_link(m.path("null"))), libc::EINVAL);
    for (name, char_dev, major, minor) in [
        ("null", true, 1, 3),
        ("big", true, 4095, 1_048_575),
        ("loop0", false, 7, 0),
    ] {
        let meta = fs::symlink_metadata(m.path(name)).expect("lstat");
        assert_eq!(meta.file_type().is_char_device(), char_dev, "{name}");
        assert_eq!(meta.file_type().is_block_device(), !char_dev, "{name}");
        assert_eq!(
            (libc::major(meta.rdev()), libc::minor(meta.rdev())),
            (major, minor),
            "{name}: rdev"
        );
    }
    // nodev: a device node is listed but cannot be opened.
    assert_eq!(errno_of(File::open(m.path("null"))), libc::EACCES);
    let pipe = fs::symlink_metadata(m.path("pipe")).expect("lstat");
    assert!(pipe.file_type().is_fifo());
    assert_eq!(pipe.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn mount_shows_symlinks_as_0777_whatever_the_header_says() {
    require_fuse!("mount_shows_symlinks_as_0777_whatever_the_header_says");
    let layers = [layer([
        file("a", "A"),
        symlink("s", "a").mode(0o644),
        dir("d"),
        symlink("d/t", "../a").mode(0o600),
    ])];
    let m = Mounted::new();
    m.mount(&oci_image(&m, &layers), &[]);
    // lstat goes through lookup, the listing through readdirplus: check both.
    for name in ["s", "d/t"] {
        let meta = fs::symlink_metadata(m.path(name)).expect("lstat");
        assert!(meta.file_type().is_symlink(), "{name}");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o777, "{name}");
    }
    for entry in fs::read_dir(m.path("d")).expect("readdir") {
        let meta = entry.expect("entry").metadata().expect("lstat");
        assert_eq!(meta.permissions().mode(), 0o120777);
    }
}

#[test]
fn mount_returns_xattrs_byte_exact() {
    require_fuse!("mount_returns_xattrs_byte_exact");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &[]);
    let ping = m.path("ping");
    assert_eq!(
        lgetxattr(&ping, "security.capability", 0),
        Ok((CAP_NET_RAW.len(), Vec::new())),
        "size 0 asks for the length"
    );
    assert_eq!(
        lgetxattr(&ping, "security.capability", 64),
        Ok((CAP_NET_RAW.len(), CAP_NET_RAW.to_vec()))
    );
    assert_eq!(
        lgetxattr(&ping, "security.capability", CAP_NET_RAW.len() - 1),
        Err(libc::ERANGE)
    );
    assert_eq!(lgetxattr(&ping, "user.missing", 64), Err(libc::ENODATA));

    let attrs = m.path("attrs");
    assert_eq!(
        lgetxattr(&attrs, "user.bin", 3),
        Ok((3, b"\x00\xff\n".to_vec()))
    );
    assert_eq!(lgetxattr(&attrs, "user.empty", 0), Ok((0, Vec::new())));
    assert_eq!(lgetxattr(&attrs, "user.empty", 8), Ok((0, Vec::new())));
    let mut names = llistxattr(&attrs);
    names.sort();
    assert_eq!(names, [&b"user.bin"[..], b"user.empty", b"user.text"]);
    assert!(llistxattr(&m.path("etc/passwd")).is_empty());
    assert_eq!(
        lgetxattr(&m.path("etc/passwd"), "user.text", 64),
        Err(libc::ENODATA)
    );

    // getfattr, as a user would check (the attr package; skipped where it is missing).
    if let Ok(out) = Command::new("getfattr")
        .args(["--absolute-names", "-e", "hex", "-n", "security.capability"])
        .arg(&ping)
        .output()
    {
        let hex: String = CAP_NET_RAW.iter().map(|b| format!("{b:02x}")).collect();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("security.capability=0x{hex}")),
            "getfattr says:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn mount_hardlinks_share_an_inode_and_report_the_link_count() {
    require_fuse!("mount_hardlinks_share_an_inode_and_report_the_link_count");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &[]);
    let stat = |p: &str| fs::symlink_metadata(m.path(p)).expect("lstat");
    let (busybox, sh, ls) = (stat("bin/busybox"), stat("bin/sh"), stat("bin/ls"));
    assert_eq!(busybox.ino(), sh.ino());
    assert_eq!(busybox.ino(), ls.ino());
    assert_eq!(
        (busybox.nlink(), sh.nlink(), ls.nlink()),
        (3, 3, 3),
        "three names, one inode"
    );
    assert_eq!(busybox.dev(), sh.dev());
    // The other name of `kept` was whited out: one name left.
    assert_eq!(stat("kept").nlink(), 1);
    assert_ne!(stat("kept").ino(), stat("bin/busybox").ino());
    // Directories: 2 + subdirectories; the root has bin dev etc old run tmp usr.
    assert_eq!(stat(".").nlink(), 9);
    assert_eq!(stat("usr").nlink(), 3);
    assert_eq!(stat("bin").nlink(), 2);
    // Inode numbers are stable for the life of the mount.
    assert_eq!(stat("bin/ls").ino(), ls.ino());
    assert_eq!(stat(".").ino(), 1, "the root is inode 1");
}

#[test]
fn mount_refuses_every_write_with_erofs() {
    require_fuse!("mount_refuses_every_write_with_erofs");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &[]);
    let passwd = m.path("etc/passwd");
    let erofs = |what: &str, errno: i32| assert_eq!(errno, libc::EROFS, "{what}");
    erofs(
        "open for writing",
        errno_of(File::options().write(true).open(&passwd)),
    );
    erofs(
        "open for appending",
        errno_of(File::options().append(true).open(&passwd)),
    );
    erofs("create", errno_of(File::create(m.path("etc/new"))));
    erofs(
        "create_new",
        errno_of(
            File::options()
                .write(true)
                .create_new(true)
                .open(m.path("new")),
        ),
    );
    erofs("unlink", errno_of(fs::remove_file(&passwd)));
    erofs("mkdir", errno_of(fs::create_dir(m.path("newdir"))));
    erofs("rmdir", errno_of(fs::remove_dir(m.path("old"))));
    erofs(
        "chmod",
        errno_of(fs::set_permissions(
            &passwd,
            fs::Permissions::from_mode(0o777),
        )),
    );
    erofs(
        "chown",
        errno_of(std::os::unix::fs::chown(&passwd, Some(1), Some(1))),
    );
    erofs(
        "rename",
        errno_of(fs::rename(&passwd, m.path("etc/passwd2"))),
    );
    erofs(
        "symlink",
        errno_of(std::os::unix::fs::symlink("x", m.path("link"))),
    );
    erofs("link", errno_of(fs::hard_link(&passwd, m.path("hard"))));
    let c = c_path(&passwd);
    // SAFETY: a NUL-terminated path.
    let truncated = unsafe { libc::truncate(c.as_ptr(), 0) };
    assert_eq!(truncated, -1);
    erofs(
        "truncate",
        io::Error::last_os_error().raw_os_error().unwrap_or(0),
    );
    let name = CString::new("user.x").expect("name");
    // SAFETY: NUL-terminated path and name; the value is 1 byte long.
    let set = unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    assert_eq!(set, -1);
    erofs(
        "setxattr",
        io::Error::last_os_error().raw_os_error().unwrap_or(0),
    );
    // SAFETY: NUL-terminated path and name.
    let removed = unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) };
    assert_eq!(removed, -1);
    erofs(
        "removexattr",
        io::Error::last_os_error().raw_os_error().unwrap_or(0),
    );
    // SAFETY: a NUL-terminated path.
    let access = unsafe { libc::access(c.as_ptr(), libc::W_OK) };
    assert_eq!(access, -1);
    erofs(
        "access(W_OK)",
        io::Error::last_os_error().raw_os_error().unwrap_or(0),
    );
    // Nothing changed.
    assert_eq!(fs::read(&passwd).expect("read"), b"root:x:0:0:root");
    assert_listing(&mount_listing(&m.mnt), &sample_listing());
}

#[test]
fn mount_statfs_reports_a_read_only_filesystem() {
    require_fuse!("mount_statfs_reports_a_read_only_filesystem");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &[]);
    let path = c_path(&m.mnt);
    // SAFETY: statvfs fills the zeroed struct it is given.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    assert_ne!(st.f_flag & libc::ST_RDONLY, 0, "read-only");
    assert_ne!(st.f_flag & libc::ST_NOSUID, 0, "nosuid");
    assert_ne!(st.f_flag & libc::ST_NODEV, 0, "nodev");
    assert_eq!(st.f_bfree, 0);
    // One inode per name, less the later names of hardlinked files (the `=>` lines).
    let inodes = {
        let mut seen = std::collections::HashSet::new();
        for line in sample_listing().lines().filter(|l| !l.trim().is_empty()) {
            if !line.contains("=>") {
                seen.insert(line.split_whitespace().next().map(str::to_string));
            }
        }
        seen.len() as u64
    };
    assert_eq!(st.f_files, inodes);
    assert!(st.f_blocks * st.f_frsize >= 3 * 1024 * 1024 + 100_000);
}

#[test]
fn mount_lists_big_directories_completely() {
    require_fuse!("mount_lists_big_directories_completely");
    // Thousands of long names need many readdir calls, each resuming at its cookie.
    let names: Vec<String> = (0..3000)
        .map(|i| format!("{i:05}-{}", "n".repeat(100 + i % 50)))
        .collect();
    let layers = [layer(
        std::iter::once(dir("many"))
            .chain(
                names
                    .iter()
                    .map(|n| file(format!("many/{n}"), n.as_bytes())),
            )
            .collect::<Vec<_>>(),
    )];
    let m = Mounted::new();
    m.mount(&docker_image(&m, &layers), &[]);
    let mut seen: Vec<String> = fs::read_dir(m.path("many"))
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(seen.len(), names.len());
    assert!(seen == names, "every name exactly once");
    // `ls -l` style: names and attributes in one go (readdirplus where the kernel uses it).
    let out = Command::new("ls")
        .arg("-la")
        .arg(m.path("many"))
        .output()
        .expect("ls");
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        listed.lines().count(),
        names.len() + 3,
        "total, . and .. plus names"
    );
}

// ---------------------------------------------------------------------------------------
// How it is mounted

#[test]
fn mount_layers_n_shows_the_image_as_it_was_after_n_layers() {
    require_fuse!("mount_layers_n_shows_the_image_as_it_was_after_n_layers");
    let layers = [
        layer([file("a", "1"), file("b", "1"), dir("d"), file("d/x", "1")]),
        layer([whiteout("a"), file("b", "2"), opaque("d"), file("d/y", "2")]),
        layer([file("a", "3")]),
    ];
    let tmp = Mounted::new();
    let image = oci_image(&tmp, &layers);
    let view = |n: &str| {
        let m = Mounted::new();
        m.mount(&image, &["--layers", n]);
        let mut names: Vec<String> = Vec::new();
        for p in ["a", "b", "d/x", "d/y"] {
            if let Ok(data) = fs::read(m.path(p)) {
                names.push(format!("{p}={}", String::from_utf8_lossy(&data)));
            }
        }
        names.join(" ")
    };
    assert_eq!(view("1"), "a=1 b=1 d/x=1");
    assert_eq!(view("2"), "b=2 d/y=2");
    assert_eq!(view("3"), "a=3 b=2 d/y=2");
}

#[test]
fn mount_table_shows_fsname_subtype_and_options() {
    require_fuse!("mount_table_shows_fsname_subtype_and_options");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &["--allow-other", "-o", "noexec,noatime"]);
    let table = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mnt = m.mnt.to_string_lossy();
    let line = table
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&mnt))
        .expect("the mount is in the table");
    let (before, after) = line.split_once(" - ").expect("separator");
    let mount_opts: Vec<&str> = before
        .split(' ')
        .nth(5)
        .expect("options")
        .split(',')
        .collect();
    for want in ["ro", "nosuid", "nodev", "noexec", "noatime"] {
        assert!(mount_opts.contains(&want), "{want} missing in {line}");
    }
    let fields: Vec<&str> = after.split(' ').collect();
    assert_eq!(fields[0], "fuse.flatfs", "{line}");
    assert_eq!(fields[1], format!("flatfs:{}", image.display()), "{line}");
    for want in ["allow_other", "default_permissions"] {
        assert!(
            fields[2].split(',').any(|o| o == want),
            "{want} missing in {line}"
        );
    }
}

#[test]
fn mount_reads_an_image_from_stdin() {
    require_fuse!("mount_reads_an_image_from_stdin");
    let m = Mounted::new();
    let layers = sample_layers();
    let bytes = docker_archive_bytes(&layers, &default_config(&layers));
    let mut cmd = flatfs();
    cmd.arg("mount").arg("-").arg(&m.mnt);
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut child = child;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = io::Write::write_all(&mut stdin, &bytes);
        }
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(PATIENCE)
        .expect("flatfs mount - finished")
        .expect("wait");
    assert_success(&out);
    assert_eq!(fs::read(m.path("big")).expect("read"), big());
    assert_listing(&mount_listing(&m.mnt), &sample_listing());
}

/// Reads a whole file in `chunk`-sized preads, optionally with O_DIRECT (bypassing the page
/// cache, so every read reaches the server).
fn read_in_chunks(path: &Path, chunk: usize, direct: bool) -> Vec<u8> {
    let mut options = File::options();
    options.read(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options
        .open(path)
        .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = file
            .read_at(&mut buf, out.len() as u64)
            .unwrap_or_else(|e| panic!("pread {path:?}: {e}"));
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn mount_eight_threads_reading_everything_get_identical_bytes() {
    require_fuse!("mount_eight_threads_reading_everything_get_identical_bytes");
    let sizes = [
        0, 1, 511, 4095, 4096, 4097, 65_536, 131_073, 200_000, 333_333,
    ];
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layers = Vec::new();
    for (l, compression) in [
        Compression::GzipMembers(3),
        Compression::Zstd,
        Compression::None,
    ]
    .into_iter()
    .enumerate()
    {
        let mut entries = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let name = format!("l{l}/f{i:02}");
            let data = noise((l * 100 + i) as u64 + 7, *size);
            entries.push(file(&name, &data));
            files.push((name, data));
        }
        layers.push(layer(entries).compression(compression));
    }
    let m = Mounted::new();
    m.mount(&oci_image(&m, &layers), &[]);

    let threads = 8;
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        for t in 0..threads {
            let (files, barrier, mnt) = (&files, &barrier, &m.mnt);
            s.spawn(move || {
                let mut order: Vec<usize> = (0..files.len()).collect();
                order.rotate_left(t * files.len() / threads);
                if t % 2 == 1 {
                    order.reverse();
                }
                let chunk = 4096 * (t + 1) + 1000 * t;
                barrier.wait();
                for i in order {
                    let (name, want) = &files[i];
                    let got = read_in_chunks(&mnt.join(name), chunk, t < threads / 2);
                    assert!(
                        got == *want,
                        "thread {t}: {name}: {} bytes read, {} expected, first difference at {:?}",
                        got.len(),
                        want.len(),
                        got.iter().zip(want.iter()).position(|(a, b)| a != b)
                    );
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------
// Signals and unmounting

#[test]
fn mount_sigterm_to_the_daemon_unmounts_and_exits() {
    require_fuse!("mount_sigterm_to_the_daemon_unmounts_and_exits");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &[]);
    let pid = m.server_pid();
    signal(pid, Signal::SIGTERM);
    wait_for(|| !alive(pid), "the server to exit");
    assert!(!is_mounted(&m.mnt), "no mount left behind");
    // The directory is usable again.
    m.mount(&image, &[]);
}

#[test]
fn mount_foreground_sigint_and_sigterm_unmount_cleanly() {
    require_fuse!("mount_foreground_sigint_and_sigterm_unmount_cleanly");
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let mut m = Mounted::new();
        let image = docker_image(&m, &sample_layers());
        let pid = m.mount_foreground(&image);
        assert_eq!(
            fs::read(m.path("etc/passwd")).expect("read"),
            b"root:x:0:0:root"
        );
        // Which threads would take the signal, shown if the server dies of it.
        let masks = signal_masks(pid);
        signal(pid, sig);
        let mut server = m.server.take().expect("server");
        wait_for(
            || server.try_wait().expect("try_wait").is_some(),
            "the foreground server to exit",
        );
        let status = server.wait().expect("status");
        let mut stderr = String::new();
        if let Some(mut err) = server.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        assert!(
            status.success(),
            "{sig}: exit {status}\n{stderr}\nthreads before the signal:\n{masks}"
        );
        assert!(stderr.contains("serving in the foreground"), "{stderr}");
        assert!(!is_mounted(&m.mnt), "{sig}: no mount left behind");
    }
}

#[test]
fn mount_sigterm_while_files_are_open_still_leaves_no_mount() {
    require_fuse!("mount_sigterm_while_files_are_open_still_leaves_no_mount");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &[]);
    // An open file and a process whose working directory is inside: the mount is busy.
    let open = File::open(m.path("big")).expect("open");
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .current_dir(m.path("etc"))
        .spawn()
        .expect("spawn sleep");
    let pid = m.server_pid();
    signal(pid, Signal::SIGTERM);
    wait_for(|| !alive(pid), "the server to exit");
    assert!(
        !is_mounted(&m.mnt),
        "a busy mount is detached, not left behind"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    drop(open);
}

#[test]
fn umount_clears_a_mount_whose_server_was_killed() {
    require_fuse!("umount_clears_a_mount_whose_server_was_killed");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    m.mount(&image, &[]);
    let pid = m.server_pid();
    signal(pid, Signal::SIGKILL);
    wait_for(|| !alive(pid), "the server to die");
    assert!(is_mounted(&m.mnt), "SIGKILL leaves the mount behind");
    let errno = errno_of(fs::metadata(&m.mnt));
    assert!(
        [libc::ENOTCONN, libc::ECONNABORTED].contains(&errno),
        "a dead mount: errno {errno}"
    );
    // Mounting again says what is wrong and how to fix it.
    let out = m.try_mount(&image, &[]);
    let stderr = assert_error(&out);
    assert!(stderr.contains("flatfs umount"), "{stderr}");

    let out = run_within({
        let mut cmd = flatfs();
        cmd.arg("umount").arg(&m.mnt);
        cmd
    });
    assert_success(&out);
    assert!(!is_mounted(&m.mnt), "flatfs umount cleared the dead mount");
    m.mount(&image, &[]);
    let out = run_within({
        let mut cmd = flatfs();
        cmd.arg("umount").arg(&m.mnt);
        cmd
    });
    assert_success(&out);
    assert!(!is_mounted(&m.mnt), "flatfs umount unmounts a live mount");
}

#[test]
fn umount_of_something_else_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = assert_error(&run_flatfs([OsStr::new("umount"), dir.path().as_os_str()]));
    assert!(stderr.contains("nothing is mounted there"), "{stderr}");
    assert!(stderr.starts_with("flatfs: umount "), "{stderr}");
    let stderr = assert_error(&run_flatfs(["umount", "/proc"]));
    assert!(stderr.contains("not FUSE"), "{stderr}");
    let stderr = assert_error(&run_flatfs(["umount", "/no/such/dir"]));
    assert!(
        stderr.to_lowercase().contains("no such file or directory"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// Errors

#[test]
fn mount_errors_exit_1_with_a_clear_message_and_leave_no_mount() {
    require_fuse!("mount_errors_exit_1_with_a_clear_message_and_leave_no_mount");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    let garbage = m.beside("garbage.tar");
    fs::write(&garbage, b"this is not an image").expect("write");
    let not_dir = m.beside("file");
    fs::write(&not_dir, b"x").expect("write");
    let missing = m.beside("missing");

    let cases: Vec<(Vec<&OsStr>, &str)> = vec![
        (
            vec![image.as_os_str(), missing.as_os_str()],
            "no such directory",
        ),
        (
            vec![image.as_os_str(), not_dir.as_os_str()],
            "not a directory",
        ),
        (
            vec![garbage.as_os_str(), m.mnt.as_os_str()],
            "not a docker-archive, OCI image layout or OCI archive",
        ),
        (
            vec![OsStr::new("/no/such/image.tar"), m.mnt.as_os_str()],
            "/no/such/image.tar",
        ),
        (
            vec![
                OsStr::new("--layers"),
                OsStr::new("4"),
                image.as_os_str(),
                m.mnt.as_os_str(),
            ],
            "--layers takes 1 to 3",
        ),
        (
            vec![
                OsStr::new("-o"),
                OsStr::new("rw"),
                image.as_os_str(),
                m.mnt.as_os_str(),
            ],
            "read-only",
        ),
        (
            vec![
                OsStr::new("-o"),
                OsStr::new("no_such_option"),
                image.as_os_str(),
                m.mnt.as_os_str(),
            ],
            "-o no_such_option: not a mount option flatfs knows",
        ),
    ];
    for (args, want) in cases {
        let mut cmd = flatfs();
        cmd.arg("mount").args(&args);
        let out = run_within(cmd);
        let stderr = assert_error(&out);
        assert!(
            stderr.contains(want),
            "{args:?}: expected {want:?} in:\n{stderr}"
        );
        assert!(!is_mounted(&m.mnt), "{args:?}: a mount was left behind");
        assert!(
            server_pid(&m.mnt).is_none(),
            "{args:?}: a server was left behind"
        );
    }
    assert!(!missing.exists());

    // A second mount on a live one is refused as busy, and the first keeps working.
    m.mount(&image, &[]);
    let stderr = assert_error(&m.try_mount(&image, &[]));
    assert!(stderr.contains("busy"), "{stderr}");
    assert_eq!(fs::read(m.path("kept")).expect("read"), b"bye");
}

#[test]
fn mount_help_explains_the_options_and_how_to_unmount() {
    let out = run_flatfs(["mount", "--help"]);
    assert_success(&out);
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--foreground",
        "--allow-other",
        "--platform",
        "--layers",
        "-o <OPTS>",
        "flatfs umount",
        "fusermount3 -u",
        "SIGTERM",
    ] {
        assert!(help.contains(want), "{want:?} missing from:\n{help}");
    }
}

// ---------------------------------------------------------------------------------------
// A real image

/// `../shared/tools` (or `$FLATFS_SHARED_DIR/tools`), where make-images.sh lives.
fn shared_tools() -> PathBuf {
    shared_tools_dir()
}

#[test]
#[ignore = "needs root and ../shared/tools/make-images.sh: scripts/test.sh runs it when both are there"]
fn mount_of_the_hello_image_matches_umoci() {
    require_fuse!("mount_of_the_hello_image_matches_umoci");
    let tools = shared_tools();
    let mut missing = Vec::new();
    if !tools.join("make-images.sh").exists() {
        missing.push(format!("{}", tools.join("make-images.sh").display()));
    }
    if !tools.join("tree-manifest.py").exists() || !have("python3") {
        missing.push("tree-manifest.py and python3".into());
    }
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (make-images.sh needs it)".into());
    }
    // Ignored unless asked for: asked for, a missing piece is a failure.
    assert!(missing.is_empty(), "needs {}", missing.join(", "));
    let out_dir = tempfile::tempdir().expect("tempdir");
    let mut make = Command::new(tools.join("make-images.sh"));
    make.arg(out_dir.path()).arg("hello");
    // The oracle tests may build at the same time; with every tool present, running apt-get
    // again could only collide with them on the dpkg lock.
    let needed = [
        "umoci", "skopeo", "jq", "python3", "zstd", "setfattr", "setcap", "busybox",
    ];
    if needed.iter().all(|p| have(p)) {
        make.env("SKIP_APT", "1");
    }
    let built = make.output().expect("run make-images.sh");
    assert!(
        built.status.success(),
        "make-images.sh failed: {}\n{}",
        built.status,
        String::from_utf8_lossy(&built.stderr)
    );
    let expected =
        fs::read_to_string(out_dir.path().join("hello.expected.txt")).expect("expected listing");
    for image in ["hello.docker.tar", "hello.oci.tar", "hello"] {
        let m = Mounted::new();
        m.mount(&out_dir.path().join(image), &[]);
        let out = Command::new("python3")
            .arg(tools.join("tree-manifest.py"))
            .arg("--hardlinks")
            .arg(&m.mnt)
            .output()
            .expect("run tree-manifest.py");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = String::from_utf8_lossy(&out.stdout);
        if got != expected {
            let only_got: Vec<&str> = got.lines().filter(|l| !expected.contains(l)).collect();
            let only_want: Vec<&str> = expected.lines().filter(|l| !got.contains(l)).collect();
            panic!(
                "{image}: the mount differs from umoci's merge\n--- only in the mount\n{}\n--- \
                 only in hello.expected.txt\n{}",
                only_got.join("\n"),
                only_want.join("\n")
            );
        }
        // A program from the image runs from the mount (busybox is static).
        let cat = Command::new(m.path("bin/busybox"))
            .args(["cat", "message.txt"])
            .current_dir(&m.mnt)
            .output();
        if let Ok(cat) = cat {
            assert_eq!(
                String::from_utf8_lossy(&cat.stdout),
                "Hello, World!\n",
                "{image}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// What a user meets (issue 11)

#[test]
fn mount_table_names_the_image_by_its_absolute_path() {
    require_fuse!("mount_table_names_the_image_by_its_absolute_path");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    let mut cmd = flatfs();
    cmd.current_dir(image.parent().unwrap())
        .arg("mount")
        .arg(image.file_name().unwrap())
        .arg(&m.mnt);
    assert_success(&run_within(cmd));
    let table = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mnt = m.mnt.to_string_lossy();
    let line = table
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&mnt))
        .expect("the mount is in the table");
    let source = line.split(" - ").nth(1).and_then(|a| a.split(' ').nth(1));
    assert_eq!(
        source,
        Some(format!("flatfs:{}", image.display()).as_str()),
        "{line}"
    );
}

#[test]
fn mount_on_a_non_empty_directory_needs_nonempty() {
    require_fuse!("mount_on_a_non_empty_directory_needs_nonempty");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    fs::write(m.path("keep.txt"), "mine").expect("write");
    let stderr = assert_error(&m.try_mount(&image, &[]));
    assert!(
        stderr.contains("not empty") && stderr.contains("-o nonempty"),
        "{stderr}"
    );
    assert!(!is_mounted(&m.mnt));
    m.mount(&image, &["-o", "nonempty"]);
    assert!(
        !m.path("keep.txt").exists(),
        "the mount hides what was there"
    );
}

#[test]
fn mount_with_swapped_arguments_says_so() {
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    let mut cmd = flatfs();
    cmd.arg("mount").arg(&m.mnt).arg(&image);
    let stderr = assert_error(&run_within(cmd));
    assert!(
        stderr.contains(&format!(
            "the image comes first: flatfs mount {} {}",
            image.display(),
            m.mnt.display()
        )),
        "{stderr}"
    );
}

#[test]
fn mount_foreground_says_mounted_once_without_flatfs_twice() {
    require_fuse!("mount_foreground_says_mounted_once_without_flatfs_twice");
    let mut m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    let pid = m.mount_foreground(&image);
    signal(pid, Signal::SIGTERM);
    let out = m.server.take().unwrap().wait_with_output().expect("wait");
    let stderr = stderr_of(&out);
    assert_eq!(
        stderr,
        format!(
            "flatfs: {} mounted on {}; serving in the foreground (Ctrl-C unmounts)\n",
            image.display(),
            m.mnt.display()
        )
    );
}

/// The server exits as soon as it is unmounted: what lingers after (a zombie until its parent,
/// init for a daemon, reaps it) is not flatfs's to shorten.
#[test]
fn mount_server_exits_at_once_after_umount_and_sigterm() {
    require_fuse!("mount_server_exits_at_once_after_umount_and_sigterm");
    let m = Mounted::new();
    let image = docker_image(&m, &sample_layers());
    for how in ["umount", "SIGTERM"] {
        m.mount(&image, &[]);
        let pid = m.server_pid();
        let started = Instant::now();
        if how == "umount" {
            assert_success(&run_flatfs([OsStr::new("umount"), m.mnt.as_os_str()]));
        } else {
            signal(pid, Signal::SIGTERM);
        }
        wait_for(|| !alive(pid), "the server to exit");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "{how}: the server took {took:?} to exit"
        );
    }
}

/// A layout directory is an image in the right place: a file as the mountpoint gets no
/// "the image comes first" hint.
#[test]
fn mount_of_a_layout_dir_on_a_file_does_not_suggest_swapping() {
    let m = Mounted::new();
    let layers = sample_layers();
    let layout = m.path("layout");
    write_oci_layout(&layers, &default_config(&layers), &layout, None);
    let file = m.path("some-file.txt");
    fs::write(&file, "x").expect("write");
    let mut cmd = flatfs();
    cmd.arg("mount").arg(&layout).arg(&file);
    let stderr = assert_error(&run_within(cmd));
    assert!(!stderr.contains("the image comes first"), "{stderr}");
}
