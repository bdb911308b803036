//! Persistent layer-index cache: a layer's index (entries, whiteouts, digests, gzip checkpoints
//! with their 32 KiB windows, about 3% of the layer's size) saved under its
//! digest, so a second mount, export or inspect of an image, or of another image sharing base
//! layers, skips the indexing pass. Files are versioned, checksummed and written atomically;
//! a corrupt, stale or foreign file is ignored and rebuilt, never trusted.
//!
//! `HEX.idx` has two separately checksummed parts: a head (identity, span digests, and of the
//! checkpoints only their places and the sha256 of each window's frame) and a body (entries).
//! The windows, most of the bytes, are in `HEX.cpt`, one zstd frame each, read (and checked
//! against the head) only when a read first needs them, all at once or one frame alone. So a
//! mount whose merged tree is cached (`merged.rs`) reads small heads and never decodes the
//! entries, and a lazy registry mount can be live before a layer's checkpoints have arrived
//! (`expect_checkpoints`), fetching a window alone for a read that needs one before then.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use sha2::{Digest as _, Sha256};

use crate::blob::SpanDigests;
use crate::layer::{Entry, Kind, LayerIndex, Meta};
use crate::source::Layer;
use crate::zran::{Checkpoint, Checkpoints, Place};

mod merged;

const MAGIC: &[u8; 8] = b"FLATFSIX";
/// Bump when the encoding or the meaning of a field changes; old files are then ignored.
pub(crate) const VERSION: u32 = 7;
/// zstd level of a checkpoint window's frame in a checkpoints file: the same windows give the
/// same file, so an artifact's blob and a local file agree.
const FRAME_LEVEL: i32 = 3;
/// The longest frame a window of [`crate::zran::WINDOW`] bytes can take (zstd stores
/// incompressible bytes nearly as they are).
const MAX_FRAME: u32 = crate::zran::WINDOW as u32 + 4096;
/// Bytes an index head takes per checkpoint.
const ENTRY: usize = 8 + 1 + 8 + 4 + 4 + 32;
/// Length of a [`checksum`].
const SUM: usize = 4;
/// Magic, version and the head's length.
const PREFIX: usize = 8 + 4 + 8;

/// Where cache files live: `$FLATFS_CACHE_DIR`, else `$XDG_CACHE_HOME/flatfs`, else
/// `~/.cache/flatfs`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FLATFS_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("flatfs"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/flatfs"))
}

/// A cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// One cache file, for `flatfs cache ls`.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    /// The layer digest it is keyed by; for a merged tree, its key.
    pub digest: String,
    /// What the file holds.
    pub kind: CacheKind,
    /// File size in bytes.
    pub size: u64,
    /// Entries in the index (nodes in a merged tree), if the file is readable.
    pub entries: Option<u64>,
}

/// The kinds of cache file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// One layer's index (`HEX.idx`).
    LayerIndex,
    /// The gzip checkpoints of a layer's index (`HEX.cpt`).
    Checkpoints,
    /// The merged tree of a stack of layers (`HEX.tree`).
    MergedTree,
    /// A blob pulled from a registry (`blobs/sha256/HEX`).
    Blob,
    /// Spans of a blob a lazy mount fetched (`blobs/partial/HEX`).
    PartialBlob,
    /// A decompressed layer (`content/HEX.tar`, under its diff_id).
    Content,
}

/// The identity of the blob bytes an index was verified against: if the file is the same file,
/// unchanged, the digest check done then still holds.
fn stamp(layer: &Layer) -> [u64; 6] {
    if let Some(toc) = layer.blob.toc() {
        // Entries point into the TOC's virtual stream: only a tree made from this very TOC fits.
        let d = |i: usize| u64::from_le_bytes(toc.digest[i..i + 8].try_into().unwrap_or_default());
        return [u64::MAX, 1, layer.blob.len(), d(0), d(8), d(16)];
    }
    if layer.blob.is_lazy() {
        // Its file fills as it is read; every span is checked against the index's span
        // digests instead, so the digest alone identifies the bytes.
        return lazy_stamp(layer.blob.len());
    }
    match layer.blob.metadata() {
        Some(m) => [
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
            layer.blob.offset(),
        ],
        None => [0; 6],
    }
}

/// The stamp of a blob read by ranges: no local file vouches for it, its span digests do.
fn lazy_stamp(len: u64) -> [u64; 6] {
    [u64::MAX, 0, len, 0, 0, 0]
}

impl Cache {
    /// A cache rooted at `dir` (created on first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of a layer: its blob digest, else (docker archives) its diff_id.
    pub(crate) fn key(layer: &Layer) -> Option<&str> {
        layer.digest.as_deref().or(layer.diff_id.as_deref())
    }

    fn path_for(&self, key: &str) -> Option<PathBuf> {
        let (alg, hex) = key.split_once(':')?;
        // Digests come from image JSON: only accept plain hex so a key can't name another path.
        if alg != "sha256" || !is_hex64(hex) {
            return None;
        }
        Some(self.dir.join(format!("{hex}.idx")))
    }

    /// The cached index of a layer, if there is a valid one for exactly these bytes.
    /// `verify` re-checks the blob digest when the file is not the one the index was made from.
    pub fn load(
        &self,
        layer: &Layer,
        verify: impl FnOnce() -> io::Result<bool>,
    ) -> Option<LayerIndex> {
        let key = Self::key(layer)?;
        let path = self.path_for(key)?;
        let (mut index, cpt, saved_stamp, saved_key) =
            take_imported(&path).or_else(|| decode(&fs::read(&path).ok()?))?;
        if saved_key != key || layer.diff_id.as_deref().is_some_and(|d| d != index.diff_id) {
            return None;
        }
        if layer.blob.is_lazy() {
            // Fetched by ranges: the index must have the span digests every read is checked
            // against (the registry source makes a blob lazy only then).
            index
                .spans
                .as_ref()
                .filter(|s| s.blob_len == layer.blob.len())?;
        }
        // A layer whose checkpoints file is gone (an index imported from an artifact whose
        // checkpoints never arrived), and is not on its way, would be read from its start by
        // every read: indexing it again costs one pass and writes both files.
        if !cpt_present(&path, cpt.as_ref())
            && (!layer.blob.is_lazy() || !pending_map().contains_key(&cpt_path(&path)))
        {
            return None;
        }
        if !layer.blob.is_lazy() && saved_stamp != stamp(layer) {
            // Another copy of the same digest: the index fits it only if the bytes are
            // right. Only the head changes: the checkpoints file stays as it is.
            if !verify().unwrap_or(false) {
                return None;
            }
            let bytes = encode(&index, cpt.as_ref(), stamp(layer), key);
            let _ = write_atomically(&self.dir, &path, &bytes);
        }
        index.checkpoints = if layer.blob.is_lazy() {
            // They may still be on their way: checked when a read needs them.
            checkpoints_of(&path, index.tar_size, cpt, layer.label())
        } else {
            // Read and checked now, as the entries are: a damaged file is a miss, and the
            // layer's index is rebuilt rather than its reads started from its start.
            match cpt {
                None => None,
                Some(c) if c.count() == 0 => Checkpoints::new(Vec::new(), index.tar_size),
                Some(c) => Some(decode_checkpoints(
                    &fs::read(cpt_path(&path)).ok()?,
                    &c,
                    index.tar_size,
                )?),
            }
            .map(Arc::new)
        };
        index.label = layer.label();
        Some(index)
    }

    /// The checkpoints of a layer's cached index (`Some(None)` if it has none). Only a file made
    /// from exactly this blob file counts: unlike [`Cache::load`], this never re-verifies
    /// another copy.
    ///
    /// Only the index's head is read now (small: the windows are in the checkpoints file);
    /// the checkpoints themselves are [`Checkpoints::lazy`]: read, each window's frame
    /// checked against the head's sha256, and range checked when a read first needs that
    /// layer (a read that needs one before then reads its frame alone).
    pub fn load_checkpoints(&self, layer: &Layer) -> Option<Option<Arc<Checkpoints>>> {
        let key = Self::key(layer)?;
        let path = self.path_for(key)?;
        let head = read_head_file(&path)?;
        let lazy = layer.blob.is_lazy();
        let fits = head.key == key
            && layer.diff_id.as_deref().is_none_or(|d| d == head.diff_id)
            && (head.stamp == stamp(layer) || lazy);
        let missing = !cpt_present(&path, head.checkpoints.as_ref())
            && (!lazy || !pending_map().contains_key(&cpt_path(&path)));
        if !fits || missing {
            return None;
        }
        Some(checkpoints_of(
            &path,
            head.tar_size,
            head.checkpoints,
            layer.label(),
        ))
    }

    /// The span digests recorded in the cached index of blob `digest` (`size` bytes), from
    /// the file's head: what a lazy registry read checks its bytes against.
    pub fn span_digests(&self, digest: &str, size: u64) -> Option<Arc<SpanDigests>> {
        let head = read_head_file(&self.path_for(digest)?)?;
        (head.key == digest)
            .then_some(head.spans)?
            .filter(|s| s.blob_len == size)
    }

    /// What the cache lacks for a lazy read of blob `digest` (`size` bytes).
    pub fn needs(&self, digest: &str, size: u64) -> Need {
        let Some(path) = self.path_for(digest) else {
            return Need::Index;
        };
        match read_head_file(&path) {
            Some(h) if h.key == digest && h.spans.as_ref().is_some_and(|s| s.blob_len == size) => {
                if cpt_present(&path, h.checkpoints.as_ref()) {
                    Need::Nothing
                } else {
                    Need::Checkpoints
                }
            }
            _ => Need::Index,
        }
    }

    /// The digest and size of the checkpoints file the cached index of blob `digest` names,
    /// if it names one: the blob of an index artifact that carries them, too.
    pub fn checkpoints_blob(&self, digest: &str) -> Option<(String, u64)> {
        let head = read_head_file(&self.path_for(digest)?).filter(|h| h.key == digest)?;
        let cpt = head.checkpoints.filter(|c| c.count() > 0)?;
        let hex: String = cpt.sha256.iter().map(|b| format!("{b:02x}")).collect();
        Some((format!("sha256:{hex}"), cpt.len()))
    }

    /// Saves a layer's index (best effort is the caller's choice: errors are returned).
    pub fn store(&self, layer: &Layer, index: &LayerIndex) -> io::Result<()> {
        let Some(key) = Self::key(layer) else {
            return Ok(());
        };
        let Some(path) = self.path_for(key) else {
            return Ok(());
        };
        let (idx, cpt) = encode_both(index, stamp(layer), key);
        // The checkpoints first: an index file never names a checkpoints file not yet written.
        if let Some(cpt) = cpt {
            write_atomically(&self.dir, &cpt_path(&path), &cpt)?;
        }
        write_atomically(&self.dir, &path, &idx)
    }

    /// A layer's index as cache files that name no local file: what an index artifact
    /// carries (`registry/artifact.rs`). Refused without span digests, which a lazy read
    /// needs, or if its checkpoints could not be loaded (an artifact without them would make
    /// every host read the layer from its start).
    pub fn portable(index: &LayerIndex, digest: &str) -> std::result::Result<Portable, String> {
        let len = index
            .spans
            .as_ref()
            .ok_or("its index has no span digests")?
            .blob_len;
        if index.checkpoints.as_ref().is_some_and(|c| !c.is_complete()) {
            return Err(
                "its cached checkpoints are damaged (`flatfs cache clear` and retry)".into(),
            );
        }
        let (index, checkpoints) = encode_both(index, lazy_stamp(len), digest);
        Ok(Portable { index, checkpoints })
    }

    /// Takes the index of blob `digest` (`size` bytes, uncompressed `diff_id` if known) from
    /// untrusted bytes (an index artifact): decoded with every check a cache file gets, it must
    /// be of this blob, with span digests covering exactly its size, then it is saved
    /// atomically, as if indexed here. Its checkpoints, if it has any, come separately
    /// ([`Cache::expect_checkpoints`]). Says why it was refused.
    pub fn import(
        &self,
        digest: &str,
        size: u64,
        diff_id: Option<&str>,
        bytes: &[u8],
    ) -> std::result::Result<(), String> {
        let path = self
            .path_for(digest)
            .ok_or_else(|| format!("unsupported digest {digest:?}"))?;
        let (index, cpt, _, key) = decode(bytes).ok_or(
            "not a valid layer index (damaged, forged, or made by another flatfs version)",
        )?;
        if key != digest {
            return Err(format!("it is the index of {key}"));
        }
        match &index.spans {
            Some(s) if s.blob_len == size => {}
            Some(s) => {
                return Err(format!(
                    "its span digests cover {} bytes, the layer has {size}",
                    s.blob_len
                ));
            }
            None => return Err("it has no span digests".into()),
        }
        if let Some(d) = diff_id.filter(|d| *d != index.diff_id) {
            return Err(format!(
                "its diff_id is {}, the image config says {d}",
                index.diff_id
            ));
        }
        // Re-encoded with no stamp of a local file: a forged stamp must not pass for one.
        let bytes = encode(&index, cpt.as_ref(), lazy_stamp(size), digest);
        write_atomically(&self.dir, &path, &bytes)
            .map_err(|e| format!("cannot save it in {}: {e}", self.dir.display()))?;
        // The open that follows loads this very file: it takes the decoded index instead.
        if let Some(id) = identity(&path) {
            let decoded = (index, cpt, lazy_stamp(size), key);
            imported_map().insert(path, (id, decoded));
        }
        Ok(())
    }

    /// Says where the checkpoints of the cached index of blob `digest` will come from if its
    /// checkpoints file is missing or wrong when a read first needs them: `fetch` (an index
    /// artifact's blob, untrusted) is run once, by that read or by whoever loads them first,
    /// its bytes are checked against the frame digests the index's head records and range
    /// checked, then saved as the checkpoints file. False if the index needs none.
    ///
    /// `range` fetches a byte range of that file (its blob in the artifact): a read that needs
    /// one checkpoint before all have arrived gets its window alone, checked against the
    /// sha256 the head records for it.
    pub fn expect_checkpoints(
        &self,
        digest: &str,
        fetch: CheckpointsFetch,
        range: RangeFetch,
    ) -> bool {
        let Some(path) = self.path_for(digest) else {
            return false;
        };
        let Some(head) = read_head_file(&path).filter(|h| h.key == digest) else {
            return false;
        };
        let Some(cpt) = head.checkpoints.filter(|c| c.count() > 0) else {
            return false;
        };
        let (file, dir, tar_size) = (cpt_path(&path), self.dir.clone(), head.tar_size);
        let (to, want) = (file.clone(), cpt.clone());
        let job: CheckpointsJob = Box::new(move || {
            let bytes = fetch(want.len())?;
            let c = decode_checkpoints(&bytes, &want, tar_size).ok_or(
                "they do not match the sha256 digests its index records, or fail the range \
                 checks",
            )?;
            if let Err(e) = write_atomically(&dir, &to, &bytes) {
                log::warn!("cannot save {}: {e}", to.display());
            }
            Ok(c)
        });
        let pending = Arc::new(Pending {
            cpt,
            range,
            job: Mutex::new(Some(job)),
            done: OnceLock::new(),
        });
        pending_map().insert(file, pending);
        true
    }

    /// Removes the index of blob `digest` (one imported from an artifact that proved wrong).
    pub fn forget(&self, digest: &str) -> io::Result<()> {
        let Some(path) = self.path_for(digest) else {
            return Ok(());
        };
        pending_map().remove(&cpt_path(&path));
        imported_map().remove(&path);
        for p in [cpt_path(&path), path] {
            match fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every cache file.
    pub fn list(&self) -> io::Result<Vec<CacheEntry>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let (hex, kind) = if let Some(hex) = name.strip_suffix(".idx") {
                (hex, CacheKind::LayerIndex)
            } else if let Some(hex) = name.strip_suffix(".cpt") {
                (hex, CacheKind::Checkpoints)
            } else if let Some(hex) = name.strip_suffix(".tree") {
                (hex, CacheKind::MergedTree)
            } else {
                continue;
            };
            if !is_hex64(hex) {
                continue;
            }
            let size = e.metadata()?.len();
            let entries = match kind {
                CacheKind::Checkpoints => None,
                _ => fs::read(e.path()).ok().and_then(|b| match kind {
                    CacheKind::LayerIndex => decode(&b).map(|(i, ..)| i.entries.len() as u64),
                    CacheKind::MergedTree => merged::node_count(&b),
                    _ => None,
                }),
            };
            out.push(CacheEntry {
                digest: format!("sha256:{hex}"),
                kind,
                size,
                entries,
            });
        }
        for (path, size, _) in
            crate::content_cache::list(&crate::content_cache::content_dir(&self.dir))?
        {
            let hex = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            out.push(CacheEntry {
                digest: format!("sha256:{}", hex.unwrap_or_default()),
                kind: CacheKind::Content,
                size,
                entries: None,
            });
        }
        for b in crate::registry::BlobStore::in_cache(&self.dir).list()? {
            out.push(CacheEntry {
                digest: b.digest,
                kind: if b.partial {
                    CacheKind::PartialBlob
                } else {
                    CacheKind::Blob
                },
                size: b.size,
                entries: None,
            });
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Removes every cache file; returns how many bytes were freed.
    pub fn clear(&self) -> io::Result<u64> {
        let mut freed = crate::registry::BlobStore::in_cache(&self.dir).clear()?;
        freed += crate::content_cache::clear(&crate::content_cache::content_dir(&self.dir))?;
        for e in self.list()? {
            let hex = e.digest.trim_start_matches("sha256:");
            let ext = match e.kind {
                CacheKind::LayerIndex => "idx",
                CacheKind::Checkpoints => "cpt",
                CacheKind::MergedTree => "tree",
                CacheKind::Blob | CacheKind::PartialBlob | CacheKind::Content => continue,
            };
            fs::remove_file(self.dir.join(format!("{hex}.{ext}")))?;
            freed += e.size;
        }
        // Leftover temp files from an interrupted store.
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(freed)
    }
}

/// What the cache lacks for a lazy read of a layer ([`Cache::needs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Its index and checkpoints are there.
    Nothing,
    /// Its index is there, its checkpoints file is not.
    Checkpoints,
    /// No usable index.
    Index,
}

/// A layer's index as an index artifact carries it ([`Cache::portable`]).
#[derive(Debug, Clone)]
pub struct Portable {
    /// The index file (head and entries).
    pub index: Vec<u8>,
    /// The checkpoints file, if the layer has checkpoints.
    pub checkpoints: Option<Vec<u8>>,
}

/// Fetches a checkpoints file from elsewhere ([`Cache::expect_checkpoints`]), given the length
/// it must have (to bound what it inflates); says why not.
pub type CheckpointsFetch = Box<dyn FnOnce(u64) -> std::result::Result<Vec<u8>, String> + Send>;

/// Fetches bytes `start..end` of a checkpoints file from elsewhere; says why not.
pub type RangeFetch = Arc<dyn Fn(u64, u64) -> std::result::Result<Vec<u8>, String> + Send + Sync>;

/// Fetches and checks a layer's checkpoints, and saves them.
type CheckpointsJob = Box<dyn FnOnce() -> std::result::Result<Checkpoints, String> + Send>;

/// Checkpoints on their way, by the path of the checkpoints file they become: the fetch is
/// run by the first loader that needs them, later ones wait for it (`OnceLock`).
struct Pending {
    /// What the index's head says they must be.
    cpt: CptRef,
    /// One window's frame, for a read that needs it before the whole file is here.
    range: RangeFetch,
    job: Mutex<Option<CheckpointsJob>>,
    done: OnceLock<Option<Checkpoints>>,
}

/// Process-wide, because the registry source that knows where checkpoints come from and the
/// cache loads that need them hold different [`Cache`] values of one directory.
fn pending_map() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Arc<Pending>>> {
    static PENDING: LazyLock<Mutex<HashMap<PathBuf, Arc<Pending>>>> = LazyLock::new(Mutex::default);
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// The checkpoints of `cpt`, fetched through a pending fetch for `file` if one was set up
/// (run now, or waited for); `None` if there is none or it failed (said in the log).
fn from_pending(file: &Path, cpt: &CptRef, label: &str) -> Option<Checkpoints> {
    let pending = pending_map().get(file).cloned()?;
    if pending.cpt != *cpt {
        return None;
    }
    let done = pending.done.get_or_init(|| {
        let job = pending.job.lock().unwrap_or_else(|e| e.into_inner()).take();
        let start = std::time::Instant::now();
        match job.map(|job| job()) {
            Some(Ok(c)) => {
                log::info!(
                    "layer {label}: {} checkpoints from the index artifact in {:.0?}",
                    c.len(),
                    start.elapsed()
                );
                Some(c)
            }
            Some(Err(e)) => {
                log::warn!(
                    "layer {label}: its checkpoints from the index artifact: {e}; reading it \
                     from its start instead"
                );
                None
            }
            None => None,
        }
    });
    // Saved as a file by now (or not at all): later loads read that.
    let mut map = pending_map();
    if map.get(file).is_some_and(|p| Arc::ptr_eq(p, &pending)) {
        map.remove(file);
    }
    done.clone()
}

/// An index file as [`decode`] gives it.
type Decoded = (LayerIndex, Option<CptRef>, [u64; 6], String);

/// Decoded indexes by path, with their file's identity.
type Imported = HashMap<PathBuf, ([u64; 4], Decoded)>;

/// Indexes this process imported and saved, decoded, by path, with the saved file's identity:
/// a load of the same file takes them instead of reading and decoding it again.
fn imported_map() -> std::sync::MutexGuard<'static, Imported> {
    static IMPORTED: LazyLock<Mutex<Imported>> = LazyLock::new(Mutex::default);
    IMPORTED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which file is at `path`: replaced (by rename) or rewritten, it is another.
fn identity(path: &Path) -> Option<[u64; 4]> {
    let m = fs::metadata(path).ok()?;
    Some([m.dev(), m.ino(), m.size(), m.mtime_nsec() as u64])
}

/// The decoded index this process saved at `path`, if the file there is still that one.
fn take_imported(path: &Path) -> Option<Decoded> {
    let (id, decoded) = imported_map().remove(path)?;
    (identity(path) == Some(id)).then_some(decoded)
}

/// The checkpoints file beside index file `idx`.
fn cpt_path(idx: &Path) -> PathBuf {
    idx.with_extension("cpt")
}

/// True unless the head names checkpoints whose file is missing or of another length (a
/// damaged file of the right length is caught by its sha256 when loaded).
fn cpt_present(idx: &Path, cpt: Option<&CptRef>) -> bool {
    match cpt {
        Some(c) if c.count() > 0 => fs::metadata(cpt_path(idx)).is_ok_and(|m| m.len() == c.len()),
        _ => true,
    }
}

/// The checkpoints a head names (of a stream of `tar_size` bytes): none, none at all (a short
/// layer), or deferred: the file beside the index, checked against the head when first needed,
/// or, if it is not there (yet) or wrong, a pending fetch.
fn checkpoints_of(
    idx: &Path,
    tar_size: u64,
    cpt: Option<CptRef>,
    label: String,
) -> Option<Arc<Checkpoints>> {
    let cpt = cpt?;
    if cpt.count() == 0 {
        return Checkpoints::new(Vec::new(), tar_size).map(Arc::new);
    }
    let file = cpt_path(idx);
    let places = cpt.entries.iter().map(|e| e.place).collect();
    let (f, c) = (file.clone(), cpt.clone());
    // One window: from the local file, else (not there yet) by a range of the pending fetch.
    let window = Box::new(move |i: usize| {
        let (at, len) = c.frame(i)?;
        let local = read_at(&f, at, len).and_then(|b| decode_frame(&b, &c.entries[i]));
        local.or_else(|| {
            let range = pending_map().get(&f).filter(|p| p.cpt == c)?.range.clone();
            let b = range(at, at + len)
                .inspect_err(|e| log::debug!("checkpoint {i} of {}: {e}", f.display()))
                .ok()?;
            decode_frame(&b, &c.entries[i])
        })
    });
    let checkpoints = Checkpoints::lazy_placed(places, tar_size, window, move || {
        let loaded = fs::read(&file)
            .ok()
            .and_then(|b| decode_checkpoints(&b, &cpt, tar_size))
            .or_else(|| from_pending(&file, &cpt, &label));
        if loaded.is_none() {
            log::warn!(
                "layer {label}: its checkpoints ({}) are missing, damaged or not those its \
                 index names; reading the layer from its start instead",
                file.display()
            );
        }
        loaded
    });
    checkpoints.map(Arc::new)
}

/// `len` bytes at `at` of the file at `path`.
fn read_at(path: &Path, at: u64, len: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    File::open(path).ok()?.read_exact_at(&mut buf, at).ok()?;
    Some(buf)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Writes `bytes` to `path` through a temp file in the same directory and a rename, so a reader
/// sees the old file or the new one, never part of one.
/// Writes `bytes` to `path` through a temp file in `dir` (created if need be), renamed over it:
/// a reader sees the old file or the new one, never a torn one.
pub(crate) fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The checksum of a cache file's part. It tells a torn or damaged file from a good one, not a
/// forged one (whoever can write the cache can write any checksum; every field read is range
/// checked for that), so CRC-32, which runs at memory speed, serves: sha256 took a fifth of
/// a warm mount.
pub(crate) fn checksum(bytes: &[u8]) -> [u8; SUM] {
    crc32fast::hash(bytes).to_le_bytes()
}

// ---- encoding: little-endian, length-prefixed byte strings; a checksum after the head and
// ---- another after the body ----

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
}

/// What an index head records of one checkpoint: where it is, and its window's zstd frame in
/// the checkpoints file (the frames are back to back in checkpoint order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CptEntry {
    place: Place,
    frame_len: u32,
    /// Of the frame: each is checked on its own, so one can be read (or fetched) alone.
    sha256: [u8; 32],
}

/// What an index head records of its layer's checkpoints, which are in a file of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CptRef {
    entries: Arc<[CptEntry]>,
    /// Of the whole file: the digest of the index artifact's blob that carries it, so a host
    /// whose file went missing can fetch it again without looking for the artifact.
    sha256: [u8; 32],
}

impl CptRef {
    /// How many (none: no file).
    fn count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// The checkpoints file's length.
    fn len(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.frame_len)).sum()
    }

    /// Where checkpoint `i`'s frame is in the file: offset and length.
    fn frame(&self, i: usize) -> Option<(u64, u64)> {
        let at = self.entries[..i]
            .iter()
            .map(|e| u64::from(e.frame_len))
            .sum();
        Some((at, u64::from(self.entries.get(i)?.frame_len)))
    }
}

/// The index file and, if the layer has checkpoints, its checkpoints file.
fn encode_both(index: &LayerIndex, stamp: [u64; 6], key: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    let cpt = index.checkpoints.as_deref().map(encode_checkpoints);
    let idx = encode(index, cpt.as_ref().map(|c| &c.1), stamp, key);
    (
        idx,
        cpt.and_then(|(bytes, r)| (r.count() > 0).then_some(bytes)),
    )
}

/// A checkpoints file (each window as a zstd frame, back to back) and what the index head
/// says of it.
fn encode_checkpoints(c: &Checkpoints) -> (Vec<u8>, CptRef) {
    let mut bytes = Vec::with_capacity(c.window_bytes() / 2);
    let mut entries = Vec::with_capacity(c.len());
    for p in c.points() {
        // Compressing bytes held in memory into a Vec does not fail.
        let frame = zstd::bulk::compress(&p.window, FRAME_LEVEL).unwrap_or_default();
        entries.push(CptEntry {
            place: Place {
                input: p.input,
                bits: p.bits,
                output: p.output,
                window_len: p.window.len() as u32,
            },
            frame_len: frame.len() as u32,
            sha256: Sha256::digest(&frame).into(),
        });
        bytes.extend_from_slice(&frame);
    }
    let entries = entries.into();
    let sha256 = Sha256::digest(&bytes).into();
    (bytes, CptRef { entries, sha256 })
}

/// The window in `frame` if it is the frame `entry` names (sha256) and inflates to exactly its
/// window's length.
fn decode_frame(frame: &[u8], entry: &CptEntry) -> Option<Box<[u8]>> {
    if <[u8; 32]>::from(Sha256::digest(frame)) != entry.sha256 {
        return None;
    }
    let len = entry.place.window_len as usize;
    let window = zstd::bulk::decompress(frame, len).ok()?;
    (window.len() == len).then(|| window.into_boxed_slice())
}

/// The checkpoints in `bytes` if they are exactly the file `cpt` names (every frame's sha256)
/// and pass [`Checkpoints::new`]'s range checks for a stream of `tar_size`.
fn decode_checkpoints(bytes: &[u8], cpt: &CptRef, tar_size: u64) -> Option<Checkpoints> {
    if bytes.len() as u64 != cpt.len() {
        return None;
    }
    let mut at = 0usize;
    let mut points = Vec::with_capacity(cpt.entries.len());
    for e in cpt.entries.iter() {
        let end = at.checked_add(e.frame_len as usize)?;
        points.push(Checkpoint {
            input: e.place.input,
            bits: e.place.bits,
            output: e.place.output,
            window: decode_frame(bytes.get(at..end)?, e)?,
        });
        at = end;
    }
    // Checked like the rest: a checkpoint that lies would make reads return wrong data.
    Checkpoints::new(points, tar_size)
}

/// An index file: the head (with `cpt`, what it says of the checkpoints file) and the body.
fn encode(index: &LayerIndex, cpt: Option<&CptRef>, stamp: [u64; 6], key: &str) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(64 + index.entries.len() * 64));
    e.0.extend_from_slice(MAGIC);
    e.u32(VERSION);
    e.u64(0); // the head's length, set below
    e.bytes(key.as_bytes());
    for s in stamp {
        e.u64(s);
    }
    e.bytes(index.diff_id.as_bytes());
    e.u64(index.tar_size);
    match cpt {
        None => e.u8(0),
        Some(c) => {
            e.u8(1);
            e.0.extend_from_slice(&c.sha256);
            e.u64(c.count());
            for x in c.entries.iter() {
                e.u64(x.place.input);
                e.u8(x.place.bits);
                e.u64(x.place.output);
                e.u32(x.place.window_len);
                e.u32(x.frame_len);
                e.0.extend_from_slice(&x.sha256);
            }
        }
    }
    match &index.spans {
        None => e.u8(0),
        Some(spans) => {
            e.u8(1);
            e.u64(spans.blob_len);
            e.u64(spans.digests.len() as u64);
            for d in &spans.digests {
                e.0.extend_from_slice(d);
            }
        }
    }
    let head_len = (e.0.len() - PREFIX) as u64;
    e.0[PREFIX - 8..PREFIX].copy_from_slice(&head_len.to_le_bytes());
    let sum = checksum(&e.0);
    e.0.extend_from_slice(&sum);
    let body = e.0.len();
    e.u64(index.whiteouts.len() as u64);
    for w in &index.whiteouts {
        e.bytes(w);
    }
    e.u64(index.opaques.len() as u64);
    for o in &index.opaques {
        e.bytes(o);
    }
    e.u64(index.entries.len() as u64);
    for en in &index.entries {
        e.bytes(&en.path);
        let (tag, a, b, link): (u8, u32, u32, &[u8]) = match &en.kind {
            Kind::File => (0, 0, 0, &[]),
            Kind::Dir => (1, 0, 0, &[]),
            Kind::Symlink(t) => (2, 0, 0, t),
            Kind::Hardlink(t) => (3, 0, 0, t),
            Kind::Char(x, y) => (4, *x, *y, &[]),
            Kind::Block(x, y) => (5, *x, *y, &[]),
            Kind::Fifo => (6, 0, 0, &[]),
        };
        e.u8(tag);
        e.u32(a);
        e.u32(b);
        e.bytes(link);
        e.u32(en.meta.mode);
        e.u64(en.meta.uid);
        e.u64(en.meta.gid);
        e.u64(en.meta.mtime as u64);
        e.u32(en.meta.mtime_nsec);
        e.u64(en.size);
        e.u64(en.offset);
        e.u64(en.xattrs.len() as u64);
        for (k, v) in &en.xattrs {
            e.bytes(k);
            e.bytes(v);
        }
        // A sparse map as (offset, length) runs: where each run's bytes lie follows from
        // `offset`, so a file cannot place them anywhere else.
        match &en.sparse {
            None => e.u8(0),
            Some(map) => {
                e.u8(1);
                e.u64(map.len() as u64);
                for s in map.iter() {
                    e.u64(s.logical);
                    e.u64(s.len);
                }
            }
        }
    }
    let sum = checksum(&e.0[body..]);
    e.0.extend_from_slice(&sum);
    e.0
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    /// A path, which must be in the indexer's normal form: whoever can write the cache directory
    /// must not be able to place an entry outside the image root.
    fn path(&mut self) -> Option<Vec<u8>> {
        normalised(self.bytes()?)
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.u64()?).ok()?;
        Some(self.take(n)?.to_vec())
    }
    /// A length-prefixed UTF-8 string, borrowed.
    fn text(&mut self) -> Option<&'a str> {
        let n = usize::try_from(self.u64()?).ok()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
    /// A count of items each at least `min` bytes long: bounded by what is left, so a corrupt
    /// count cannot make us allocate more than the file holds.
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n <= self.0.len() / min.max(1)).then_some(n)
    }
}

fn normalised(p: Vec<u8>) -> Option<Vec<u8>> {
    (crate::layer::path::normalise(&p).ok()? == p).then_some(p)
}

/// What a file's head says: which blob the index is of, and of its checkpoints.
struct Head {
    key: String,
    stamp: [u64; 6],
    diff_id: String,
    tar_size: u64,
    checkpoints: Option<CptRef>,
    spans: Option<Arc<SpanDigests>>,
}

/// Where the head's checksum starts, from the file's first [`PREFIX`] bytes.
fn head_end(prefix: &[u8]) -> Option<usize> {
    let mut d = Dec(prefix.get(..PREFIX)?);
    if d.take(8)? != MAGIC || d.u32()? != VERSION {
        return None;
    }
    PREFIX.checked_add(usize::try_from(d.u64()?).ok()?)
}

/// Reads into `buf` until it is full or the file ends; how many bytes it holds.
pub(crate) fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads and checks the head of the index file at `path` (not its body).
fn read_head_file(path: &Path) -> Option<Head> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut prefix = [0u8; PREFIX];
    file.read_exact(&mut prefix).ok()?;
    let total = head_end(&prefix)?.checked_add(SUM)?;
    // Bounded by the file before allocating: a corrupt length cannot ask for more.
    if total as u64 > len {
        return None;
    }
    let mut head = vec![0u8; total];
    head[..PREFIX].copy_from_slice(&prefix);
    file.read_exact(&mut head[PREFIX..]).ok()?;
    parse_head(&head)
}

/// The checked head of an index file whose first bytes are `bytes`.
fn parse_head(bytes: &[u8]) -> Option<Head> {
    let end = head_end(bytes)?;
    let (head, sum) = (bytes.get(..end)?, bytes.get(end..end.checked_add(SUM)?)?);
    if checksum(head) != sum {
        return None;
    }
    let mut d = Dec(&head[PREFIX..]);
    let key = d.text()?.to_owned();
    let mut stamp = [0u64; 6];
    for s in &mut stamp {
        *s = d.u64()?;
    }
    let diff_id = d.text()?.to_owned();
    let tar_size = d.u64()?;
    let checkpoints = match d.u8()? {
        0 => None,
        1 => {
            let sha256 = d.take(32)?.try_into().ok()?;
            let n = d.count(ENTRY)?;
            let entries = (0..n)
                .map(|_| {
                    let e = CptEntry {
                        place: Place {
                            input: d.u64()?,
                            bits: d.u8()?,
                            output: d.u64()?,
                            window_len: d.u32()?,
                        },
                        frame_len: d.u32()?,
                        sha256: d.take(32)?.try_into().ok()?,
                    };
                    (e.frame_len > 0 && e.frame_len <= MAX_FRAME).then_some(e)
                })
                .collect::<Option<Vec<_>>>()?;
            // Checked now, without a window: places that lie would make reads go wrong.
            if !crate::zran::places_are_sane(entries.iter().map(|e| e.place), tar_size) {
                return None;
            }
            Some(CptRef {
                entries: entries.into(),
                sha256,
            })
        }
        _ => return None,
    };
    let spans = match d.u8()? {
        0 => None,
        1 => {
            let blob_len = d.u64()?;
            let n = d.count(32)?;
            let digests = (0..n)
                .map(|_| d.take(32)?.try_into().ok())
                .collect::<Option<Vec<[u8; 32]>>>()?;
            // One digest per span of the blob, or the file lies.
            Some(Arc::new(SpanDigests::new(blob_len, digests)?))
        }
        _ => return None,
    };
    if !d.0.is_empty() {
        return None;
    }
    Some(Head {
        key,
        stamp,
        diff_id,
        tar_size,
        checkpoints,
        spans,
    })
}

/// An index file's entries and head; its checkpoints are the caller's (`checkpoints_of`).
fn decode(bytes: &[u8]) -> Option<Decoded> {
    let head = parse_head(bytes)?;
    let body_start = head_end(bytes)? + SUM;
    let body_end = bytes.len().checked_sub(SUM)?;
    let (body, sum) = (bytes.get(body_start..body_end)?, &bytes[body_end..]);
    if checksum(body) != sum {
        return None;
    }
    let mut d = Dec(body);
    let n = d.count(8)?;
    let whiteouts = (0..n).map(|_| d.path()).collect::<Option<Vec<_>>>()?;
    let n = d.count(8)?;
    let opaques = (0..n).map(|_| d.path()).collect::<Option<Vec<_>>>()?;
    let n = d.count(61)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let path = d.path()?;
        let (tag, a, b, link) = (d.u8()?, d.u32()?, d.u32()?, d.bytes()?);
        let kind = match tag {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink(link),
            3 => Kind::Hardlink(normalised(link)?),
            4 => Kind::Char(a, b),
            5 => Kind::Block(a, b),
            6 => Kind::Fifo,
            _ => return None,
        };
        let meta = Meta {
            mode: d.u32()?,
            uid: d.u64()?,
            gid: d.u64()?,
            mtime: d.u64()? as i64,
            mtime_nsec: d.u32()?,
        };
        let size = d.u64()?;
        let offset = d.u64()?;
        let nx = d.count(16)?;
        let xattrs = (0..nx)
            .map(|_| Some((d.bytes()?, d.bytes()?)))
            .collect::<Option<Vec<_>>>()?;
        let (sparse, stored) = match d.u8()? {
            0 => (None, size),
            1 if kind == Kind::File => {
                let n = d.count(16)?;
                if n > crate::layer::sparse::MAX_SEGMENTS {
                    return None;
                }
                let pairs = (0..n)
                    .map(|_| Some((d.u64()?, d.u64()?)))
                    .collect::<Option<Vec<_>>>()?;
                let stored = pairs.iter().try_fold(0u64, |sum, p| sum.checked_add(p.1))?;
                let map = crate::layer::sparse::SparseMap {
                    real_size: size,
                    pairs: Ok(pairs),
                };
                let segments = crate::layer::sparse::segments(&map, offset, stored).ok()?;
                (Some(segments), stored)
            }
            _ => return None,
        };
        // A file's bytes lie inside the layer's tar: readers slice and add with these.
        if offset.checked_add(stored)? > head.tar_size {
            return None;
        }
        entries.push(Entry {
            path,
            kind,
            meta,
            size,
            offset,
            xattrs,
            sparse,
        });
    }
    if !d.0.is_empty() {
        return None;
    }
    Some((
        LayerIndex {
            label: String::new(),
            entries,
            whiteouts,
            opaques,
            diff_id: head.diff_id,
            tar_size: head.tar_size,
            decompressed: None,
            checkpoints: None,
            spans: head.spans,
        },
        head.checkpoints,
        head.stamp,
        head.key,
    ))
}

/// An index file's bytes for an index of no tar (a TOC layer's, at virtual offsets): `key`
/// says what it is of, and no stamp or checkpoints tie it to a blob.
pub(crate) fn encode_unstamped(index: &LayerIndex, key: &str) -> Vec<u8> {
    encode(index, None, [0; 6], key)
}

/// The index in `bytes` from [`encode_unstamped`] with this `key`, checked like any index file
/// (checksums, normal paths, offsets inside `tar_size`); `None` for anything else.
pub(crate) fn decode_unstamped(bytes: &[u8], key: &str) -> Option<LayerIndex> {
    let (index, cpt, stamp, k) = decode(bytes)?;
    (k == key && cpt.is_none() && stamp == [0; 6]).then_some(index)
}

/// sha256 of a blob's bytes, for re-verifying a cached index against another copy.
pub fn blob_digest(layer: &Layer) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut r = layer.blob.reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::blob::digest_string(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayerIndex {
        LayerIndex {
            label: "1".into(),
            entries: vec![
                Entry {
                    path: b"a/b\xff".to_vec(),
                    kind: Kind::Symlink(b"/x".to_vec()),
                    meta: Meta {
                        mode: 0o4755,
                        uid: 3_000_000,
                        gid: 7,
                        mtime: -5,
                        mtime_nsec: 12,
                    },
                    size: 0,
                    offset: 512,
                    xattrs: vec![
                        (b"security.capability".to_vec(), b"\x01\n\x00".to_vec()),
                        (b"user.e".to_vec(), Vec::new()),
                    ],
                    sparse: None,
                },
                Entry {
                    path: b"s".to_vec(),
                    kind: Kind::File,
                    meta: Meta::default(),
                    size: 1 << 40,
                    offset: 2048,
                    xattrs: Vec::new(),
                    sparse: Some(Box::new([
                        crate::layer::Segment {
                            logical: 100,
                            len: 10,
                            tar: 2048,
                        },
                        crate::layer::Segment {
                            logical: 5000,
                            len: 20,
                            tar: 2058,
                        },
                    ])),
                },
                Entry {
                    path: b"c".to_vec(),
                    kind: Kind::Char(1, 3),
                    meta: Meta::default(),
                    size: 0,
                    offset: 1024,
                    xattrs: Vec::new(),
                    sparse: None,
                },
            ],
            whiteouts: vec![b"w".to_vec()],
            opaques: vec![Vec::new()],
            diff_id: "sha256:00".into(),
            tar_size: 4096,
            decompressed: None,
            checkpoints: Some(Arc::new(sample_checkpoints(3))),
            spans: Some(Arc::new(
                SpanDigests::new(crate::blob::SPAN_BYTES + 1, vec![[1; 32], [2; 32]]).unwrap(),
            )),
        }
    }

    fn sample_checkpoints(bits: u8) -> Checkpoints {
        let points = vec![
            Checkpoint {
                input: 100,
                bits,
                output: 1500,
                window: (0..1500).map(|i| i as u8).collect(),
            },
            Checkpoint {
                input: 200,
                bits: 0,
                output: 4000,
                window: Box::new([]),
            },
        ];
        Checkpoints::new(points, 4096).expect("valid checkpoints")
    }

    /// The index file alone (its checkpoints, if any, go to a file of their own).
    fn encode(index: &LayerIndex, stamp: [u64; 6], key: &str) -> Vec<u8> {
        encode_both(index, stamp, key).0
    }

    /// An index file decoded, without what it says of its checkpoints.
    fn decode(bytes: &[u8]) -> Option<(LayerIndex, [u64; 6], String)> {
        super::decode(bytes).map(|(i, _, s, k)| (i, s, k))
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample(), [1, 2, 3, 4, 5, 6], "sha256:ab");
        let (index, stamp, key) = decode(&bytes).expect("decodes");
        assert_eq!(index.entries, sample().entries);
        assert_eq!(index.whiteouts, sample().whiteouts);
        assert_eq!(index.opaques, sample().opaques);
        assert_eq!(
            (index.diff_id.as_str(), index.tar_size),
            ("sha256:00", 4096)
        );
        assert_eq!((stamp, key.as_str()), ([1, 2, 3, 4, 5, 6], "sha256:ab"));
        assert_eq!(index.spans, sample().spans);
        // The checkpoints are in their own file, which the head names.
        let (bytes, cpt) = encode_both(&sample(), [0; 6], "sha256:ab");
        let (_, named, _, _) = super::decode(&bytes).expect("decodes");
        let named = named.expect("names checkpoints");
        let cpt = cpt.expect("a checkpoints file");
        assert_eq!(named.count(), 2);
        assert_eq!(named.entries[0].place.output, 1500);
        let loaded = decode_checkpoints(&cpt, &named, 4096).expect("checkpoints decode");
        assert_eq!(Some(&loaded), sample().checkpoints.as_deref());
        // Not for another stream length or another file.
        assert!(decode_checkpoints(&cpt, &named, 3000).is_none());
        assert!(decode_checkpoints(&cpt[..cpt.len() - 1], &named, 4096).is_none());

        let plain = LayerIndex {
            checkpoints: None,
            ..sample()
        };
        let (bytes, cpt) = encode_both(&plain, [0; 6], "sha256:ab");
        assert!(cpt.is_none());
        assert_eq!(super::decode(&bytes).expect("decodes").1, None);
        // A layer shorter than a span has checkpoints, none of them: no file either.
        let short = LayerIndex {
            checkpoints: Some(Arc::new(Checkpoints::new(Vec::new(), 4096).unwrap())),
            ..sample()
        };
        let (bytes, cpt) = encode_both(&short, [0; 6], "sha256:ab");
        assert!(cpt.is_none());
        let named = super::decode(&bytes).expect("decodes").1.expect("named");
        assert_eq!((named.count(), named.len()), (0, 0));
    }

    #[test]
    fn file_extents_outside_the_tar_are_rejected() {
        // As a buggy or hostile writer would store them, checksums and all.
        for (offset, size, ok) in [
            (u64::MAX - 10, 20, false),
            (4000, 97, false),
            (4000, 96, true),
            (4096, 0, true),
        ] {
            let mut index = sample();
            index.entries[0].offset = offset;
            index.entries[0].size = size;
            let bytes = encode(&index, [0; 6], "sha256:ab");
            assert_eq!(decode(&bytes).is_some(), ok, "{size} bytes at {offset}");
        }
    }

    /// Recomputes both checksums of an edited file, as a buggy writer would have.
    #[test]
    fn bad_sparse_maps_are_rejected() {
        fn runs(index: &mut LayerIndex) -> &mut [crate::layer::Segment] {
            index.entries[1].sparse.as_deref_mut().expect("sparse")
        }
        type Edit = fn(&mut [crate::layer::Segment]);
        let edits: [(&str, Edit); 4] = [
            ("overlapping", |r| r[1].logical = 105),
            ("past the real size", |r| r[1].logical = (1 << 40) - 5),
            ("stored past the tar", |r| r[1].len = 3000),
            ("out of order", |r| r.swap(0, 1)),
        ];
        for (what, edit) in edits {
            let mut index = sample();
            edit(runs(&mut index));
            let bytes = encode(&index, [0; 6], "sha256:ab");
            assert!(decode(&bytes).is_none(), "{what}");
        }
        // A map on a directory.
        let mut index = sample();
        index.entries[1].kind = Kind::Dir;
        assert!(decode(&encode(&index, [0; 6], "sha256:ab")).is_none());
    }

    fn reseal(bytes: &mut [u8]) {
        let head = head_end(bytes).expect("prefix");
        let sum = checksum(&bytes[..head]);
        bytes[head..head + SUM].copy_from_slice(&sum);
        let end = bytes.len() - SUM;
        let sum = checksum(&bytes[head + SUM..end]);
        bytes[end..].copy_from_slice(&sum);
    }

    #[test]
    fn lying_checkpoints_are_rejected_despite_a_good_checksum() {
        // A file from a buggy writer, with valid checksums: the places its head records are
        // range checked anyway.
        let (bytes, cpt) = encode_both(&sample(), [0; 6], "sha256:ab");
        let (cpt, named) = (
            cpt.expect("a file"),
            super::decode(&bytes).unwrap().1.unwrap(),
        );
        // The first checkpoint's `bits` byte follows its u64 input (100) in the head.
        let needle: Vec<u8> = [&100u64.to_le_bytes()[..], &[3]].concat();
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("checkpoint encoded")
            + 8;
        for bits in [8u8, 200] {
            let mut bad = bytes.clone();
            bad[at] = bits;
            reseal(&mut bad);
            assert!(super::decode(&bad).is_none(), "bits {bits} accepted");
            assert!(
                parse_head(&bad).is_none(),
                "bits {bits} accepted in the head"
            );
        }
        // A frame that is not the one its digest names; one whose digest was redone but
        // which inflates to another length than its window's.
        let mut bad = cpt.clone();
        bad[3] ^= 1;
        assert!(decode_checkpoints(&bad, &named, 4096).is_none());
        let mut entries = named.entries.to_vec();
        entries[0].place.window_len -= 1;
        let short = CptRef {
            entries: entries.into(),
            ..named.clone()
        };
        assert!(decode_checkpoints(&cpt, &short, 4096).is_none());
        assert!(
            decode_frame(
                &cpt[..named.entries[0].frame_len as usize],
                &short.entries[0]
            )
            .is_none()
        );
        let good = decode_checkpoints(&cpt, &named, 4096).expect("unchanged file decodes");
        assert_eq!(good, sample_checkpoints(3));
    }

    #[test]
    fn span_digests_must_cover_the_blob_exactly() {
        // Two digests say the blob is one to two spans long; a file claiming another length
        // (with valid checksums) is refused, so a lazy read can never go unchecked.
        let bytes = encode(&sample(), [0; 6], "sha256:ab");
        let len = (crate::blob::SPAN_BYTES + 1).to_le_bytes();
        let at = bytes
            .windows(16)
            .position(|w| w[..8] == len && w[8..] == 2u64.to_le_bytes())
            .expect("span digests encoded");
        for claim in [1u64, crate::blob::SPAN_BYTES * 2 + 1, 0] {
            let mut bad = bytes.clone();
            bad[at..at + 8].copy_from_slice(&claim.to_le_bytes());
            reseal(&mut bad);
            assert!(decode(&bad).is_none(), "blob length {claim} accepted");
        }
        let dir = tempfile::tempdir().unwrap();
        let hex = "ab".repeat(32);
        std::fs::write(dir.path().join(format!("{hex}.idx")), &bytes).unwrap();
        let cache = Cache::new(dir.path());
        // Keyed by the digest the file names, and only for the size it was made from.
        assert!(cache.span_digests(&format!("sha256:{hex}"), 1).is_none());
        let mut bytes = encode(&sample(), [0; 6], &format!("sha256:{hex}"));
        reseal(&mut bytes);
        std::fs::write(dir.path().join(format!("{hex}.idx")), &bytes).unwrap();
        let size = crate::blob::SPAN_BYTES + 1;
        assert_eq!(
            cache.span_digests(&format!("sha256:{hex}"), size),
            sample().spans
        );
        assert!(
            cache
                .span_digests(&format!("sha256:{hex}"), size + 1)
                .is_none()
        );
    }

    #[test]
    fn import_takes_only_an_index_that_fits_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let digest = format!("sha256:{}", "cd".repeat(32));
        let size = crate::blob::SPAN_BYTES + 1;
        let bytes = Cache::portable(&sample(), &digest)
            .expect("has span digests")
            .index;
        let refused = |d: &str, size, diff_id, b: &[u8]| cache.import(d, size, diff_id, b).is_err();
        // Another layer's index, another size, another diff_id, damaged bytes.
        let other = format!("sha256:{}", "ef".repeat(32));
        assert!(refused(&other, size, None, &bytes));
        assert!(refused(&digest, size + 1, None, &bytes));
        assert!(refused(&digest, size, Some("sha256:11"), &bytes));
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        assert!(refused(&digest, size, None, &bad));
        assert!(cache.span_digests(&digest, size).is_none(), "nothing saved");
        // A forged stamp never survives: the saved file names no local file.
        let forged = encode(&sample(), [1, 2, 3, 4, 5, 6], &digest);
        cache
            .import(&digest, size, Some("sha256:00"), &forged)
            .unwrap();
        let saved = std::fs::read(dir.path().join(format!("{}.idx", "cd".repeat(32)))).unwrap();
        assert_eq!(saved, bytes);
        assert_eq!(cache.span_digests(&digest, size), sample().spans);
        cache.forget(&digest).unwrap();
        assert!(cache.span_digests(&digest, size).is_none());
        cache.forget(&digest).unwrap();
    }

    #[test]
    fn the_head_alone_names_the_checkpoints_and_is_small() {
        let mut index = sample();
        index.checkpoints = Some(Arc::new(
            Checkpoints::new(
                (1..=20)
                    .map(|i| Checkpoint {
                        input: i * 100,
                        bits: 0,
                        output: i * 100_000,
                        window: crate::zran::tests::sample(i, crate::zran::WINDOW)
                            .into_boxed_slice(),
                    })
                    .collect(),
                4 << 20,
            )
            .unwrap(),
        ));
        index.tar_size = 4 << 20;
        let (bytes, cpt) = encode_both(&index, [1, 2, 3, 4, 5, 6], "sha256:ab");
        let end = head_end(&bytes).expect("prefix") + SUM;
        assert!(end < 20 * 64 + 256, "head of {end} bytes");
        assert!(cpt.expect("a file").len() > 4 * end);
        let head = parse_head(&bytes[..end]).expect("head decodes alone");
        assert_eq!(head.checkpoints.map(|c| c.count()), Some(20));
        assert_eq!(
            (head.key.as_str(), head.stamp),
            ("sha256:ab", [1, 2, 3, 4, 5, 6])
        );
        // A damaged body spoils the index but not the head.
        let mut bad = bytes.clone();
        bad[end + 3] ^= 1;
        assert!(decode(&bad).is_none());
        assert!(parse_head(&bad).is_some());
    }

    /// A layer whose blob is a temp file, keyed `sha256:` + 64 `a`s.
    fn temp_layer() -> (Layer, tempfile::NamedTempFile) {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&[0; 4096]).expect("write blob");
        let blob = crate::blob::Blob::new(Arc::new(file.reopen().expect("reopen")), 0, 4096, "b");
        let layer = Layer {
            number: 1,
            blob,
            compression: crate::blob::Compression::Gzip,
            digest: Some(format!("sha256:{}", "a".repeat(64))),
            diff_id: Some("sha256:d".into()),
            descriptor: None,
        };
        (layer, file)
    }

    #[test]
    fn checkpoints_load_lazily_and_a_file_damaged_meanwhile_gives_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(dir.path());
        let (layer, _blob) = temp_layer();
        let mut index = sample();
        index.diff_id = "sha256:d".into();
        cache.store(&layer, &index).expect("store");
        let path = cache
            .path_for(Cache::key(&layer).expect("key"))
            .expect("path");
        let cpt = cpt_path(&path);

        let good = cache.load_checkpoints(&layer).expect("fits").expect("has");
        assert!(!good.is_loaded(), "read at mount: {good:?}");
        // What the head says is known without loading; a read in the first span needs none.
        assert_eq!(good.output_len(), Some(4096));
        assert!(!good.is_empty());
        assert_eq!(good.at_or_before(1499), None);
        assert!(!good.is_loaded());
        assert_eq!(Some(&*good), index.checkpoints.as_deref());
        let loaded = cache.load(&layer, || Ok(false)).expect("loads");
        assert_eq!(loaded.checkpoints, index.checkpoints);

        // The checkpoints file damaged (a window byte), replaced by another layer's or
        // removed after the mount read the head: caught when the checkpoints are first used.
        let bytes = fs::read(&cpt).expect("read");
        let other = {
            let mut points = sample_checkpoints(3).points().to_vec();
            points[0].window.reverse();
            let mut i = sample();
            i.checkpoints = Some(Arc::new(Checkpoints::new(points, 4096).unwrap()));
            encode_both(&i, [0; 6], "sha256:ab").1.expect("a file")
        };
        let mut damaged = bytes.clone();
        damaged[5] ^= 0x10;
        for bad in [Some(damaged), Some(other), None] {
            fs::write(&cpt, &bytes).expect("restore");
            let lazy = cache.load_checkpoints(&layer).expect("fits").expect("has");
            match &bad {
                Some(b) => fs::write(&cpt, b).expect("damage"),
                None => fs::remove_file(&cpt).expect("remove"),
            }
            assert!(lazy.points().is_empty(), "{lazy:?}");
            assert_eq!(lazy.at_or_before(4000), None);
        }
        // Without its checkpoints file a local layer's index is a miss (indexed again); a
        // lazy one's would be read from its start.
        assert!(cache.load_checkpoints(&layer).is_none());
        assert!(cache.load(&layer, || Ok(true)).is_none());
        assert_eq!(cache.needs(Cache::key(&layer).unwrap(), 4096), Need::Index);

        // Replaced by the index of another copy of the blob (another stamp).
        cache.store(&layer, &index).expect("store");
        let idx = fs::read(&path).expect("read");
        let mut other = idx.clone();
        other[PREFIX + 8 + 71] ^= 1; // the stamp's first word
        reseal(&mut other);
        fs::write(&path, &other).expect("write");
        assert!(cache.load_checkpoints(&layer).is_none());

        // A layer without checkpoints says so without a lazy load.
        index.checkpoints = None;
        cache.store(&layer, &index).expect("store");
        assert!(matches!(cache.load_checkpoints(&layer), Some(None)));
    }

    #[test]
    fn expected_checkpoints_are_fetched_once_when_needed_and_checked() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(dir.path());
        let digest = format!("sha256:{}", "cd".repeat(32));
        let size = crate::blob::SPAN_BYTES + 1;
        let files = Cache::portable(&sample(), &digest).expect("portable");
        let good = files.checkpoints.clone().expect("checkpoints");
        cache
            .import(&digest, size, None, &files.index)
            .expect("import");
        assert_eq!(cache.needs(&digest, size), Need::Checkpoints);
        let (lazy_layer, _blob) = lazy_layer(&digest, size);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tampered = good.clone();
        tampered[5] ^= 1;
        // Ranges of the good file, or of none.
        let ranges = |of: Option<Vec<u8>>| -> RangeFetch {
            Arc::new(move |a, b| match &of {
                Some(f) => Ok(f[a as usize..b as usize].to_vec()),
                None => Err("registry gone".into()),
            })
        };
        // A tampered blob, a failed fetch, then the right one: only the last is kept.
        for (bytes, ok) in [
            (Ok(tampered), false),
            (Err("registry gone".to_string()), false),
            (Ok(good.clone()), true),
        ] {
            let c = calls.clone();
            let want = good.len() as u64;
            assert!(cache.expect_checkpoints(
                &digest,
                Box::new(move |len| {
                    c.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(len, want);
                    bytes
                }),
                ranges(None),
            ));
            let before = calls.load(Ordering::SeqCst);
            let lazy = cache
                .load_checkpoints(&lazy_layer)
                .expect("fits")
                .expect("has");
            // Not fetched for what the head answers, nor for a read in the first span.
            assert_eq!(lazy.output_len(), Some(4096));
            assert_eq!(lazy.at_or_before(100), None);
            assert_eq!(calls.load(Ordering::SeqCst), before);
            assert_eq!(!lazy.points().is_empty(), ok);
            assert_eq!(calls.load(Ordering::SeqCst), before + 1);
            if ok {
                assert_eq!(&*lazy, &sample_checkpoints(3));
            }
        }
        // Saved: the next load reads the file, and fetches nothing.
        assert_eq!(cache.needs(&digest, size), Need::Nothing);
        let file = dir.path().join(format!("{}.cpt", "cd".repeat(32)));
        assert_eq!(fs::read(&file).unwrap(), good);
        let never = || -> CheckpointsFetch { Box::new(|_| panic!("fetched")) };
        assert!(cache.expect_checkpoints(&digest, never(), ranges(None)));
        let lazy = cache.load_checkpoints(&lazy_layer).unwrap().unwrap();
        assert_eq!(&*lazy, &sample_checkpoints(3));

        // Before the whole file is here, a read gets the one checkpoint it needs by its
        // range (checked), and the whole set is not loaded for it; a tampered range is not
        // used (the whole set is waited for then: here, it fails, so none).
        fs::remove_file(&file).unwrap();
        for (of, ok) in [
            (Some(good.clone()), true),
            (Some(tampered_copy(&good)), false),
        ] {
            assert!(cache.expect_checkpoints(&digest, never(), ranges(of)) || !ok);
            let lazy = cache.load_checkpoints(&lazy_layer).unwrap().unwrap();
            if ok {
                let c = lazy.at_or_before(2000).expect("the first checkpoint");
                assert_eq!(c, &sample_checkpoints(3).points()[0]);
                assert!(!lazy.is_loaded());
            }
        }
        let c = calls.clone();
        assert!(cache.expect_checkpoints(
            &digest,
            Box::new(move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                Err("gone".into())
            }),
            ranges(Some(tampered_copy(&good))),
        ));
        let lazy = cache.load_checkpoints(&lazy_layer).unwrap().unwrap();
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(lazy.at_or_before(2000), None);
        assert!(lazy.is_loaded());
        assert_eq!(calls.load(Ordering::SeqCst), before + 1);

        cache.forget(&digest).unwrap();
        assert_eq!(cache.needs(&digest, size), Need::Index);
    }

    #[test]
    fn an_imported_index_is_loaded_without_decoding_it_again_unless_the_file_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(dir.path());
        let digest = format!("sha256:{}", "ef".repeat(32));
        let size = crate::blob::SPAN_BYTES + 1;
        let (layer, _blob) = lazy_layer(&digest, size);
        let files = Cache::portable(&sample(), &digest).expect("portable");
        let path = cache.path_for(&digest).unwrap();
        fs::write(cpt_path(&path), files.checkpoints.unwrap()).unwrap();
        cache.import(&digest, size, None, &files.index).unwrap();
        assert!(imported_map().contains_key(&path));
        let loaded = cache.load(&layer, || Ok(false)).expect("loads");
        assert_eq!(loaded.entries, sample().entries);
        assert!(!imported_map().contains_key(&path), "taken once");
        // Replaced after the import by another index of the layer: that one is loaded.
        cache.import(&digest, size, None, &files.index).unwrap();
        let mut other = sample();
        other.entries.truncate(1);
        let other = Cache::portable(&other, &digest).unwrap().index;
        let tmp = dir.path().join("other");
        fs::write(&tmp, &other).unwrap();
        fs::rename(&tmp, &path).unwrap();
        let loaded = cache.load(&layer, || Ok(false)).expect("loads");
        assert_eq!(loaded.entries.len(), 1);
    }

    /// `bytes` with one byte of its first frame flipped.
    fn tampered_copy(bytes: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        b[5] ^= 1;
        b
    }

    /// A lazy layer of blob `digest` (`size` bytes, never read).
    fn lazy_layer(digest: &str, size: u64) -> (Layer, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(size).expect("size");
        let spans = sample().spans.map(Arc::unwrap_or_clone).expect("spans");
        let lazy = crate::blob::Lazy::new(
            file.reopen().expect("reopen"),
            spans,
            "t",
            Box::new(|_, _| Err(io::Error::other("no registry"))),
        );
        let blob = crate::blob::Blob::new(Arc::new(file.reopen().expect("reopen")), 0, size, "b")
            .lazy(Arc::new(lazy));
        let layer = Layer {
            number: 1,
            blob,
            compression: crate::blob::Compression::Gzip,
            digest: Some(digest.to_string()),
            diff_id: None,
            descriptor: None,
        };
        (layer, file)
    }

    #[test]
    fn any_corruption_is_rejected() {
        let (bytes, cpt) = encode_both(&sample(), [0; 6], "sha256:ab");
        let (cpt, named) = (cpt.unwrap(), super::decode(&bytes).unwrap().1.unwrap());
        for i in 0..cpt.len() {
            let mut b = cpt.clone();
            b[i] ^= 0x40;
            assert!(decode_checkpoints(&b, &named, 4096).is_none(), "byte {i}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_none(), "flipped byte {i} accepted");
        }
        for n in [0, 1, 3, 4, 31, 32, bytes.len() - 1] {
            assert!(decode(&bytes[..n]).is_none(), "truncated to {n} accepted");
        }
    }
}

#[cfg(test)]
mod containment_tests {
    use super::*;

    /// Regression: a cache file is checksummed but not signed; one written by someone else must
    /// still not put an entry outside the root.
    #[test]
    fn escaping_paths_in_a_well_formed_file_are_rejected() {
        for bad in [b"../etc/passwd".as_slice(), b"/abs", b"a/../../b", b"a//b"] {
            let index = LayerIndex {
                entries: vec![Entry {
                    path: bad.to_vec(),
                    kind: Kind::File,
                    meta: Meta::default(),
                    size: 0,
                    offset: 0,
                    xattrs: Vec::new(),
                    sparse: None,
                }],
                ..LayerIndex::default()
            };
            let bytes = encode_both(&index, [0; 6], "sha256:ab").0;
            assert!(
                decode(&bytes).is_none(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
