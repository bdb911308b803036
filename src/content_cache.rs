//! Decompressed copies of compressed layers on disk, behind `content.rs`: once the block path has
//! wasted about half a pass of decompression on a layer (bytes decompressed only to be skipped),
//! or at once for a layer with no restart point (a single-frame zstd layer), the layer is
//! decompressed once, sequentially, into `CACHE/content/HEX.tar` (HEX: its diff_id), and its
//! reads become positioned reads of that file. So any read order costs about one decompression.
//!
//! Readers never wait for the whole pass: the bytes written so far (a watermark) are served from
//! the file as the pass passes them, and a reader the pass is far from goes on through the block
//! path. The file is written anonymous and named when its sha256 (computed on the way)
//! equals the layer's diff_id; a file found from an earlier run is hashed again before it is
//! used, and deleted if its digest or length is wrong. Two processes filling the same layer each
//! write their own file and the last rename wins: both hold the same bytes. Files are kept
//! within `$FLATFS_CONTENT_CACHE_MAX` bytes, least recently used out first. Any failure to
//! write (a full disk) abandons the file for this process with one warning: reads go on through
//! the block path, never an error because of the cache.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};

use sha2::{Digest as _, Sha256};

use crate::blob::{Blob, Compression, open_decoded};
use crate::source::Layer;
use crate::zran::Checkpoints;

/// Default bound of the content cache: 10 GiB.
const DEFAULT_MAX: u64 = 10 << 30;

/// The unit of the pass: bytes written (or verified) at a time, and the watermark's step.
const CHUNK: usize = 1 << 20;

/// A skip this long on a layer that cannot restart anywhere but its start is a read out of
/// order, which will recur: worth a pass at once.
const NON_SEQUENTIAL: u64 = 4 << 20;

/// The content cache's bound: `$FLATFS_CONTENT_CACHE_MAX` bytes (0 turns it off), default
/// 10 GiB; as the blob store's `$FLATFS_BLOB_CACHE_MAX`.
pub fn max_size() -> u64 {
    crate::inspect::env_bytes("FLATFS_CONTENT_CACHE_MAX", DEFAULT_MAX)
}

/// Where decompressed layers live inside the cache directory `dir`.
pub fn content_dir(dir: &Path) -> PathBuf {
    dir.join("content")
}

/// What the block path should do for a block it has to decompress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Decompress it from the nearest cursor or checkpoint.
    Decompress,
    /// Wait for the cache file: it will have the block sooner, at no extra cost.
    Wait,
}

enum Phase {
    /// No pass yet.
    Idle,
    /// Hashing a file an earlier run left, `done` bytes so far.
    Verifying { done: u64 },
    /// Decompressing into a temp file; `done` bytes of it are written and readable.
    Filling { file: Option<Arc<File>>, done: u64 },
    /// The whole layer is in `file`.
    Ready(Arc<File>),
    /// No cache for this layer in this process (disabled, or the pass failed).
    Off,
}

struct State {
    phase: Phase,
    /// Bytes the block path decompressed only to skip them.
    waste: u64,
    /// The furthest end of a block asked for: a lower bound of the layer's length.
    furthest: u64,
}

struct Shared {
    blob: Blob,
    compression: Compression,
    label: String,
    /// `sha256:HEX` of the decompressed layer.
    diff_id: String,
    dir: PathBuf,
    path: PathBuf,
    max: u64,
    /// The layer's checkpoints, from its index: they give its decompressed length and say
    /// whether it has restart points. Asked only once the layer is read (a warm mount loads
    /// them on first use, `zran::Checkpoints::lazy`).
    checkpoints: Option<Arc<Checkpoints>>,
    state: Mutex<State>,
    changed: Condvar,
    /// Decompressed bytes spent by the pass.
    pass_bytes: AtomicU64,
}

/// The content cache of one compressed layer.
pub struct LayerCache {
    shared: Arc<Shared>,
}

impl LayerCache {
    /// The cache of `layer` in cache directory `dir` (bounded by `max` bytes); `None` when
    /// there can be none: no directory, an uncompressed layer, no diff_id to check a file
    /// against (a layer bigger than the bound is never filled). `checkpoints` are those of
    /// its index, if any.
    pub fn new(
        layer: &Layer,
        dir: Option<&Path>,
        max: u64,
        checkpoints: Option<Arc<Checkpoints>>,
    ) -> Option<Self> {
        // A layer read through its table of contents (`toc/`) has no stream to decompress:
        // its chunks are fetched and checked one by one.
        if layer.compression == Compression::None || max == 0 || layer.blob.toc().is_some() {
            return None;
        }
        let diff_id = layer.diff_id.clone()?;
        let hex = diff_id.strip_prefix("sha256:")?;
        // diff_ids come from image JSON: only plain hex may name a file.
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let dir = content_dir(dir?);
        Some(LayerCache {
            shared: Arc::new(Shared {
                blob: layer.blob.clone(),
                compression: layer.compression,
                label: layer.label(),
                path: dir.join(format!("{hex}.tar")),
                dir,
                diff_id,
                max,
                checkpoints,
                state: Mutex::new(State {
                    phase: Phase::Idle,
                    waste: 0,
                    furthest: 0,
                }),
                changed: Condvar::new(),
                pass_bytes: AtomicU64::new(0),
            }),
        })
    }

    /// Fills `buf` from layer offset `pos` out of the cache file, if it holds those bytes now.
    pub fn read(&self, pos: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let end = pos.checked_add(buf.len() as u64)?;
        let file = {
            let st = self.shared.lock();
            match &st.phase {
                Phase::Ready(f) => f.clone(),
                Phase::Filling {
                    file: Some(f),
                    done,
                } if *done >= end => f.clone(),
                _ => return None,
            }
        };
        Some(file.read_exact_at(buf, pos).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(io::ErrorKind::UnexpectedEof, "layer ends before the file")
            } else {
                e
            }
        }))
    }

    /// Called by the block path before it decompresses the block at `pos` with `skip` bytes to
    /// decompress and throw away first: counts the waste, starts the pass when the waste
    /// reaches about half a pass (or a layer with no restart point is read out of order),
    /// and says whether waiting for the pass is cheaper than decompressing.
    pub fn plan(&self, pos: u64, len: u64, skip: u64) -> Plan {
        let s = &self.shared;
        let mut st = s.lock();
        st.furthest = st.furthest.max(pos.saturating_add(len));
        if let Phase::Idle = st.phase {
            if s.expected_len().is_some_and(|l| l > s.max) {
                st.phase = Phase::Off;
                return Plan::Decompress;
            }
            st.waste = st.waste.saturating_add(skip);
            let layer_len = s.layer_len(&st);
            // Half a pass: a walk that keeps wasting then costs about 1.5 decompressions in
            // all, while a few hundred scattered reads of a layer with checkpoints (half a
            // span each) stay below it and cost no pass. A file from an earlier run costs
            // only hashing: worth it as soon as reads start to waste.
            let exists = skip > 0 && s.path.exists();
            let due = if !s.restartable() {
                skip >= NON_SEQUENTIAL
            } else if exists {
                st.waste >= NON_SEQUENTIAL
            } else {
                st.waste >= layer_len / 2
            };
            if !due {
                return Plan::Decompress;
            }
            st.phase = if exists {
                Phase::Verifying { done: 0 }
            } else {
                Phase::Filling {
                    file: None,
                    done: 0,
                }
            };
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("content-cache".into())
                .spawn(move || shared.run());
            if let Err(e) = spawned {
                log::warn!("content cache: cannot start a thread: {e}");
                st.phase = Phase::Off;
                return Plan::Decompress;
            }
        }
        match st.phase {
            Phase::Ready(_) => Plan::Wait,
            // sha256 (SHA-NI) hashes about twice as fast as zstd decompresses, four times as
            // fast as inflate (measured: 0.26 s, `zstd -dc` 0.54 s, `pigz -dc` 1.6 s, 420 MiB):
            // wait when that is sooner, or the skip is long enough to be worth no CPU (a walk
            // started during the check would otherwise decompress the layer beside it).
            Phase::Verifying { done }
                if skip >= NON_SEQUENTIAL
                    || s.layer_len(&st).saturating_sub(done) <= s.hash_speedup() * skip =>
            {
                Plan::Wait
            }
            Phase::Filling { done, .. } if pos.saturating_sub(done) <= skip => Plan::Wait,
            _ => Plan::Decompress,
        }
    }

    /// Waits until the cache file holds `[pos, pos + len)` (or the layer's end before that),
    /// then reads it: `None` if the pass failed, and the block path must do it.
    pub fn wait_read(&self, pos: u64, len: usize) -> Option<io::Result<Vec<u8>>> {
        let s = &self.shared;
        let end = pos.saturating_add(len as u64);
        let mut st = s.lock();
        let file = loop {
            match &st.phase {
                Phase::Ready(f) => break f.clone(),
                Phase::Filling {
                    file: Some(f),
                    done,
                } if *done >= end => break f.clone(),
                Phase::Off | Phase::Idle => return None,
                _ => st = s.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        };
        drop(st);
        let mut buf = vec![0; len];
        let mut n = 0;
        while n < len {
            match file.read_at(&mut buf[n..], pos + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
        buf.truncate(n);
        Some(Ok(buf))
    }

    /// Decompressed bytes the pass has spent.
    pub fn pass_bytes(&self) -> u64 {
        self.shared.pass_bytes.load(Ordering::Relaxed)
    }

    /// True once a pass has started (it may have ended since).
    pub fn started(&self) -> bool {
        !matches!(self.shared.lock().phase, Phase::Idle)
    }

    /// Waits until the pass, if one runs, has ended; true if the file is then ready.
    pub fn wait_done(&self) -> bool {
        let s = &self.shared;
        let mut st = s.lock();
        loop {
            match st.phase {
                Phase::Ready(_) => return true,
                Phase::Idle | Phase::Off => return false,
                _ => st = s.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many times faster hashing is than decompressing this layer.
    fn hash_speedup(&self) -> u64 {
        match self.compression {
            Compression::Gzip => 4,
            _ => 2,
        }
    }

    /// The decompressed length, where the index recorded it.
    fn expected_len(&self) -> Option<u64> {
        self.checkpoints.as_ref().and_then(|c| c.output_len())
    }

    /// True when the layer has restart points (checkpoints) other than its start.
    fn restartable(&self) -> bool {
        self.checkpoints.as_ref().is_some_and(|c| !c.is_empty())
    }

    fn layer_len(&self, st: &State) -> u64 {
        self.expected_len()
            .unwrap_or_else(|| st.furthest.max(self.blob.len()))
    }

    fn set(&self, phase: Phase) {
        self.lock().phase = phase;
        self.changed.notify_all();
    }

    /// The pass: use the file an earlier run left if it checks out, else decompress the layer
    /// into a new one. Whatever goes wrong ends in `Off`, with one warning.
    fn run(self: Arc<Self>) {
        if matches!(self.lock().phase, Phase::Verifying { .. }) {
            match self.verify() {
                Ok(Some(file)) => {
                    touch(&file);
                    log::debug!(
                        "content cache: layer {}: using {}",
                        self.label,
                        self.path.display()
                    );
                    self.set(Phase::Ready(Arc::new(file)));
                    return;
                }
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    log::warn!(
                        "content cache: cannot read {}: {e}; reading layer {} from its blob",
                        self.path.display(),
                        self.label
                    );
                    self.set(Phase::Off);
                    return;
                }
            }
            self.set(Phase::Filling {
                file: None,
                done: 0,
            });
        }
        log::debug!(
            "content cache: layer {}: decompressing into {}",
            self.label,
            self.path.display()
        );
        match self.fill() {
            Ok(file) => {
                log::debug!("content cache: layer {}: complete", self.label);
                self.set(Phase::Ready(file));
                evict(&self.dir, self.max, &self.path);
            }
            Err(e) => {
                log::warn!(
                    "content cache: cannot cache layer {} in {}: {e}; reading it from its blob",
                    self.label,
                    self.dir.display()
                );
                self.set(Phase::Off);
            }
        }
    }

    /// Hashes the existing file: `Some(file)` if it is this layer, `None` (and the file
    /// removed) if its length or digest is wrong.
    fn verify(&self) -> io::Result<Option<File>> {
        let mut file = File::open(&self.path)?;
        let meta = file.metadata()?;
        let mut ok = self.expected_len().is_none_or(|l| l == meta.len());
        if ok {
            let mut hasher = Sha256::new();
            let mut buf = vec![0; CHUNK];
            let mut done = 0u64;
            loop {
                let n = crate::cache::read_up_to(&mut file, &mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                done += n as u64;
                self.lock().phase = Phase::Verifying { done };
            }
            ok = crate::blob::digest_string(hasher) == self.diff_id;
        }
        if ok {
            return Ok(Some(file));
        }
        log::warn!(
            "content cache: {} does not hold layer {} (wrong length or digest); removed",
            self.path.display(),
            self.label
        );
        // Only the file that was checked: another process may have renamed a good one there.
        if fs::metadata(&self.path).is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev()) {
            let _ = fs::remove_file(&self.path);
        }
        Ok(None)
    }

    /// Decompresses the layer into a temp file, publishing the watermark as it goes; renames
    /// it into place once its digest is the diff_id.
    fn fill(&self) -> io::Result<Arc<File>> {
        fs::create_dir_all(&self.dir)?;
        remove_stale(&self.dir);
        // Anonymous (O_TMPFILE) until complete: a mount that ends mid-pass, by unmount or
        // kill, leaves nothing behind.
        let file = tempfile::tempfile_in(&self.dir)?;
        // The layer's bytes, root-only files included: for the cache's owner alone, as the
        // index files are.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let file = Arc::new(file);
        self.set(Phase::Filling {
            file: Some(file.clone()),
            done: 0,
        });
        let mut decoder = open_decoded(&self.blob, self.compression)?;
        // Two stages, so that hashing stays off the watermark's way: decompress | write,
        // publish, hash. Buffers go back to the decompressor, a handful in all.
        let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(3);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        let (decompressed, written) = std::thread::scope(|scope| {
            let writer = scope.spawn(|| -> io::Result<(String, u64)> {
                let mut hasher = Sha256::new();
                let mut done = 0u64;
                for chunk in full_rx {
                    file.write_all_at(&chunk, done)?;
                    done += chunk.len() as u64;
                    if let Phase::Filling { done: d, .. } = &mut self.lock().phase {
                        *d = done;
                    }
                    self.changed.notify_all();
                    hasher.update(&chunk);
                    let _ = empty_tx.send(chunk);
                }
                Ok((crate::blob::digest_string(hasher), done))
            });
            let decompressed = (|| -> io::Result<()> {
                let mut total = 0u64;
                loop {
                    let mut buf = empty_rx.try_recv().unwrap_or_default();
                    buf.resize(CHUNK, 0);
                    let n = crate::cache::read_up_to(&mut decoder, &mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.truncate(n);
                    total += n as u64;
                    self.pass_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if self.expected_len().is_some_and(|l| total > l) {
                        return Err(io::Error::other("the layer is longer than its index says"));
                    }
                    if full_tx.send(buf).is_err() {
                        // The writer stopped: its error says why.
                        return Ok(());
                    }
                }
            })();
            drop(full_tx);
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the cache writer panicked")));
            (decompressed, written)
        });
        decompressed?;
        let (digest, done) = written?;
        if digest != self.diff_id || self.expected_len().is_some_and(|l| l != done) {
            return Err(io::Error::other(format!(
                "the layer decompressed to {done} bytes with digest {digest}, not its diff_id {}",
                self.diff_id
            )));
        }
        publish(&file, &self.dir, &self.path)?;
        touch(&file);
        Ok(file)
    }
}

/// Gives the anonymous file `file` the name `path` (replacing what is there): linked under a
/// temp name through `/proc/self/fd`, then renamed, so `path` is the old file or this one.
fn publish(file: &File, dir: &Path, path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(io::Error::other)?;
    let to = std::ffi::CString::new(tmp.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: two NUL-terminated paths; linkat only reads them.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if linked != 0 {
        return Err(io::Error::last_os_error());
    }
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Marks a cache file used: its access time is now (explicitly, whatever the mount's atime
/// policy), which is the order eviction goes by.
fn touch(file: &File) {
    use std::os::fd::AsRawFd;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: a valid open descriptor and two valid timespecs, as futimens wants. Best
    // effort: a failure only makes the file look older.
    unsafe {
        libc::futimens(file.as_raw_fd(), times.as_ptr());
    }
}

/// The decompressed layers in `dir`: (path, size, last use), oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<(PathBuf, u64, i64)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(hex) = name.strip_suffix(".tar") else {
            continue;
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        if let Ok(m) = e.metadata() {
            out.push((
                e.path(),
                m.len(),
                m.atime() * 1_000_000_000 + m.atime_nsec(),
            ));
        }
    }
    out.sort_by_key(|(p, _, used)| (*used, p.clone()));
    Ok(out)
}

/// Removes the least recently used decompressed layers until those left fit in `max` bytes;
/// `keep` (the one just written) goes last, and only if it alone is too big.
pub fn evict(dir: &Path, max: u64, keep: &Path) {
    let Ok(mut files) = list(dir) else { return };
    // The one just written is the most recently used, whatever the clock's resolution says.
    if let Some(i) = files.iter().position(|(p, _, _)| p == keep) {
        let f = files.remove(i);
        files.push(f);
    }
    let mut total: u64 = files.iter().map(|(_, s, _)| s).sum();
    for (path, size, _) in files {
        if total <= max {
            break;
        }
        // Best effort: an open file stays readable to whoever uses it; the space comes back
        // when they close it.
        if fs::remove_file(&path).is_ok() {
            log::debug!("content cache: evicted {}", path.display());
            total -= size;
        }
    }
}

/// Removes every decompressed layer and leftover temp file in `dir`; returns the bytes freed.
pub fn clear(dir: &Path) -> io::Result<u64> {
    let mut freed = 0;
    for (path, size, _) in list(dir)? {
        fs::remove_file(path)?;
        freed += size;
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(freed)
}

/// Removes temp files a killed pass left, once they are a day old: no pass running now is.
fn remove_stale(dir: &Path) {
    let day = std::time::Duration::from_secs(24 * 3600);
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with(".tmp-")
            && e.metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a > day);
        if stale {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;
    use std::thread;

    use crate::content::{BLOCK, Content};
    use crate::tree::Extent;
    use crate::zran::Checkpoints;
    use crate::zran::tests::{record, sample};

    /// A one-layer image whose layer is `blob`, decompressing to `plain`.
    fn layer_of(blob: &[u8], compression: Compression, plain: &[u8]) -> Layer {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(blob).expect("write blob");
        Layer {
            number: 1,
            blob: Blob::new(Arc::new(file), 0, blob.len() as u64, "layer"),
            compression,
            digest: None,
            diff_id: Some(crate::blob::sha256_of(plain)),
            descriptor: None,
        }
    }

    /// A single-frame zstd layer of `plain`, with a disk cache in `dir` (bound `max`).
    fn zstd_content(plain: &[u8], dir: &Path, max: u64) -> Content {
        let zst = zstd::encode_all(plain, 3).expect("zstd");
        let layer = layer_of(&zst, Compression::Zstd, plain);
        // What the index pass records for a single frame: no checkpoints, the length.
        let none = Checkpoints::new(Vec::new(), plain.len() as u64).map(Arc::new);
        Content::new(std::slice::from_ref(&layer), &[none]).with_disk_cache_max(
            &[layer],
            Some(dir),
            max,
        )
    }

    fn whole(plain: &[u8]) -> Extent<'static> {
        Extent {
            layer: 0,
            offset: 0,
            size: plain.len() as u64,
            sparse: None,
        }
    }

    fn check(content: &Content, plain: &[u8], offset: u64, len: usize) {
        let mut buf = vec![0; len];
        let n = content
            .read_at(&whole(plain), offset, &mut buf)
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
        let want = &plain[offset as usize..(offset as usize + len).min(plain.len())];
        assert!(buf[..n] == *want, "{len} at {offset}");
    }

    /// Scattered offsets, deterministic for a seed.
    fn offsets(seed: u64, n: usize, len: u64) -> Vec<u64> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 20) % len
            })
            .collect()
    }

    fn cached_file(dir: &Path, plain: &[u8]) -> PathBuf {
        let hex = crate::blob::sha256_of(plain)[7..].to_string();
        content_dir(dir).join(format!("{hex}.tar"))
    }

    #[test]
    fn random_reads_of_a_single_frame_zstd_layer_cost_about_one_pass() {
        let plain = sample(21, 24 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let content = zstd_content(&plain, dir.path(), 1 << 40);
        for at in offsets(5, 60, plain.len() as u64) {
            check(&content, &plain, at, 5000);
        }
        let (blocks, pass) = content.decompressed()[0];
        let len = plain.len() as u64;
        assert_eq!(pass, len, "the pass decompresses the layer once");
        // Before the pass was due, reads decompressed at most NON_SEQUENTIAL from the start.
        assert!(
            blocks <= NON_SEQUENTIAL + 2 * BLOCK,
            "{blocks} by block reads"
        );
        let file = cached_file(dir.path(), &plain);
        assert_eq!(fs::read(&file).expect("cache file"), plain);
        let mode = fs::metadata(&file).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        // A second content reader of the same layer uses the file: no decompression at all.
        let again = zstd_content(&plain, dir.path(), 1 << 40);
        check(&again, &plain, len / 2, 70_000);
        assert!(again.layers_disk(0).wait_done());
        let before = again.decompressed()[0];
        for at in offsets(6, 30, len) {
            check(&again, &plain, at, 70_000);
        }
        assert_eq!(again.decompressed()[0], before, "read from the file");
        assert_eq!(before.1, 0, "verified, not decompressed again");
    }

    #[test]
    fn sequential_reads_never_start_a_pass() {
        let plain = sample(22, 6 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let content = zstd_content(&plain, dir.path(), 1 << 40);
        let mut at = 0;
        while at < plain.len() as u64 {
            check(&content, &plain, at, 100_000);
            at += 150_000;
        }
        assert_eq!(content.decompressed()[0], (plain.len() as u64, 0));
        assert!(!content_dir(dir.path()).exists());
    }

    #[test]
    fn a_gzip_layer_with_checkpoints_caches_once_scattered_reads_waste_half_a_pass() {
        let plain = sample(23, 8 << 20);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(&plain).expect("gzip");
        let gz = enc.finish().expect("gzip");
        let (_, points) = record(&gz, 1 << 20);
        let checkpoints = Checkpoints::new(points, plain.len() as u64).expect("valid");
        assert!(!checkpoints.is_empty());
        let layer = layer_of(&gz, Compression::Gzip, &plain);
        let dir = tempfile::tempdir().expect("tempdir");
        let content = Content::new(std::slice::from_ref(&layer), &[Some(Arc::new(checkpoints))])
            .with_disk_cache_max(&[layer], Some(dir.path()), 1 << 40);
        // A few reads waste a few spans: no pass.
        for at in offsets(7, 3, plain.len() as u64) {
            check(&content, &plain, at, 100);
        }
        assert_eq!(content.decompressed()[0].1, 0);
        // Read until the pass starts, then let it finish.
        let len = plain.len() as u64;
        let disk = content.layers_disk(0);
        let mut reads = offsets(8, 200, len).into_iter();
        let mut before = 0;
        for at in reads.by_ref() {
            check(&content, &plain, at, 100);
            before += 1;
            if disk.started() {
                break;
            }
        }
        assert!(disk.wait_done());
        let (blocks, pass) = content.decompressed()[0];
        assert_eq!(pass, len);
        // Half a pass wasted, a block per read, and the last read's span.
        let most = len / 2 + before * BLOCK + (1 << 20);
        assert!(blocks <= most, "{blocks} by block reads in {before} reads");
        assert!(blocks >= len / 2, "{blocks} by block reads");
        assert!(cached_file(dir.path(), &plain).exists());
        for at in reads {
            check(&content, &plain, at, 100);
        }
        assert_eq!(content.decompressed()[0], (blocks, pass));
    }

    #[test]
    fn a_damaged_file_is_removed_and_never_served() {
        let plain = sample(24, 9 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = cached_file(dir.path(), &plain);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        // The right length, one byte wrong; then a short one.
        let mut bad = plain.clone();
        bad[5 << 20] ^= 1;
        for wrong in [bad, plain[..plain.len() - 1].to_vec()] {
            fs::write(&file, &wrong).unwrap();
            let content = zstd_content(&plain, dir.path(), 1 << 40);
            for at in [(5 << 20) - 10, 8 << 20, 5 << 20] {
                check(&content, &plain, at, 100);
            }
            // The pass replaced the file with a good one.
            let disk = content.layers_disk(0);
            assert!(disk.wait_done());
            assert_eq!(fs::read(&file).unwrap(), plain);
            assert_eq!(content.decompressed()[0].1, plain.len() as u64);
        }
    }

    #[test]
    fn a_cache_that_cannot_be_written_leaves_reads_to_the_block_path() {
        let plain = sample(25, 6 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        // The content directory's place is taken by a file: nothing can be written there.
        fs::write(content_dir(dir.path()), b"not a directory").unwrap();
        let content = zstd_content(&plain, dir.path(), 1 << 40);
        for at in offsets(9, 20, plain.len() as u64) {
            check(&content, &plain, at, 3000);
        }
        assert!(!content.layers_disk(0).wait_done());
        for at in offsets(10, 5, plain.len() as u64) {
            check(&content, &plain, at, 3000);
        }
    }

    #[test]
    fn a_layer_bigger_than_the_bound_is_never_cached() {
        let plain = sample(26, 6 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let content = zstd_content(&plain, dir.path(), 1 << 20);
        for at in offsets(11, 5, plain.len() as u64) {
            check(&content, &plain, at, 3000);
        }
        assert_eq!(content.decompressed()[0].1, 0);
        assert!(!content_dir(dir.path()).exists());
    }

    #[test]
    fn eviction_removes_the_least_recently_used_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names: Vec<PathBuf> = (0..4)
            .map(|i| {
                dir.path()
                    .join(format!("{}.tar", format!("{i}").repeat(64)))
            })
            .collect();
        for (i, p) in names.iter().enumerate() {
            fs::write(p, vec![0; 1000]).unwrap();
            let f = File::open(p).unwrap();
            // Distinct access times, oldest first, whatever the clock's resolution.
            let t = libc::timespec {
                tv_sec: 1_000_000 + i as i64,
                tv_nsec: 0,
            };
            let times = [t, t];
            use std::os::fd::AsRawFd;
            // SAFETY: a valid descriptor and two valid timespecs.
            unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) };
        }
        fs::write(dir.path().join("unrelated"), vec![0; 5000]).unwrap();
        // Keep the oldest (just written, say): the next two oldest go.
        evict(dir.path(), 2000, &names[0]);
        let left: Vec<bool> = names.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [true, false, false, true]);
        assert!(dir.path().join("unrelated").exists());
        evict(dir.path(), 500, &names[3]);
        assert!(!names[0].exists() && !names[3].exists());
    }

    #[test]
    fn concurrent_readers_get_the_right_bytes_during_and_after_the_pass() {
        let plain = sample(27, 20 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let content = zstd_content(&plain, dir.path(), 1 << 40);
        thread::scope(|s| {
            for t in 0..6u64 {
                let (content, plain) = (&content, &plain);
                s.spawn(move || {
                    for at in offsets(100 + t, 40, plain.len() as u64) {
                        check(content, plain, at, 1 + (at % 200_000) as usize);
                    }
                });
            }
        });
        assert!(content.layers_disk(0).wait_done());
        assert_eq!(content.decompressed()[0].1, plain.len() as u64);
    }
}
