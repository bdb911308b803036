//! Persistent layer-index cache: a layer's index (entries, whiteouts, digests, gzip checkpoints
//! with their 32 KiB windows, about 3% of the layer's size) saved under its
//! digest, so a second mount, export or inspect of an image, or of another image sharing base
//! layers, skips the indexing pass. Files are versioned, checksummed and written atomically;
//! a corrupt, stale or foreign file is ignored and rebuilt, never trusted.
//!
//! A file has two separately checksummed parts: a head (identity, digests, checkpoints) and a
//! body (entries). A mount whose merged tree is cached (`merged.rs`) needs only the
//! checkpoints, so it reads the head (when a read first needs the layer) and never decodes
//! the entries.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::blob::SpanDigests;
use crate::layer::{Entry, Kind, LayerIndex, Meta};
use crate::source::Layer;
use crate::zran::{Checkpoint, Checkpoints};

mod merged;

const MAGIC: &[u8; 8] = b"FLATFSIX";
/// Bump when the encoding or the meaning of a field changes; old files are then ignored.
pub(crate) const VERSION: u32 = 6;
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
        let bytes = fs::read(&path).ok()?;
        let (index, saved_stamp, saved_key) = decode(&bytes)?;
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
        } else if saved_stamp != stamp(layer) {
            // Another copy of the same digest: the index fits it only if the bytes are right.
            if !verify().unwrap_or(false) {
                return None;
            }
            let _ = self.store(layer, &index);
        }
        let mut index = index;
        index.label = layer.label();
        Some(index)
    }

    /// The checkpoints of a layer's cached index (`Some(None)` if it has none). Only a file made
    /// from exactly this blob file counts: unlike [`Cache::load`], this never re-verifies
    /// another copy.
    ///
    /// Only the head's first fields are read now, and compared with what they must be (a
    /// corrupt field can only make them differ: a miss). The checkpoints themselves, most of
    /// the head, are [`Checkpoints::lazy`]: read, checksummed and range checked when a read
    /// first needs that layer, so a warm mount of a 100-layer image does not read 100 heads.
    pub fn load_checkpoints(&self, layer: &Layer) -> Option<Option<Arc<Checkpoints>>> {
        let key = Self::key(layer)?;
        let path = self.path_for(key)?;
        let fits = |h_key: &str, h_stamp: [u64; 6], h_diff_id: &str| {
            h_key == key
                && layer.diff_id.as_deref().is_none_or(|d| d == h_diff_id)
                && (h_stamp == stamp(layer) || layer.blob.is_lazy())
        };
        let mut file = File::open(&path).ok()?;
        let mut start = [0u8; 1024];
        let n = read_up_to(&mut file, &mut start).ok()?;
        let (h_key, h_stamp, h_diff_id, has) = head_start(&start[..n])?;
        if !fits(h_key, h_stamp, h_diff_id) {
            return None;
        }
        if !has {
            return Some(None);
        }
        let (key, diff_id, want) = (key.to_owned(), layer.diff_id.clone(), stamp(layer));
        let lazy = layer.blob.is_lazy();
        let label = layer.label();
        let read = move |path: &Path| {
            // Opened again by path, whatever it holds by now: it is checked as on a load.
            let file = File::open(path).ok()?;
            let len = file.metadata().ok()?.len();
            // Streamed: the windows go straight from the file into their own buffers.
            let head = read_head(io::BufReader::with_capacity(1 << 16, file), len)?;
            let fits = head.key == key
                && diff_id.as_deref().is_none_or(|d| d == head.diff_id)
                && (head.stamp == want || lazy);
            // Checked by `read_head` (Checkpoints::new), and not lazy themselves.
            fits.then_some(head.checkpoints?).map(Arc::unwrap_or_clone)
        };
        Some(Some(Arc::new(Checkpoints::lazy(move || {
            let loaded = read(&path);
            if loaded.is_none() {
                log::warn!(
                    "layer {label}: its cached checkpoints ({}) changed or were damaged after \
                     the mount checked them; reading the layer from its start instead",
                    path.display()
                );
            }
            loaded
        }))))
    }

    /// The span digests recorded in the cached index of blob `digest` (`size` bytes), from
    /// the file's head: what a lazy registry read checks its bytes against.
    pub fn span_digests(&self, digest: &str, size: u64) -> Option<Arc<SpanDigests>> {
        let file = File::open(self.path_for(digest)?).ok()?;
        let len = file.metadata().ok()?.len();
        let head = read_head(io::BufReader::with_capacity(1 << 16, file), len)?;
        (head.key == digest)
            .then_some(head.spans)?
            .filter(|s| s.blob_len == size)
    }

    /// Saves a layer's index (best effort is the caller's choice: errors are returned).
    pub fn store(&self, layer: &Layer, index: &LayerIndex) -> io::Result<()> {
        let Some(key) = Self::key(layer) else {
            return Ok(());
        };
        let Some(path) = self.path_for(key) else {
            return Ok(());
        };
        write_atomically(&self.dir, &path, &encode(index, stamp(layer), key))
    }

    /// A layer's index as a cache file that names no local file: what an index artifact
    /// carries (`registry/artifact.rs`). `None` without span digests, which a lazy read needs.
    pub fn portable(index: &LayerIndex, digest: &str) -> Option<Vec<u8>> {
        let len = index.spans.as_ref()?.blob_len;
        Some(encode(index, lazy_stamp(len), digest))
    }

    /// Takes the index of blob `digest` (`size` bytes, uncompressed `diff_id` if known) from
    /// untrusted bytes (an index artifact): decoded with every check a cache file gets, it must
    /// be of this blob, with span digests covering exactly its size, then it is saved
    /// atomically, as if indexed here. Says why it was refused.
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
        let (index, _, key) = decode(bytes).ok_or(
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
        write_atomically(&self.dir, &path, &encode(&index, lazy_stamp(size), digest))
            .map_err(|e| format!("cannot save it in {}: {e}", self.dir.display()))
    }

    /// Removes the index of blob `digest` (one imported from an artifact that proved wrong).
    pub fn forget(&self, digest: &str) -> io::Result<()> {
        match self.path_for(digest).map(fs::remove_file) {
            Some(Err(e)) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
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
            } else if let Some(hex) = name.strip_suffix(".tree") {
                (hex, CacheKind::MergedTree)
            } else {
                continue;
            };
            if !is_hex64(hex) {
                continue;
            }
            let size = e.metadata()?.len();
            let entries = fs::read(e.path()).ok().and_then(|b| match kind {
                CacheKind::LayerIndex => decode(&b).map(|(i, _, _)| i.entries.len() as u64),
                CacheKind::MergedTree => merged::node_count(&b),
                CacheKind::Blob | CacheKind::PartialBlob | CacheKind::Content => None,
            });
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

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Writes `bytes` to `path` through a temp file in the same directory and a rename, so a reader
/// sees the old file or the new one, never part of one.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
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

fn encode(index: &LayerIndex, stamp: [u64; 6], key: &str) -> Vec<u8> {
    let windows = index.checkpoints.as_ref().map_or(0, |c| c.window_bytes());
    let mut e = Enc(Vec::with_capacity(64 + index.entries.len() * 64 + windows));
    e.0.extend_from_slice(MAGIC);
    e.u32(VERSION);
    e.u64(0); // the head's length, set below
    e.bytes(key.as_bytes());
    for s in stamp {
        e.u64(s);
    }
    e.bytes(index.diff_id.as_bytes());
    e.u64(index.tar_size);
    match &index.checkpoints {
        None => e.u8(0),
        Some(c) => {
            e.u8(1);
            e.u64(c.len() as u64);
            for p in c.points() {
                e.u64(p.input);
                e.u8(p.bits);
                e.u64(p.output);
                e.bytes(&p.window);
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

/// What a file's head says: which blob the index is of, and its checkpoints.
struct Head {
    key: String,
    stamp: [u64; 6],
    diff_id: String,
    tar_size: u64,
    checkpoints: Option<Arc<Checkpoints>>,
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

/// The identity fields at the start of an index file, before any checksum is checked: the
/// key, stamp, diff_id and whether checkpoints follow. Only fit to be compared with the values
/// they must have.
fn head_start(bytes: &[u8]) -> Option<(&str, [u64; 6], &str, bool)> {
    head_end(bytes)?;
    let mut d = Dec(bytes.get(PREFIX..)?);
    let key = d.text()?;
    let mut stamp = [0u64; 6];
    for s in &mut stamp {
        *s = d.u64()?;
    }
    let diff_id = d.text()?;
    d.u64()?; // the tar's size
    let has = match d.u8()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    Some((key, stamp, diff_id, has))
}

/// Reads and checks the head of a file of `len` bytes from its start.
fn read_head(r: impl Read, len: u64) -> Option<Head> {
    let mut r = SumReader::new(r, PREFIX);
    let prefix = r.take(PREFIX)?;
    let end = head_end(&prefix)?;
    if end as u64 + SUM as u64 > len {
        return None;
    }
    r.left = end - PREFIX;
    let key = String::from_utf8(r.bytes()?).ok()?;
    let mut stamp = [0u64; 6];
    for s in &mut stamp {
        *s = r.u64()?;
    }
    let diff_id = String::from_utf8(r.bytes()?).ok()?;
    let tar_size = r.u64()?;
    let checkpoints = match r.u8()? {
        0 => None,
        1 => {
            let n = r.count(25)?;
            let mut points = Vec::with_capacity(n);
            for _ in 0..n {
                points.push(Checkpoint {
                    input: r.u64()?,
                    bits: r.u8()?,
                    output: r.u64()?,
                    window: r.bytes()?.into_boxed_slice(),
                });
            }
            Some(points)
        }
        _ => return None,
    };
    let spans = match r.u8()? {
        0 => None,
        1 => {
            let blob_len = r.u64()?;
            let n = r.count(32)?;
            let digests = (0..n)
                .map(|_| r.array::<32>())
                .collect::<Option<Vec<_>>>()?;
            // One digest per span of the blob, or the file lies.
            Some(Arc::new(SpanDigests::new(blob_len, digests)?))
        }
        _ => return None,
    };
    r.finish()?;
    // Checked like the rest: a checkpoint that lies would make reads return wrong data.
    let checkpoints = match checkpoints {
        Some(points) => Some(Arc::new(Checkpoints::new(points, tar_size)?)),
        None => None,
    };
    Some(Head {
        key,
        stamp,
        diff_id,
        tar_size,
        checkpoints,
        spans,
    })
}

/// Fields read from a stream: at most `left` more bytes, all of them checksummed, then the
/// checksum itself. Decoding as the bytes arrive spares a file-sized buffer.
struct SumReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
    left: usize,
}

impl<R: Read> SumReader<R> {
    fn new(inner: R, left: usize) -> Self {
        SumReader {
            inner,
            crc: crc32fast::Hasher::new(),
            left,
        }
    }
    fn fill(&mut self, buf: &mut [u8]) -> Option<()> {
        self.left = self.left.checked_sub(buf.len())?;
        self.inner.read_exact(buf).ok()?;
        self.crc.update(buf);
        Some(())
    }
    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        // Bounded before allocating: a corrupt length cannot ask for more than the file holds.
        if n > self.left {
            return None;
        }
        let mut buf = vec![0u8; n];
        self.fill(&mut buf)?;
        Some(buf)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Some(buf)
    }
    /// Ends the stream: nothing may be left before the checksum, which must match.
    fn finish(mut self) -> Option<()> {
        let mut saved = [0u8; SUM];
        self.inner.read_exact(&mut saved).ok()?;
        (self.left == 0 && self.crc.finalize().to_le_bytes() == saved).then_some(())
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
    /// A count of items each at least `min` bytes long, bounded by what is left.
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n <= self.left / min.max(1)).then_some(n)
    }
}

fn decode(bytes: &[u8]) -> Option<(LayerIndex, [u64; 6], String)> {
    let head = read_head(bytes, bytes.len() as u64)?;
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
            checkpoints: head.checkpoints,
            spans: head.spans,
        },
        head.stamp,
        head.key,
    ))
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
        assert_eq!(index.checkpoints, sample().checkpoints);
        assert_eq!(index.spans, sample().spans);

        let plain = LayerIndex {
            checkpoints: None,
            ..sample()
        };
        let (index, _, _) = decode(&encode(&plain, [0; 6], "sha256:ab")).expect("decodes");
        assert_eq!(index.checkpoints, None);
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
        // A file from a buggy writer has valid checksums; its checkpoints are checked anyway.
        let bytes = encode(&sample(), [0; 6], "sha256:ab");
        let good = sample_checkpoints(3);
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
            assert!(decode(&bad).is_none(), "bits {bits} accepted");
            assert!(
                read_head(&bad[..], bad.len() as u64).is_none(),
                "bits {bits} accepted in the head"
            );
        }
        let mut same = bytes.clone();
        reseal(&mut same);
        let (index, _, _) = decode(&same).expect("unchanged file decodes");
        assert_eq!(index.checkpoints.as_deref(), Some(&good));
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
        let bytes = Cache::portable(&sample(), &digest).expect("has span digests");
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
    fn the_head_alone_gives_the_checkpoints() {
        let bytes = encode(&sample(), [1, 2, 3, 4, 5, 6], "sha256:ab");
        let end = head_end(&bytes).expect("prefix") + SUM;
        let head = read_head(&bytes[..end], end as u64).expect("head decodes alone");
        assert_eq!(head.checkpoints, sample().checkpoints);
        assert_eq!(
            (head.key.as_str(), head.stamp),
            ("sha256:ab", [1, 2, 3, 4, 5, 6])
        );
        // A damaged body spoils the index but not the head.
        let mut bad = bytes.clone();
        bad[end + 3] ^= 1;
        assert!(decode(&bad).is_none());
        assert!(read_head(&bad[..], bad.len() as u64).is_some());
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

        let good = cache.load_checkpoints(&layer).expect("fits").expect("has");
        assert!(!good.is_loaded(), "read at mount: {good:?}");
        assert_eq!(Some(&*good), index.checkpoints.as_deref());

        // Damaged after the mount checked its first fields: a window byte, then the head's
        // checksum, each caught when the checkpoints are first used.
        let bytes = fs::read(&path).expect("read");
        let end = head_end(&bytes).expect("head");
        for at in [end - 100, end + 1] {
            fs::write(&path, &bytes).expect("restore");
            let lazy = cache.load_checkpoints(&layer).expect("fits").expect("has");
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            fs::write(&path, &bad).expect("damage");
            assert!(lazy.is_empty(), "byte {at}: {lazy:?}");
            assert_eq!(lazy.at_or_before(4000), None);
        }

        // Replaced by the index of another copy of the blob (another stamp), or another layer.
        let mut other = bytes.clone();
        other[PREFIX + 8 + 71] ^= 1; // the stamp's first word
        fs::write(&path, &other).expect("write");
        assert!(cache.load_checkpoints(&layer).is_none());
        fs::write(&path, &bytes).expect("restore");
        let lazy = cache.load_checkpoints(&layer).expect("fits").expect("has");
        let mut other = bytes.clone();
        other[PREFIX + 8 + 71] ^= 1;
        reseal(&mut other);
        fs::write(&path, &other).expect("write");
        assert!(lazy.is_empty(), "another stamp was used: {lazy:?}");

        // A layer without checkpoints says so without a lazy load.
        index.checkpoints = None;
        cache.store(&layer, &index).expect("store");
        assert!(matches!(cache.load_checkpoints(&layer), Some(None)));
    }

    #[test]
    fn any_corruption_is_rejected() {
        let bytes = encode(&sample(), [0; 6], "sha256:ab");
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
            let bytes = encode(&index, [0; 6], "sha256:ab");
            assert!(
                decode(&bytes).is_none(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
