//! `flatfs mount` and `flatfs umount`: the daemon around the FUSE filesystem of `fs.rs`.
//!
//! The mountpoint is checked and the image indexed before anything is mounted, so both kinds of
//! error reach the user's terminal. Then the process forks (unless `--foreground`): the child
//! mounts, tells the waiting parent over a pipe whether that worked, and serves until the
//! filesystem is unmounted or the server gets SIGINT, SIGTERM or SIGHUP, which unmount it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, chdir, dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, setsid};

use crate::error::{Error, Result};
use crate::fs::FlatFs;

/// What the user asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve in this process instead of a daemon.
    pub foreground: bool,
    /// Let other users in (`allow_other`).
    pub allow_other: bool,
    /// `-o` options; each element may hold several, comma-separated.
    pub options: Vec<String>,
}

/// A checked mountpoint with the FUSE configuration to mount there.
#[derive(Debug)]
pub struct Mountpoint {
    /// Canonical path.
    path: PathBuf,
    /// As the user wrote it, for messages.
    shown: String,
    /// The source shown in the mount table.
    fsname: String,
    config: Config,
    foreground: bool,
}

/// How `umount` got rid of a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// It is gone.
    Cleanly,
    /// It is detached from the namespace and goes away when its last open file is closed.
    Lazily,
}

/// Where `flatfs mount` stands with the process waiting for it.
enum Ready {
    /// Serving in the user's process: tell the user.
    Foreground,
    /// Serving in the daemon: tell the parent through this pipe.
    Report(OwnedFd),
}

impl Mountpoint {
    /// Checks the mountpoint, that FUSE is usable and the options, before the image is indexed.
    pub fn check(path: &Path, image: &str, opts: &Options) -> Result<Self> {
        let shown = path.display().to_string();
        let error = |msg: String| Error::Mount {
            mountpoint: shown.clone(),
            msg,
        };
        // Absolute, so that the mount table says which file is mounted wherever it is read.
        // A registry reference or a transport-prefixed name is not a path: keep it as given.
        let transport = ["docker://", "oci:", "oci-archive:", "docker-archive:"]
            .iter()
            .any(|t| image.starts_with(t));
        let source = match image {
            "-" => "stdin".to_string(),
            _ if transport => image.to_string(),
            _ => std::path::absolute(image).map_or(image.to_string(), |p| p.display().to_string()),
        };
        let fsname = format!("flatfs:{source}");
        let config = fuse_config(&fsname, opts).map_err(error)?;
        let canonical = check_dir(path).map_err(|msg| {
            // `flatfs mount DIR IMAGE`: say so rather than only that IMAGE is no directory.
            // An OCI layout (or unpacked docker save) dir is an image in the right place.
            let image_dir = Path::new(image);
            let is_image = ["index.json", "oci-layout", "manifest.json"]
                .iter()
                .any(|f| image_dir.join(f).is_file());
            if path.is_file() && image_dir.is_dir() && !is_image {
                error(format!(
                    "{msg}; the image comes first: flatfs mount {} {image}",
                    path.display()
                ))
            } else {
                error(msg)
            }
        })?;
        let nonempty = opts
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .any(|o| o == "nonempty");
        if !nonempty {
            check_empty(&canonical).map_err(error)?;
        }
        check_fuse().map_err(error)?;
        Ok(Mountpoint {
            path: canonical,
            shown,
            fsname,
            config,
            foreground: opts.foreground,
        })
    }

    /// Mounts `fs` and serves it. In the foreground this returns once unmounted; otherwise the
    /// caller's process returns once the mount is live and a daemon serves it (and exits when
    /// done, never returning here).
    pub fn serve(self, fs: FlatFs) -> Result<()> {
        self.serve_then(fs, || {})
    }

    /// [`Mountpoint::serve`], running `then` on a thread of the serving process once the mount
    /// is live: work that can wait until the user has the mount (loading what first reads
    /// need, so that they do not have to).
    pub fn serve_then(self, fs: FlatFs, then: impl FnOnce() + Send + 'static) -> Result<()> {
        if self.foreground {
            self.run(fs, Ready::Foreground, then)
        } else {
            self.daemonize(fs, then)
        }
    }

    fn error(&self, msg: String) -> Error {
        Error::Mount {
            mountpoint: self.shown.clone(),
            msg,
        }
    }

    fn daemonize(self, fs: FlatFs, then: impl FnOnce() + Send + 'static) -> Result<()> {
        wait_until_single_threaded();
        // CLOEXEC: fusermount3, which fuser may run, must not hold the parent's pipe open.
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| self.error(format!("cannot create a pipe: {e}")))?;
        // SAFETY: this process has no other thread (the indexing threads are gone, see above),
        // so the child is a complete copy and may run any code, not only async-signal-safe calls.
        match unsafe { fork() } {
            Err(e) => Err(self.error(format!("cannot fork: {e}"))),
            Ok(ForkResult::Parent { child }) => {
                // The child serves this tree; here it is only freed, page by page, before the
                // command can return: a copy-on-write image of it goes with the process instead.
                std::mem::forget(fs);
                drop(write_end);
                let mut report = Vec::new();
                let read = File::from(read_end).read_to_end(&mut report);
                if read.is_ok() && report == b"ok" {
                    return Ok(());
                }
                // The child failed and is exiting: reap it, and say how it ended if it could not.
                let status = waitpid(child, None);
                let msg = match report.strip_prefix(b"error: ") {
                    Some(msg) => String::from_utf8_lossy(msg).into_owned(),
                    None => format!(
                        "the mounting process ended without a report ({})",
                        describe(status)
                    ),
                };
                Err(self.error(msg))
            }
            Ok(ForkResult::Child) => {
                drop(read_end);
                // Leave the terminal's session, so that a Ctrl-C meant for the shell does not
                // unmount, and the starting directory, so that it can be unmounted. Neither can
                // fail in a fresh child (not a group leader; `/` exists).
                let _ = setsid();
                let _ = chdir("/");
                let code = match self.run(fs, Ready::Report(write_end), then) {
                    Ok(()) => 0,
                    Err(_) => 1,
                };
                // The parent reports failures; the daemon never returns to the command line.
                std::process::exit(code)
            }
        }
    }

    fn run(
        &self,
        mut fs: FlatFs,
        ready: Ready,
        then: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        // An indexing thread still on its way out would take a signal with the default action
        // (death, mount left behind), as it never blocked them.
        wait_until_single_threaded();
        let signals = stop_signals();
        // Blocked before any other thread exists, so every thread inherits the mask and only
        // the waiter below receives them.
        if let Err(e) = signals.thread_block() {
            let msg = format!("cannot block signals: {e}");
            ready.failed(&msg);
            return Err(self.error(msg));
        }
        // When serving ends, fuser 0.18 unmounts the mountpoint by path even if the kernel has
        // already unmounted us (its still-mounted test reads POLLERR the wrong way round), so a
        // new mount made there meanwhile — `flatfs mount … && fusermount3 -u …` in a loop —
        // was taken down with this server. So look for ourselves: POLLERR on our /dev/fuse
        // connection means the kernel has ended it, and this process leaves at once, touching
        // no mount. (Mount IDs and device numbers are reused at once: they can't tell.) This
        // is the last `on_stop` job: those before it, stats and logs, still run.
        let dev: Arc<OnceLock<OwnedFd>> = Arc::default();
        let ours = dev.clone();
        fs.on_stop(Box::new(move || {
            if ours.get().is_some_and(disconnected) {
                std::process::exit(0);
            }
        }));
        let notifier = fs.notifier_slot();
        let mut session = match Session::new(fs, &self.path, &self.config) {
            Ok(session) => session,
            Err(e) => {
                let msg = explain(&e);
                ready.failed(&msg);
                return Err(self.error(msg));
            }
        };
        let _ = notifier.set(session.notifier());
        if let Ok(fd) = session.as_fd().try_clone_to_owned() {
            let _ = dev.set(fd);
        }
        let unmounter = session.unmount_callable();
        let path = self.path.clone();
        let waiter = thread::Builder::new()
            .name("flatfs-signals".into())
            .spawn(move || unmount_on_signal(signals, unmounter, &path));
        if let Err(e) = waiter {
            // Dropping the session unmounts.
            let msg = format!("cannot start the signal thread: {e}");
            ready.failed(&msg);
            return Err(self.error(msg));
        }
        ready.succeeded(self);
        // Only a head start: if the thread cannot start, the work happens when first needed.
        let _ = thread::Builder::new()
            .name("flatfs-warm".into())
            .spawn(then);
        session
            .run()
            .map_err(|e| self.error(format!("serving stopped: {e}")))
    }
}

impl Ready {
    fn failed(self, msg: &str) {
        if let Ready::Report(fd) = self {
            // If the parent is gone there is nobody left to tell.
            let _ = File::from(fd).write_all(format!("error: {msg}").as_bytes());
        }
    }

    fn succeeded(self, mount: &Mountpoint) {
        match self {
            Ready::Foreground => eprintln!(
                "flatfs: {} mounted on {}; serving in the foreground (Ctrl-C unmounts)",
                mount.fsname.trim_start_matches("flatfs:"),
                mount.shown
            ),
            Ready::Report(fd) => {
                // Whoever ran `flatfs mount` may wait for end-of-file on its stdout and stderr
                // (a script's `$(…)`, a test harness): let go of them before saying "done". If
                // that or the report fails, the mount still works, so serve on.
                let _ = detach_stdio();
                let _ = File::from(fd).write_all(b"ok");
            }
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP end the server, after unmounting.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

fn unmount_on_signal(signals: SigSet, mut unmounter: SessionUnmounter, path: &Path) {
    // sigwait fails only for an invalid set; then only an unmount ends the server.
    if signals.wait().is_err() {
        return;
    }
    if unmounter.unmount().is_ok() {
        // The kernel closes the connection and the serving threads return.
        return;
    }
    // Busy: a process still has a file open or its working directory inside. Detach the mount
    // so that none is left behind; reads of files still open fail from now on, as asked.
    let _ = detach(path);
    std::process::exit(0)
}

/// Unmounts lazily: `umount2(MNT_DETACH)` as root, else through fusermount3's setuid helper.
fn detach(path: &Path) -> std::result::Result<(), String> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(Errno::EPERM) => run_quietly("fusermount3", &["-u", "-z", "--"], path),
        Err(e) => Err(e.to_string()),
    }
}

fn detach_stdio() -> nix::Result<()> {
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    dup2_stdin(&null)?;
    dup2_stdout(&null)?;
    dup2_stderr(&null)
}

/// Waits (briefly) until this is the only thread: `fork` copies only the calling thread, and
/// `std::thread::scope` returns when its threads' closures end, possibly before they exit.
fn wait_until_single_threaded() {
    for _ in 0..400 {
        let threads = fs::read_dir("/proc/self/task").map_or(1, |tasks| tasks.count());
        if threads <= 1 {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn describe(status: nix::Result<WaitStatus>) -> String {
    match status {
        Ok(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
        Ok(WaitStatus::Signaled(_, signal, _)) => format!("killed by {signal}"),
        Ok(other) => format!("{other:?}"),
        Err(e) => e.to_string(),
    }
}

/// Serving threads: reads of compressed layers keep a thread busy decompressing, so more
/// threads than cores let cached and uncompressed reads go on meanwhile.
fn serving_threads() -> usize {
    thread::available_parallelism()
        .map_or(4, |n| n.get() * 2)
        .clamp(4, 16)
}

/// The FUSE configuration: read-only, nosuid, nodev and default_permissions, then `-o`.
fn fuse_config(fsname: &str, opts: &Options) -> std::result::Result<Config, String> {
    let mut options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        // The kernel checks access against the image's owners and modes; without it, anyone
        // let in by allow_other could read the image's private files (etc/shadow).
        MountOption::DefaultPermissions,
        // fusermount3 splits its options at commas.
        MountOption::FSName(fsname.replace(',', "_")),
        subtype("flatfs"),
    ];
    let mut acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    for opt in opts.options.iter().flat_map(|o| o.split(',')) {
        let new = match opt {
            "" => continue,
            "ro" => MountOption::RO,
            "nosuid" => MountOption::NoSuid,
            "nodev" => MountOption::NoDev,
            "default_permissions" => MountOption::DefaultPermissions,
            "rw" => return Err("-o rw: a flatfs mount is read-only".into()),
            // fuser turns its ACL into the allow_other option, and enforces allow_root itself.
            "allow_other" => {
                acl = SessionACL::All;
                continue;
            }
            "allow_root" => {
                if acl == SessionACL::Owner {
                    acl = SessionACL::RootAndOwner;
                }
                continue;
            }
            "suid" => MountOption::Suid,
            "dev" => MountOption::Dev,
            "exec" => MountOption::Exec,
            "noexec" => MountOption::NoExec,
            "atime" => MountOption::Atime,
            "noatime" => MountOption::NoAtime,
            "sync" => MountOption::Sync,
            "async" => MountOption::Async,
            "dirsync" => MountOption::DirSync,
            "auto_unmount" => MountOption::AutoUnmount,
            // Ours: checked in `Mountpoint::check`, nothing for the kernel.
            "nonempty" => continue,
            _ => match opt.split_once('=') {
                Some(("fsname", name)) => MountOption::FSName(name.replace(',', "_")),
                Some(("subtype", name)) => subtype(name),
                Some(("max_read" | "blksize", n)) if n.parse::<u32>().is_ok_and(|n| n > 0) => {
                    MountOption::CUSTOM(opt.to_string())
                }
                Some((key @ ("max_read" | "blksize"), _)) => {
                    return Err(format!("-o {opt}: {key} takes a number of bytes"));
                }
                // SELinux labels and userspace `x-` options, which the kernel or mount(8) know.
                Some((key, _)) if key.ends_with("context") || key.starts_with("x-") => {
                    MountOption::CUSTOM(opt.to_string())
                }
                _ => {
                    return Err(format!(
                        "-o {opt}: not a mount option flatfs knows (it takes ro, nosuid, nodev, \
                         suid, dev, exec, noexec, atime, noatime, sync, async, dirsync, \
                         allow_other, allow_root, auto_unmount, default_permissions, nonempty, \
                         fsname=NAME, subtype=NAME, max_read=BYTES, blksize=BYTES)"
                    ));
                }
            },
        };
        // A later option replaces an earlier one of the same slot (`dev` after `nodev`).
        options.retain(|o| slot(o) != slot(&new));
        options.push(new);
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = acl;
    config.n_threads = Some(serving_threads());
    // Each thread reads requests from its own /dev/fuse descriptor instead of sharing one.
    config.clone_fd = true;
    Ok(config)
}

/// fuser hands `MountOption::Subtype` only to fusermount3; as a plain option it also reaches
/// the kernel when root mounts directly, so the mount table says `fuse.flatfs` either way.
fn subtype(name: &str) -> MountOption {
    MountOption::CUSTOM(format!("subtype={name}"))
}

/// Options that set the same thing share a slot: `dev`/`nodev`, two `fsname=`s, ….
fn slot(o: &MountOption) -> String {
    let slot = match o {
        MountOption::FSName(_) => "fsname",
        MountOption::CUSTOM(s) => return s.split('=').next().unwrap_or(s).to_string(),
        MountOption::Dev | MountOption::NoDev => "dev",
        MountOption::Suid | MountOption::NoSuid => "suid",
        MountOption::RO | MountOption::RW => "ro",
        MountOption::Exec | MountOption::NoExec => "exec",
        MountOption::Atime | MountOption::NoAtime => "atime",
        MountOption::Sync | MountOption::Async => "sync",
        other => return format!("{other:?}"),
    };
    slot.to_string()
}

/// The mountpoint must be an existing directory with no FUSE filesystem on it yet.
fn check_dir(path: &Path) -> std::result::Result<PathBuf, String> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err("not a directory".into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err("no such directory (create it first)".into());
        }
        // ECONNABORTED instead when a request was in flight as the server died.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => {
            return Err(format!(
                "a FUSE filesystem whose server died is still mounted there (transport endpoint \
                 is not connected); clear it with `flatfs umount {}`",
                path.display()
            ));
        }
        Err(e) => return Err(e.to_string()),
    }
    let canonical = path.canonicalize().map_err(|e| e.to_string())?;
    let fstype = mount_type(&canonical)
        .map_err(|e| format!("cannot read the mount table /proc/self/mountinfo: {e}"))?;
    if let Some(fstype) = fstype.filter(|t| is_fuse(t)) {
        return Err(format!(
            "busy: a {fstype} filesystem is already mounted there; unmount it first with \
             `flatfs umount {}`",
            path.display()
        ));
    }
    Ok(canonical)
}

/// A mount hides what the directory holds: refused unless `-o nonempty`, as fusermount did.
fn check_empty(path: &Path) -> std::result::Result<(), String> {
    let entries = fs::read_dir(path).map_err(|e| e.to_string())?.count();
    if entries == 0 {
        return Ok(());
    }
    Err(format!(
        "not empty: the mount would hide its {entries} {} (mount on an empty directory, or add \
         -o nonempty)",
        if entries == 1 { "entry" } else { "entries" }
    ))
}

fn check_fuse() -> std::result::Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse does not exist: load the fuse module (`modprobe fuse`), or give \
                    the container the device (`--device /dev/fuse`)"
                .into(),
        );
    }
    // root mounts with mount(2); everyone else needs the setuid helper.
    if !nix::unistd::geteuid().is_root()
        && std::env::var_os("FUSERMOUNT_PATH").is_none()
        && find_program("fusermount3").is_none()
        && find_program("fusermount").is_none()
    {
        return Err(
            "fusermount3 not found: mounting as a normal user needs it (install fuse3)".into(),
        );
    }
    Ok(())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Makes fuser's mount errors say what to do.
fn explain(err: &io::Error) -> String {
    let msg = err.to_string();
    if msg.contains("user_allow_other") {
        format!("{msg}: --allow-other needs `user_allow_other` in /etc/fuse.conf")
    } else if err.kind() == io::ErrorKind::PermissionDenied && !nix::unistd::geteuid().is_root() {
        // fuser opens /dev/fuse itself before it tries fusermount3.
        format!("{msg}: a normal user needs read and write access to /dev/fuse (usually 0666)")
    } else if err.kind() == io::ErrorKind::NotFound {
        format!("{msg} (is fusermount3 installed? it comes with fuse3)")
    } else if msg.contains("EINVAL") {
        // fuser's message lists its internal mount flags; the user gave -o options.
        let cause = msg.split_once("): ").map_or(msg.as_str(), |(_, c)| c);
        format!("the kernel refused to mount ({cause}): check the -o options")
    } else {
        msg
    }
}

/// Unmounts the FUSE filesystem at `path`: `fusermount3 -u`, else lazily with
/// `fusermount3 -u -z` or `umount -l`, which also clear a mount whose server died.
pub fn umount(path: &Path) -> Result<Unmounted> {
    let error = |msg: String| Error::Mount {
        mountpoint: path.display().to_string(),
        msg,
    };
    let abs = absolute(path).map_err(|e| error(e.to_string()))?;
    // A dead mount cannot be looked at (ENOTCONN), but it is there.
    if fs::symlink_metadata(&abs).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
        return Err(error("no such file or directory".into()));
    }
    let fstype = mount_type(&abs).map_err(|e| {
        error(format!(
            "cannot read the mount table /proc/self/mountinfo: {e}"
        ))
    })?;
    match fstype {
        None => return Err(error("nothing is mounted there".into())),
        Some(t) if !is_fuse(&t) => {
            return Err(error(format!(
                "a {t} filesystem is mounted there, not FUSE; flatfs umount leaves it alone"
            )));
        }
        Some(_) => {}
    }
    let attempts: [(&str, &[&str], Unmounted); 3] = [
        ("fusermount3", &["-u", "--"], Unmounted::Cleanly),
        ("fusermount3", &["-u", "-z", "--"], Unmounted::Lazily),
        ("umount", &["-l"], Unmounted::Lazily),
    ];
    let mut failures = Vec::new();
    for (program, args, how) in attempts {
        match run_quietly(program, args, &abs) {
            Ok(()) => return Ok(how),
            Err(e) => failures.push(e),
        }
    }
    Err(error(format!("cannot unmount: {}", failures.join("; "))))
}

/// Runs `program args path`, returning its complaint if it fails.
fn run_quietly(program: &str, args: &[&str], path: &Path) -> std::result::Result<(), String> {
    let shown = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("{shown}: {} ({})", stderr.trim(), out.status))
    }
}

/// The absolute path with its parent resolved but not its last component, which may be a dead
/// mount that cannot be looked at.
fn absolute(path: &Path) -> io::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        _ => abs.canonicalize(),
    }
}

fn is_fuse(fstype: &str) -> bool {
    fstype == "fuse" || fstype == "fuseblk" || fstype.starts_with("fuse.")
}

/// The filesystem type of the topmost mount on `path` (absolute, resolved), if any.
/// See: <https://man7.org/linux/man-pages/man5/proc_pid_mountinfo.5.html>
fn mount_type(path: &Path) -> io::Result<Option<String>> {
    let table = fs::read("/proc/self/mountinfo")?;
    let mut found = None;
    for line in table.split(|&b| b == b'\n') {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER_OPTIONS
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(sep) = fields.iter().skip(6).position(|f| *f == b"-") else {
            continue;
        };
        let (Some(mountpoint), Some(fstype)) = (fields.get(4), fields.get(6 + sep + 1)) else {
            continue;
        };
        if unescape(mountpoint) == path.as_os_str().as_bytes() {
            // Mounts stacked on one directory are listed in mount order: the last is on top.
            found = Some(String::from_utf8_lossy(&unescape(fstype)).into_owned());
        }
    }
    Ok(found)
}

/// True when the kernel has ended the FUSE connection `fd` (unmounted, or aborted): `/dev/fuse`
/// then polls with POLLERR.
fn disconnected(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, for a descriptor this process owns; no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return n == 1 && p.revents & libc::POLLERR != 0;
    }
}

/// Undoes the kernel's octal escapes (`\040` for a space) in a mountinfo field.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|_| field[i] == b'\\')
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// True if a filesystem is mounted on `path` (absolute, resolved): for tests and callers that
/// wait for a mount.
pub fn is_mounted(path: &Path) -> bool {
    mount_type(path).is_ok_and(|t| t.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(opts: &[&str], allow_other: bool) -> Config {
        let opts = Options {
            foreground: false,
            allow_other,
            options: opts.iter().map(|o| o.to_string()).collect(),
        };
        fuse_config("flatfs:img,1.tar", &opts).expect("valid options")
    }

    #[test]
    fn defaults_are_read_only_nosuid_nodev_with_fsname_and_subtype() {
        let c = config(&[], false);
        assert_eq!(
            c.mount_options,
            vec![
                MountOption::RO,
                MountOption::NoSuid,
                MountOption::NoDev,
                MountOption::DefaultPermissions,
                MountOption::FSName("flatfs:img_1.tar".into()),
                MountOption::CUSTOM("subtype=flatfs".into()),
            ]
        );
        assert_eq!(c.acl, SessionACL::Owner);
        assert!(c.n_threads.is_some_and(|n| n >= 4));
    }

    #[test]
    fn dash_o_replaces_defaults_of_the_same_slot_and_passes_the_rest() {
        let c = config(
            &["dev,noexec", "fsname=mine,max_read=131072", "ro,,nodev"],
            true,
        );
        assert_eq!(
            c.mount_options,
            vec![
                MountOption::NoSuid,
                MountOption::DefaultPermissions,
                MountOption::CUSTOM("subtype=flatfs".into()),
                MountOption::NoExec,
                MountOption::FSName("mine".into()),
                MountOption::CUSTOM("max_read=131072".into()),
                MountOption::RO,
                MountOption::NoDev,
            ]
        );
        assert_eq!(c.acl, SessionACL::All);
    }

    #[test]
    fn allow_root_and_allow_other_set_the_acl() {
        assert_eq!(config(&["allow_root"], false).acl, SessionACL::RootAndOwner);
        assert_eq!(config(&["allow_other"], false).acl, SessionACL::All);
        assert_eq!(config(&["allow_root"], true).acl, SessionACL::All);
    }

    #[test]
    fn dash_o_rw_is_refused() {
        let opts = Options {
            options: vec!["noatime,rw".into()],
            ..Options::default()
        };
        let err = fuse_config("flatfs:x", &opts).expect_err("rw must be refused");
        assert!(err.contains("read-only"), "{err}");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(br"/tmp/a\040b\134c\011"), b"/tmp/a b\\c\t");
        assert_eq!(unescape(br"/x\04"), br"/x\04");
        assert_eq!(unescape(br"\999"), br"\999");
    }

    #[test]
    fn the_root_is_a_mount_and_a_fresh_directory_is_not() {
        assert!(is_mounted(Path::new("/")));
        let dir = tempfile::tempdir().expect("tempdir");
        let canonical = dir.path().canonicalize().expect("canonical");
        assert!(!is_mounted(&canonical));
    }

    #[test]
    fn absolute_keeps_the_last_component_unresolved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let canonical = dir.path().canonicalize().expect("canonical");
        let missing = dir.path().join("gone");
        assert_eq!(
            absolute(&missing).expect("absolute"),
            canonical.join("gone")
        );
    }

    #[test]
    fn check_dir_explains_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        assert!(
            check_dir(&missing)
                .expect_err("missing")
                .contains("no such directory")
        );
        let file = dir.path().join("file");
        fs::write(&file, "x").expect("write");
        assert!(
            check_dir(&file)
                .expect_err("file")
                .contains("not a directory")
        );
        assert_eq!(
            check_dir(dir.path()).expect("a directory"),
            dir.path().canonicalize().expect("canonical")
        );
    }

    #[test]
    fn unmounting_what_is_not_mounted_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = umount(dir.path()).expect_err("not mounted").to_string();
        assert!(err.contains("nothing is mounted there"), "{err}");
    }

    #[test]
    fn describe_says_how_the_child_ended() {
        let pid = nix::unistd::Pid::from_raw(1);
        assert_eq!(describe(Ok(WaitStatus::Exited(pid, 1))), "exit status 1");
        assert_eq!(
            describe(Ok(WaitStatus::Signaled(pid, Signal::SIGKILL, false))),
            "killed by SIGKILL"
        );
    }
}
