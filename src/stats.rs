//! Mount statistics: what a mount's reads cost (per lazy layer: bytes fetched, requests, span
//! hits, time blocked on the network; for any mount: bytes read and decompressed), written by
//! the serving process as JSON to a file keyed by mountpoint under the runtime directory, which
//! `flatfs stats MOUNTPOINT` reads.

use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::{Value, json};

use crate::content::Content;

/// How often the serving process looks at its counters; it rewrites the stats file only when
/// they changed, so an idle mount writes nothing.
const EVERY: Duration = Duration::from_millis(250);

/// How often `-v` logs a summary while the numbers change.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// One `-v` line for the whole mount: what lazy layers fetched, what reads decompressed.
fn log_summary(v: &Value) {
    let layers = v["layers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let sum = |k: &str| -> u64 { layers.iter().filter_map(|l| l[k].as_u64()).sum() };
    let c = &v["content"];
    log::info!(
        "stats: fetched {} bytes in {} requests ({} prefetched), {}/{} bytes local, readers \
         waited {} ms; read {} bytes, decompressed {}",
        sum("fetched_bytes"),
        sum("requests"),
        sum("prefetched_bytes"),
        sum("local_bytes"),
        sum("blob_bytes"),
        sum("blocked_ms"),
        c["read_bytes"].as_u64().unwrap_or(0),
        c["decompressed_bytes"].as_u64().unwrap_or(0),
    );
}

/// Where stats files live: `$XDG_RUNTIME_DIR/flatfs/stats`, else `$TMPDIR/flatfs-UID/stats`.
pub fn dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("flatfs/stats"),
        // SAFETY: getuid cannot fail and touches no memory.
        None => std::env::temp_dir().join(format!("flatfs-{}/stats", unsafe { libc::getuid() })),
    }
}

/// Checks that the stats directory and its parent are this user's own and writable by no
/// one else: under a shared temp dir, another user could have made them first, to read
/// what is mounted where or to plant stats.
fn private(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid cannot fail and touches no memory.
    let me = unsafe { libc::getuid() };
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let m = std::fs::symlink_metadata(d)?;
        if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a directory of user {me} that only it may write to",
                    d.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The stats file of a mount on `mountpoint` (an absolute, canonical path).
pub fn path_for(mountpoint: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let digest = crate::blob::sha256_of(mountpoint.as_os_str().as_bytes());
    dir().join(format!("{}.json", &digest[7..23]))
}

/// The serving side: builds the JSON from the live counters and keeps the file current.
pub struct Reporter {
    content: Arc<Content>,
    mountpoint: PathBuf,
    image: String,
    prefetch: String,
    path: PathBuf,
}

impl Reporter {
    /// A reporter for the mount of `image` on `mountpoint` (canonical) reading through
    /// `content`; `prefetch` is the `--prefetch` mode (`all`, `landmark`, `none`).
    pub fn new(content: Arc<Content>, mountpoint: PathBuf, image: &str, prefetch: &str) -> Self {
        let path = path_for(&mountpoint);
        Reporter {
            content,
            mountpoint,
            image: image.to_string(),
            prefetch: prefetch.to_string(),
            path,
        }
    }

    /// The stats now.
    pub fn snapshot(&self) -> Value {
        let layers: Vec<Value> = self
            .content
            .blobs()
            .enumerate()
            .map(|(i, b)| match b.lazy_handle() {
                // A layer read through its TOC: chunks fetched as read (and prefetched).
                None if b.toc().is_some() => {
                    let t = b.toc().expect("checked");
                    let (fetched, requests) = t.stats();
                    json!({
                        "layer": i + 1,
                        "name": t.name(),
                        "lazy": true,
                        "toc": t.format,
                        "blob_bytes": b.len(),
                        "local_bytes": t.stored_bytes(),
                        "fetched_bytes": fetched,
                        "prefetched_bytes": t.prefetched(),
                        "landmark_bytes": t.landmark_bytes(),
                        "requests": requests,
                    })
                }
                Some(l) => {
                    let mut v = serde_json::to_value(l.full_stats()).unwrap_or(Value::Null);
                    v["layer"] = json!(i + 1);
                    v["name"] = json!(l.name());
                    v["lazy"] = json!(true);
                    v
                }
                None => json!({
                    "layer": i + 1,
                    "name": b.name(),
                    "lazy": false,
                    "blob_bytes": b.len(),
                    "local_bytes": b.len(),
                }),
            })
            .collect();
        let c = self.content.counters();
        json!({
            "mountpoint": self.mountpoint,
            "image": self.image,
            "pid": std::process::id(),
            "prefetch": self.prefetch,
            "layers": layers,
            "content": {
                "read_bytes": c.read_bytes.load(Relaxed),
                "block_hits": c.block_hits.load(Relaxed),
                "blocks_decompressed": c.blocks_decompressed.load(Relaxed),
                "decompressed_bytes": c.decompressed_bytes.load(Relaxed),
            },
        })
    }

    /// Writes the file (whole, by rename, so a reader never sees half of it).
    fn write(&self, v: &Value) -> io::Result<()> {
        let dir = dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        private(&dir)?;
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir)?;
        // One write, not one per JSON token.
        let mut bytes = serde_json::to_vec_pretty(v)?;
        bytes.push(b'\n');
        tmp.write_all(&bytes)?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }

    /// Writes the file now and then within [`EVERY`] of each change, on a thread of its own;
    /// the file goes when the returned guard is dropped (at unmount).
    pub fn start(self) -> io::Result<StatsFile> {
        remove_stale();
        let me = Arc::new(self);
        let first = me.snapshot();
        if let Err(e) = me.write(&first) {
            log::warn!("cannot write mount stats to {}: {e}", me.path.display());
        }
        let r = me.clone();
        std::thread::Builder::new()
            .name("flatfs-stats".into())
            .spawn(move || {
                let mut last = first;
                let mut logged = std::time::Instant::now();
                let mut unlogged = false;
                loop {
                    std::thread::sleep(EVERY);
                    let now = r.snapshot();
                    if now != last && r.write(&now).is_ok() {
                        last = now;
                        unlogged = true;
                    }
                    if unlogged && logged.elapsed() >= LOG_EVERY {
                        log_summary(&last);
                        logged = std::time::Instant::now();
                        unlogged = false;
                    }
                }
            })?;
        Ok(StatsFile(me.path.clone()))
    }
}

/// Removes the stats files of serving processes that are gone (killed, so they never removed
/// their own): best effort.
fn remove_stale() {
    let dir = dir();
    if private(&dir).is_err() {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let pid = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["pid"].as_u64());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes a mount's stats file when dropped.
pub struct StatsFile(PathBuf);

impl Drop for StatsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads the stats of the mount on `mountpoint`; the error says why there are none.
pub fn read(mountpoint: &Path) -> Result<Value, String> {
    let canon =
        std::fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    // A path inside a mount (`MNT/etc/os-release`) means that mount.
    let canon = match path_for(&canon).exists() {
        true => canon,
        false => mount_root(&canon).unwrap_or(canon),
    };
    let path = path_for(&canon);
    if let Err(e) = private(&dir()).map_err(|e| (e.kind(), e))
        && e.0 != io::ErrorKind::NotFound
    {
        return Err(format!(
            "{}: not reading stats: {}",
            mountpoint.display(),
            e.1
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!(
            "{}: no flatfs mount is serving it (no stats at {})",
            mountpoint.display(),
            path.display()
        ),
        _ => format!("{}: {e}", path.display()),
    })?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let alive = v["pid"]
        .as_u64()
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
    // Just unmounted, the server may not have removed its file yet.
    if alive && !is_fuse_mount(&canon) {
        return Err(format!(
            "{}: no flatfs mount is serving it (not a FUSE mount)",
            mountpoint.display()
        ));
    }
    if !alive {
        return Err(format!(
            "{}: the flatfs process that served it is gone (stale {})",
            mountpoint.display(),
            path.display()
        ));
    }
    Ok(v)
}

/// The top of the filesystem that holds `path` (canonical): its last ancestor on the same
/// device, if that is not `path` itself.
fn mount_root(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let root = path
        .ancestors()
        .take_while(|a| std::fs::metadata(a).is_ok_and(|m| m.dev() == dev))
        .last()?;
    (root != path).then(|| root.to_path_buf())
}

/// Whether `/proc/self/mounts` has a FUSE mount on `path` (canonical).
fn is_fuse_mount(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(mounts) = std::fs::read("/proc/self/mounts") else {
        // Cannot tell: trust the stats file.
        return true;
    };
    let want = path.as_os_str().as_bytes();
    mounts.split(|&b| b == b'\n').any(|line| {
        let mut fields = line.split(|&b| b == b' ');
        let (_, Some(at), Some(fstype)) = (fields.next(), fields.next(), fields.next()) else {
            return false;
        };
        fstype.starts_with(b"fuse") && unescape_mount_field(at) == want
    })
}

/// A mount table field with its octal escapes (`\040` for a space, …) undone.
fn unescape_mount_field(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stats_dir_others_may_write_to_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("flatfs-x");
        let dir = parent.join("stats");
        std::fs::create_dir_all(&dir).unwrap();
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(&parent, 0o700).unwrap();
        mode(&dir, 0o700).unwrap();
        private(&dir).unwrap();
        mode(&parent, 0o777).unwrap();
        let e = private(&dir).unwrap_err();
        assert!(e.to_string().contains("flatfs-x"), "{e}");
        mode(&parent, 0o700).unwrap();
        mode(&dir, 0o770).unwrap();
        assert!(private(&dir).is_err());
    }

    #[test]
    fn mount_table_escapes_are_undone() {
        assert_eq!(unescape_mount_field(br"/mnt/a\040b\134c"), b"/mnt/a b\\c");
        assert_eq!(unescape_mount_field(br"/x\04"), br"/x\04");
    }
}
