//! The blob store under the registry source: pulled blobs by digest (`blobs/sha256/HEX` in the
//! cache directory), shared by every image, so a base layer is fetched once per host. A blob
//! enters only whole and digest-checked (temp file, then rename); the store is bounded in size
//! and evicts the least recently used blobs.
//!
//! Beside them, `partial/HEX` holds a blob a lazy mount is fetching by ranges (a sparse file of
//! the blob's size) and `partial/HEX.spans` its span map (one byte per span, see
//! [`crate::blob::Lazy`]): what one mount fetched, the next reads locally. A partial blob counts
//! towards the bound by the space it takes on disk, and is evicted like a whole one; once all
//! its spans are there, it is checked against its digest and becomes a whole blob.
//!
//! A layer read through its TOC (eStargz, zstd:chunked) keeps the compressed chunks it
//! verified in the same `partial/HEX`, and their byte ranges in `partial/HEX.ranges`
//! ([`PartialRanges`]): its chunks are checked against their digests on every read, so that map
//! only says where to look, never what to trust.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// Default bound on the store's size: `$FLATFS_BLOB_CACHE_MAX` bytes overrides it.
const DEFAULT_MAX: u64 = 20 << 30;

/// A directory of blobs named by digest.
#[derive(Debug, Clone)]
pub struct BlobStore {
    /// The directory holding `sha256/` (so a layout's `blobs` can point at it).
    root: PathBuf,
    /// Blobs are flushed to disk before they take their name; not for a temp store, which
    /// no crash can leave behind to be trusted.
    durable: bool,
}

/// One stored blob, for `flatfs cache ls`.
#[derive(Debug, Clone)]
pub struct StoredBlob {
    /// `sha256:HEX`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Last use (access time, seconds since the epoch).
    pub used: i64,
    /// A blob being fetched by ranges (`partial/HEX`): `size` is the space its spans take.
    pub partial: bool,
}

impl BlobStore {
    /// The store of a cache directory: `DIR/blobs`.
    pub fn in_cache(cache_dir: &Path) -> Self {
        BlobStore {
            root: cache_dir.join("blobs"),
            durable: true,
        }
    }

    /// A store in a temp dir that lives for one command (`--no-cache`): not flushed to disk.
    pub fn temporary(dir: &Path) -> Self {
        BlobStore {
            root: dir.join("blobs"),
            durable: false,
        }
    }

    /// The directory holding `sha256/HEX` files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a digest's blob lives, or `None` for a digest that is not `sha256:` + 64 hex
    /// digits (digests come from the network: never let one name another path).
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        Some(self.root.join("sha256").join(hex))
    }

    /// True when the blob is stored with the expected size; marks it used.
    pub fn has(&self, digest: &str, size: u64) -> bool {
        let Some(path) = self.path(digest) else {
            return false;
        };
        match fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() == size => {
                touch(&path);
                true
            }
            _ => false,
        }
    }

    /// Stores small bytes (a manifest, a config) under their digest.
    pub fn put_bytes(&self, digest: &str, bytes: &[u8]) -> io::Result<PathBuf> {
        let mut w = self.writer(digest)?;
        w.write_all(bytes)?;
        w.commit()
    }

    /// A writer for one blob: hashes what it is given and only puts it in the store when the
    /// hash is the digest ([`BlobWriter::commit`]); dropped uncommitted, it leaves nothing.
    pub fn writer(&self, digest: &str) -> io::Result<BlobWriter> {
        let path = self.path(digest).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unsupported digest {digest:?}"),
            )
        })?;
        let dir = self.root.join("sha256");
        fs::create_dir_all(&dir)?;
        let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir)?;
        Ok(BlobWriter {
            tmp,
            hasher: Sha256::new(),
            written: 0,
            digest: digest.to_string(),
            path,
            durable: self.durable,
        })
    }

    /// Every stored blob, least recently used first.
    pub fn list(&self) -> io::Result<Vec<StoredBlob>> {
        let dir = self.root.join("sha256");
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.list_partial(),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            if self.path(&digest).is_none() {
                continue;
            }
            let m = e.metadata()?;
            out.push(StoredBlob {
                digest,
                size: m.len(),
                used: m.atime(),
                partial: false,
            });
        }
        out.extend(self.list_partial()?);
        out.sort_by(|a, b| a.used.cmp(&b.used).then(a.digest.cmp(&b.digest)));
        Ok(out)
    }

    /// Removes every blob and leftover temp file; returns the bytes freed.
    pub fn clear(&self) -> io::Result<u64> {
        let mut freed = 0;
        // The TOCs lazy mounts keep (`toc::kept`).
        if let Ok(rd) = fs::read_dir(self.root.join("toc")) {
            for e in rd.flatten() {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path())?;
            }
        }
        for b in self.list_partial()? {
            self.remove_partial(&b.digest)?;
            freed += b.size;
        }
        let dir = self.root.join("sha256");
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(freed),
            Err(e) => return Err(e),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") || self.path(&format!("sha256:{name}")).is_some() {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path())?;
            }
        }
        Ok(freed)
    }

    /// Evicts least recently used blobs, other than `keep`, until the store holds at most
    /// `max` bytes. An image already open keeps its blobs' open files, so evicting under a
    /// running mount is safe.
    pub fn evict(&self, keep: &[String], max: u64) -> io::Result<u64> {
        self.remove_stale();
        let blobs = self.list()?;
        let mut total: u64 = blobs.iter().map(|b| b.size).sum();
        let mut freed = 0;
        for b in blobs {
            if total <= max {
                break;
            }
            if keep.contains(&b.digest) {
                continue;
            }
            if b.partial {
                self.remove_partial(&b.digest)?;
                log::info!(
                    "blob store: evicted the partial {} ({} bytes)",
                    b.digest,
                    b.size
                );
                total -= b.size;
                freed += b.size;
            } else if let Some(path) = self.path(&b.digest) {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                log::info!("blob store: evicted {} ({} bytes)", b.digest, b.size);
                total -= b.size;
                freed += b.size;
            }
        }
        Ok(freed)
    }
}

impl BlobStore {
    /// `partial/HEX` and `partial/HEX.spans` for a digest (`None` as for [`BlobStore::path`]).
    fn partial_paths(&self, digest: &str) -> Option<(PathBuf, PathBuf)> {
        let hex = self
            .path(digest)?
            .file_name()?
            .to_string_lossy()
            .into_owned();
        let dir = self.root.join("partial");
        Some((dir.join(&hex), dir.join(format!("{hex}.spans"))))
    }

    /// Opens (creating if need be) the partial blob `digest` of `len` bytes with its map of
    /// byte ranges, for a layer read through its TOC; marks it used.
    pub fn open_partial_ranges(&self, digest: &str, len: u64) -> io::Result<PartialRanges> {
        let (data, fresh, data_path) = self.open_partial_data(digest, len)?;
        let map_path = data_path.with_extension("ranges");
        let mut map = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&map_path)?;
        if fresh {
            map.set_len(0)?;
        }
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut map, &mut bytes)?;
        let mut ranges = RangeSet::default();
        // A torn last record (a process killed mid-append) is just not there.
        for r in bytes.chunks_exact(16) {
            let from = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
            let to = u64::from_le_bytes(r[8..].try_into().unwrap_or_default());
            if from < to && to <= len {
                ranges.insert(from, to);
            }
        }
        Ok(PartialRanges {
            data,
            len,
            map: std::sync::Mutex::new((map, ranges)),
        })
    }

    /// The data file `partial/HEX` of `len` bytes, opened for reading and writing (created if
    /// need be: then `true`), and its path; marks it used.
    fn open_partial_data(&self, digest: &str, len: u64) -> io::Result<(fs::File, bool, PathBuf)> {
        let (data_path, _) = self.partial_paths(digest).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unsupported digest {digest:?}"),
            )
        })?;
        let dir = self.root.join("partial");
        fs::create_dir_all(&dir)?;
        // A data file appears at its path only at its full length, and one of another length
        // is replaced, never truncated: another mount may be reading spans it checked in it.
        let mut tries = 0;
        let (data, fresh) = loop {
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&data_path)
            {
                Ok(f) if f.metadata()?.len() == len => break (f, false),
                Ok(_) => self.remove_partial(digest)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir)?;
            tmp.as_file().set_len(len)?;
            match fs::hard_link(tmp.path(), &data_path) {
                Ok(()) => break (tmp.into_parts().0, true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 3 => tries += 1,
                Err(e) => return Err(e),
            }
        };
        touch(&data_path);
        Ok((data, fresh, data_path))
    }

    /// Opens (creating if need be) the partial blob `digest` of `len` bytes and its span map
    /// of `spans` bytes, both for reading and writing; marks it used. A data file of another
    /// length is replaced by an empty one, and a new data file starts its map over empty (a
    /// map only speaks for the file it was written beside).
    pub fn open_partial(
        &self,
        digest: &str,
        len: u64,
        spans: u64,
    ) -> io::Result<(fs::File, fs::File, PathBuf)> {
        let (data, fresh, data_path) = self.open_partial_data(digest, len)?;
        let map_path = data_path.with_extension("spans");
        let map = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&map_path)?;
        if fresh || map.metadata()?.len() != spans {
            map.set_len(0)?;
            map.set_len(spans)?;
        }
        Ok((data, map, data_path))
    }

    /// Checks the partial blob `digest`, now complete, against its digest and moves it into
    /// the store as a whole blob (the same file: whoever has it open reads on). A mismatch
    /// removes it. Returns the whole blob's path.
    pub fn promote_partial(&self, digest: &str) -> io::Result<PathBuf> {
        self.promote_partial_with(digest, &|| {})
    }

    /// [`BlobStore::promote_partial`], running `between` after the check (a test's way into
    /// the window where another process may replace the partial file).
    fn promote_partial_with(&self, digest: &str, between: &dyn Fn()) -> io::Result<PathBuf> {
        let (data_path, _) = self.partial_paths(digest).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unsupported digest {digest:?}"),
            )
        })?;
        let to = self.path(digest).unwrap_or_default();
        let sha = self.root.join("sha256");
        fs::create_dir_all(&sha)?;
        // The file to check gets a name of its own first: eviction or `cache clear` may put
        // another mount's unfinished file at `partial/HEX` meanwhile, and only the file that
        // was hashed may become the blob.
        let held = tempfile::Builder::new()
            .prefix(".tmp-")
            .make_in(&sha, |p| fs::hard_link(&data_path, p))?;
        let mut f = fs::File::open(held.path())?;
        let mine = f.metadata()?;
        let still_mine = || {
            fs::metadata(&data_path).is_ok_and(|m| m.ino() == mine.ino() && m.dev() == mine.dev())
        };
        let mut hasher = crate::blob::HashWriter::new(io::sink());
        io::copy(&mut f, &mut hasher)?;
        let (found, _, _) = hasher.finish();
        if found != digest {
            if still_mine() {
                self.remove_partial(digest)?;
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("digest mismatch: expected {digest}, the assembled spans hash to {found}"),
            ));
        }
        if self.durable {
            f.sync_all()?;
        }
        between();
        held.persist(&to).map_err(|e| e.error)?;
        if still_mine() {
            self.remove_partial(digest)?;
        }
        Ok(to)
    }

    /// Removes a partial blob and its maps (the maps first: a map never outlives its data).
    pub fn remove_partial(&self, digest: &str) -> io::Result<()> {
        let Some((data, map)) = self.partial_paths(digest) else {
            return Ok(());
        };
        for p in [map, data.with_extension("ranges"), data] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes the partial blob `digest` of a layer read through its TOC if it keeps no byte
    /// (its ranges map is empty): what opening the layer made, when nothing read it. True if
    /// removed.
    pub fn remove_partial_if_unused(&self, digest: &str) -> io::Result<bool> {
        let Some((data, _)) = self.partial_paths(digest) else {
            return Ok(false);
        };
        match fs::metadata(data.with_extension("ranges")) {
            Ok(m) if m.len() == 0 => self.remove_partial(digest).map(|()| true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The partial blobs, sized by the space their spans (and map) take on disk.
    fn list_partial(&self) -> io::Result<Vec<StoredBlob>> {
        let rd = match fs::read_dir(self.root.join("partial")) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            if self.path(&digest).is_none() {
                continue;
            }
            let m = e.metadata()?;
            let map = ["spans", "ranges"]
                .iter()
                .map(|x| fs::metadata(e.path().with_extension(x)).map_or(0, |m| m.len()))
                .sum::<u64>();
            out.push(StoredBlob {
                digest,
                size: m.blocks() * 512 + map,
                used: m.atime(),
                partial: true,
            });
        }
        Ok(out)
    }

    /// Removes what a killed pull left behind (`.tmp-*` files, `.layout-*` directories) once
    /// it is a day old: a pull running now is never that old.
    fn remove_stale(&self) {
        let day = std::time::Duration::from_secs(24 * 3600);
        let old = |m: &fs::Metadata| {
            m.modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a > day)
        };
        for (dir, prefix) in [
            (self.root.join("sha256"), ".tmp-"),
            (self.root.clone(), ".layout-"),
        ] {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let stale = e.file_name().to_string_lossy().starts_with(prefix)
                    && e.metadata().is_ok_and(|m| old(&m));
                if stale {
                    let p = e.path();
                    // Best effort: what cannot be removed now is tried again next time.
                    let _ = if p.is_dir() {
                        fs::remove_dir_all(&p)
                    } else {
                        fs::remove_file(&p)
                    };
                }
            }
        }
    }
}

/// The store's bound: `$FLATFS_BLOB_CACHE_MAX` bytes, default 20 GiB.
pub fn max_size() -> u64 {
    crate::inspect::env_bytes("FLATFS_BLOB_CACHE_MAX", DEFAULT_MAX)
}

/// Marks a blob used: sets its access time to now (explicitly, so `noatime`/`relatime` mounts
/// do not matter), leaving the modification time alone, which the index cache's stamp includes.
fn touch(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
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
    // SAFETY: `c` is a NUL-terminated path and `times` two valid timespecs, as utimensat wants.
    // LRU order is best effort: a failure only makes the blob look older.
    unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0);
    }
}

/// A blob being written into the store (see [`BlobStore::writer`]).
pub struct BlobWriter {
    tmp: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    digest: String,
    path: PathBuf,
    durable: bool,
}

impl BlobWriter {
    /// Bytes written so far (where a resumed download starts).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Sizes the file to the blob's size up front (sparse), so that a reader opening it
    /// while it downloads sees the final length.
    pub fn preallocate(&mut self, size: u64) -> io::Result<()> {
        self.tmp.as_file().set_len(size)
    }

    /// Where the blob is being written (a temp file beside its final place, same file system).
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Checks that what was written hashes to the digest; the error says what arrived.
    pub fn check(&self) -> io::Result<()> {
        let found = crate::blob::digest_string(self.hasher.clone());
        if found != self.digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "digest mismatch: expected {}, the {} bytes received hash to {found}",
                    self.digest, self.written
                ),
            ));
        }
        Ok(())
    }

    /// Checks the digest and moves the blob into place (flushed to disk first, so a crash
    /// never leaves a torn file under a digest's name); returns its path. On a mismatch the
    /// temp file is removed.
    pub fn commit(self) -> io::Result<PathBuf> {
        self.check()?;
        if self.durable {
            self.tmp.as_file().sync_data()?;
        }
        self.tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(self.path)
    }

    /// Like [`BlobWriter::commit`], but renames first and leaves the flush to the caller
    /// (the returned file, `None` for a temp store), for a download whose reader should not
    /// wait for the disk: the blob is in the store as soon as this returns.
    pub fn commit_unflushed(self) -> io::Result<(PathBuf, Option<std::fs::File>)> {
        self.check()?;
        let durable = self.durable;
        let file = self.tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok((self.path, durable.then_some(file)))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tmp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

/// A partial blob read through a TOC: the compressed bytes of verified chunks, and the map of
/// which byte ranges of it hold them (appended 16-byte records: start, end).
#[derive(Debug)]
pub struct PartialRanges {
    data: fs::File,
    len: u64,
    map: std::sync::Mutex<(fs::File, RangeSet)>,
}

impl PartialRanges {
    /// True if every byte of `[from, to)` is stored.
    pub fn has(&self, from: u64, to: u64) -> bool {
        self.lock().1.covers(from, to)
    }

    /// Bytes `[from, to)`, if all are stored (checked against their digests by the reader).
    pub fn get(&self, from: u64, to: u64) -> Option<Vec<u8>> {
        if !self.has(from, to) {
            return None;
        }
        let mut buf = vec![0; usize::try_from(to - from).ok()?];
        std::os::unix::fs::FileExt::read_exact_at(&self.data, &mut buf, from).ok()?;
        Some(buf)
    }

    /// Stores bytes the reader verified, at `from` (best effort: a failure only means they
    /// are fetched again).
    pub fn put(&self, from: u64, bytes: &[u8]) {
        let to = from + bytes.len() as u64;
        if bytes.is_empty() || to > self.len {
            return;
        }
        // Written even where the map already has them: a reader puts only bytes it fetched,
        // which it does for stored ones only when those failed their check, so this mends them.
        if std::os::unix::fs::FileExt::write_all_at(&self.data, bytes, from).is_err()
            || self.has(from, to)
        {
            return;
        }
        let mut rec = [0u8; 16];
        rec[..8].copy_from_slice(&from.to_le_bytes());
        rec[8..].copy_from_slice(&to.to_le_bytes());
        let mut map = self.lock();
        // One write of a whole record, appended: other mounts of the blob append theirs.
        if map.0.write_all(&rec).is_ok() {
            map.1.insert(from, to);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (fs::File, RangeSet)> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::toc::ChunkStore for PartialRanges {
    fn has(&self, from: u64, to: u64) -> bool {
        PartialRanges::has(self, from, to)
    }

    fn get(&self, from: u64, to: u64) -> Option<Vec<u8>> {
        PartialRanges::get(self, from, to)
    }

    fn put(&self, from: u64, bytes: &[u8]) {
        PartialRanges::put(self, from, bytes)
    }

    fn stored_bytes(&self) -> u64 {
        self.lock().1.1
    }
}

/// Disjoint byte ranges, start → end, merged as they are added, and the bytes they cover.
#[derive(Debug, Default)]
struct RangeSet(std::collections::BTreeMap<u64, u64>, u64);

impl RangeSet {
    fn insert(&mut self, mut from: u64, mut to: u64) {
        // Swallow every range that overlaps or touches [from, to).
        while let Some((&s, &e)) = self.0.range(..=to).next_back() {
            if e < from {
                break;
            }
            self.0.remove(&s);
            self.1 -= e - s;
            from = from.min(s);
            to = to.max(e);
        }
        self.0.insert(from, to);
        self.1 += to - from;
    }

    fn covers(&self, from: u64, to: u64) -> bool {
        from >= to
            || self
                .0
                .range(..=from)
                .next_back()
                .is_some_and(|(_, &e)| e >= to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn a_blob_enters_only_with_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_cache(dir.path());
        let mut w = store.writer(ABC).unwrap();
        w.write_all(b"abd").unwrap();
        assert!(w.commit().is_err());
        assert!(!store.has(ABC, 3));
        assert!(store.list().unwrap().is_empty(), "no temp file left");
        store.put_bytes(ABC, b"abc").unwrap();
        assert!(store.has(ABC, 3));
        assert!(!store.has(ABC, 4), "a wrong size is not the blob");
        assert_eq!(store.clear().unwrap(), 3);
        assert!(!store.has(ABC, 3));
    }

    #[test]
    fn digests_that_name_other_paths_are_refused() {
        let store = BlobStore::in_cache(Path::new("/nonexistent"));
        assert!(store.path("sha256:../../etc/passwd").is_none());
        assert!(store.path(&format!("sha512:{}", "a".repeat(64))).is_none());
        assert!(store.path(&format!("sha256:{}", "A".repeat(64))).is_none());
    }

    #[test]
    fn leftovers_of_a_killed_pull_go_after_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_cache(dir.path());
        let sha = store.root().join("sha256");
        fs::create_dir_all(&sha).unwrap();
        let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(48 * 3600);
        let old_tmp = sha.join(".tmp-old");
        let new_tmp = sha.join(".tmp-new");
        let old_layout = store.root().join(".layout-old");
        fs::write(&old_tmp, b"x").unwrap();
        fs::write(&new_tmp, b"x").unwrap();
        fs::create_dir_all(old_layout.join("blobs")).unwrap();
        for p in [&old_tmp, &old_layout] {
            fs::File::open(p)
                .unwrap()
                .set_times(fs::FileTimes::new().set_modified(two_days_ago))
                .unwrap();
        }
        store.evict(&[], u64::MAX).unwrap();
        assert!(!old_tmp.exists() && !old_layout.exists());
        assert!(new_tmp.exists(), "a pull running now keeps its temp file");
    }

    #[test]
    fn eviction_removes_the_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_cache(dir.path());
        let blobs: Vec<(String, Vec<u8>)> = (0..3u8)
            .map(|i| {
                let b = vec![i; 100];
                (crate::blob::sha256_of(&b), b)
            })
            .collect();
        for (d, b) in &blobs {
            store.put_bytes(d, b).unwrap();
        }
        // Ages in order: 0 oldest, then 2, then 1.
        for (i, age) in [(0, 300), (2, 200), (1, 100)] {
            let p = store.path(&blobs[i].0).unwrap();
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
            fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_times(fs::FileTimes::new().set_accessed(t))
                .unwrap();
        }
        let freed = store.evict(&[blobs[0].0.clone()], 150).unwrap();
        assert_eq!(freed, 200);
        let left: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|b| b.digest)
            .collect();
        assert_eq!(left, vec![blobs[0].0.clone()], "kept the one in use");
    }

    #[test]
    fn a_partial_blob_is_listed_evicted_and_kept_whole_only_with_its_digest() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_cache(dir.path());
        let bytes = vec![5u8; 5000];
        let digest = crate::blob::sha256_of(&bytes);
        let (data, map, path) = store.open_partial(&digest, 5000, 1).unwrap();
        data.write_all_at(&bytes[..100], 0).unwrap();
        map.write_all_at(&[1], 0).unwrap();
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].partial && listed[0].digest == digest);
        // Reopened at another length: the map no longer speaks for it.
        let (_, map2, _) = store.open_partial(&digest, 4000, 1).unwrap();
        let mut m = [9u8];
        map2.read_exact_at(&mut m, 0).unwrap();
        assert_eq!(m, [0]);
        // Wrong bytes never become the blob.
        let (data, _, _) = store.open_partial(&digest, 5000, 1).unwrap();
        data.write_all_at(&bytes[..4999], 0).unwrap();
        assert!(store.promote_partial(&digest).is_err());
        assert!(!path.exists() && !store.has(&digest, 5000));
        let (data, _, _) = store.open_partial(&digest, 5000, 1).unwrap();
        data.write_all_at(&bytes, 0).unwrap();
        let whole = store.promote_partial(&digest).unwrap();
        assert_eq!(fs::read(&whole).unwrap(), bytes);
        assert!(store.list().unwrap().iter().all(|b| !b.partial));
        // Evicted and made again by another mount while being kept whole: the file that was
        // checked becomes the blob, not the new one, which stays partial.
        fs::remove_file(&whole).unwrap();
        let (data, _, _) = store.open_partial(&digest, 5000, 1).unwrap();
        data.write_all_at(&bytes, 0).unwrap();
        let whole = store
            .promote_partial_with(&digest, &|| {
                store.remove_partial(&digest).unwrap();
                store.open_partial(&digest, 5000, 1).unwrap();
            })
            .unwrap();
        assert_eq!(fs::read(&whole).unwrap(), bytes);
        assert!(path.exists(), "the other mount's file is left alone");
        store.remove_partial(&digest).unwrap();
        // A mount opening the file at another length replaces it: the bytes a mount checked
        // in the file it has open stay.
        let (data, _, _) = store.open_partial(&digest, 5000, 1).unwrap();
        data.write_all_at(&bytes[..100], 0).unwrap();
        let (other_len, _, _) = store.open_partial(&digest, 6000, 1).unwrap();
        assert_eq!(other_len.metadata().unwrap().len(), 6000);
        let mut back = vec![0; 100];
        data.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, bytes[..100], "another mount truncated the file");
        store.remove_partial(&digest).unwrap();
        // Evicted like a whole one.
        let other = crate::blob::sha256_of(b"other");
        let (data, _, _) = store.open_partial(&other, 1 << 20, 4).unwrap();
        data.write_all_at(&[1; 8192], 0).unwrap();
        store.evict(std::slice::from_ref(&digest), 5000).unwrap();
        assert!(store.list().unwrap().iter().all(|b| b.digest == digest));
        assert_eq!(store.clear().unwrap(), 5000);
    }

    #[test]
    fn range_sets_merge_and_cover() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert!(r.covers(10, 20) && r.covers(12, 18) && !r.covers(15, 25) && !r.covers(5, 12));
        r.insert(20, 30);
        assert_eq!(r.0.len(), 1);
        assert!(r.covers(10, 40) && !r.covers(10, 41));
        assert_eq!(r.1, 30);
        r.insert(0, 100);
        assert_eq!(r.0.iter().collect::<Vec<_>>(), [(&0, &100)]);
        assert_eq!(r.1, 100);
    }

    #[test]
    fn ranges_of_a_toc_layer_persist_and_go_with_the_partial_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_cache(dir.path());
        let d = format!("sha256:{}", "ab".repeat(32));
        let p = store.open_partial_ranges(&d, 1000).unwrap();
        assert_eq!(p.get(100, 200), None);
        p.put(100, &[7; 100]);
        p.put(990, &[1; 20]); // past the end: refused
        assert_eq!(p.get(100, 200).unwrap(), vec![7; 100]);
        assert_eq!(p.get(100, 201), None);
        drop(p);
        // Another mount reads what this one kept; a torn record is ignored.
        let map = dir
            .path()
            .join("blobs/partial")
            .join(format!("{}.ranges", "ab".repeat(32)));
        fs::OpenOptions::new()
            .append(true)
            .open(&map)
            .unwrap()
            .write_all(&[9; 7])
            .unwrap();
        let p = store.open_partial_ranges(&d, 1000).unwrap();
        assert_eq!(p.get(150, 200).unwrap(), vec![7; 50]);
        assert!(
            store
                .list()
                .unwrap()
                .iter()
                .any(|b| b.partial && b.digest == d)
        );
        store.remove_partial(&d).unwrap();
        assert!(!map.exists());
        // A data file of another length starts over, map and all.
        let p = store.open_partial_ranges(&d, 1000).unwrap();
        assert_eq!(p.get(100, 200), None);
    }
}
