//! TOCs kept on the host: the blob bytes a TOC layer's open fetched (eStargz: the TOC member
//! and the footer; zstd:chunked: the TOC frame) are kept in the blob store by layer digest
//! (`blobs/toc/HEX`), so the next lazy mount of the layer opens it with no request. The bytes
//! are only a stand-in for the registry: the TOC opens from them through the same code, so
//! it is checked against the digest the (digest-checked) manifest gives, exactly as a fetched
//! one; a kept file that fails anything is removed and the TOC fetched again.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::blob::FetchRange;

/// What a kept file starts with; the version of its layout.
const MAGIC: &[u8; 12] = b"flatfs-toc1\n";

/// The most bytes kept for one layer (a TOC bigger than the formats allow is not kept).
const MAX_KEPT: u64 = (super::zstd_chunked::MAX_TOC) + 4096;

/// The range requests a TOC's open made, and what the registry answered, in order.
type Fetched = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// `blobs/toc/HEX` of the cache dir for layer `digest`; `None` for a digest that names no file.
pub fn path(cache_dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| cache_dir.join("blobs/toc").join(hex))
}

/// True when the cache dir keeps a TOC for layer `digest` (of `blob_len` bytes): whether it
/// holds up is only known when it is opened.
pub fn has(cache_dir: &Path, digest: &str) -> bool {
    path(cache_dir, digest).is_some_and(|p| p.is_file())
}

/// Kept bytes `[start, start + bytes.len())` of the blob `digest` of `blob_len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Kept {
    start: u64,
    bytes: Vec<u8>,
}

impl Kept {
    /// Reads the kept file of layer `digest` (`blob_len` bytes). A file that is not one, or
    /// names another layer or length, is `Err` (to be removed); no file is `Ok(None)`.
    pub fn load(file: &Path, digest: &str, blob_len: u64) -> io::Result<Option<Kept>> {
        let raw = match std::fs::read(file) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        decode(&raw, digest, blob_len).map(Some).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "not a kept TOC of this layer")
        })
    }

    /// A fetch for the TOC's open that serves the kept bytes and nothing else (an open that
    /// wants other bytes fails, as the kept bytes then are not what was fetched), then, once
    /// `opened` is set, `remote` for the chunks.
    pub fn fetch(self, remote: Arc<FetchRange>, opened: Arc<AtomicBool>) -> Box<FetchRange> {
        let kept = Mutex::new(Some(self));
        Box::new(move |start, end| {
            if opened.load(Ordering::Relaxed) {
                // The chunks come from the registry; the kept bytes are not needed any more.
                kept.lock().unwrap_or_else(|e| e.into_inner()).take();
                return remote(start, end);
            }
            let kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            let k = kept
                .as_ref()
                .ok_or_else(|| io::Error::other("kept TOC dropped"))?;
            let from = start.checked_sub(k.start);
            let range = from.zip(end.checked_sub(k.start)).and_then(|(a, b)| {
                k.bytes
                    .get(usize::try_from(a).ok()?..usize::try_from(b).ok()?)
            });
            range.map(<[u8]>::to_vec).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bytes {start}-{end} are not in the kept TOC"),
                )
            })
        })
    }
}

/// A fetch for a TOC's first open: `remote`, with what it answers recorded in `fetched` until
/// `opened` is set (the chunk reads after are not kept).
pub fn recording(
    remote: Arc<FetchRange>,
    opened: Arc<AtomicBool>,
    fetched: Fetched,
) -> Box<FetchRange> {
    Box::new(move |start, end| {
        let bytes = remote(start, end)?;
        if !opened.load(Ordering::Relaxed) {
            fetched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((start, bytes.clone()));
        }
        Ok(bytes)
    })
}

/// A new record of an open's fetches.
pub fn record() -> Fetched {
    Arc::default()
}

/// Keeps what an open fetched (`fetched`, once its TOC verified) as layer `digest`'s kept
/// TOC, if the ranges join into one (they do for both formats: eStargz's footer follows its
/// TOC member). Atomic (temp file and rename); failing to keep only costs a fetch next time.
pub fn save(file: &Path, digest: &str, blob_len: u64, fetched: &Fetched) {
    let mut ranges = std::mem::take(&mut *fetched.lock().unwrap_or_else(|e| e.into_inner()));
    ranges.sort_by_key(|r| r.0);
    let Some((start, _)) = ranges.first() else {
        return;
    };
    let mut kept = Kept {
        start: *start,
        bytes: Vec::new(),
    };
    for (at, bytes) in ranges {
        if at != kept.start + kept.bytes.len() as u64 {
            log::debug!("{digest}: TOC ranges do not join; not kept");
            return;
        }
        kept.bytes.extend_from_slice(&bytes);
    }
    if kept.bytes.len() as u64 > MAX_KEPT {
        return;
    }
    let write = || -> io::Result<()> {
        let dir = file.parent().ok_or_else(|| io::Error::other("no parent"))?;
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
        tmp.write_all(&encode(&kept, digest, blob_len))?;
        tmp.persist(file).map_err(|e| e.error)?;
        Ok(())
    };
    match write() {
        Ok(()) => log::debug!("{digest}: TOC kept in {}", file.display()),
        Err(e) => log::warn!("cannot keep the TOC of {digest} in {}: {e}", file.display()),
    }
}

/// Removes a kept file that did not hold up.
pub fn remove(file: &Path) {
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove {}: {e}", file.display()),
    }
}

/// `MAGIC`, the layer digest and a newline, the blob length and the start (u64 LE), the bytes.
fn encode(k: &Kept, digest: &str, blob_len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(k.bytes.len() + 100);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(digest.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&blob_len.to_le_bytes());
    out.extend_from_slice(&k.start.to_le_bytes());
    out.extend_from_slice(&k.bytes);
    out
}

fn decode(raw: &[u8], digest: &str, blob_len: u64) -> Option<Kept> {
    let rest = raw.strip_prefix(MAGIC)?;
    let rest = rest.strip_prefix(digest.as_bytes())?.strip_prefix(b"\n")?;
    let (len, rest) = rest.split_first_chunk::<8>()?;
    let (start, bytes) = rest.split_first_chunk::<8>()?;
    let start = u64::from_le_bytes(*start);
    let end = start.checked_add(bytes.len() as u64)?;
    (u64::from_le_bytes(*len) == blob_len && end <= blob_len && bytes.len() as u64 <= MAX_KEPT)
        .then(|| Kept {
            start,
            bytes: bytes.to_vec(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_kept_file_names_its_layer_and_length_and_serves_only_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(dir.path(), D).unwrap();
        assert!(path(dir.path(), "sha256:../x").is_none());
        assert!(Kept::load(&file, D, 100).unwrap().is_none());
        let fetched = record();
        fetched.lock().unwrap().push((98, vec![8, 9]));
        fetched.lock().unwrap().push((90, (0..8).collect()));
        save(&file, D, 100, &fetched);
        assert!(has(dir.path(), D));
        let kept = Kept::load(&file, D, 100).unwrap().unwrap();
        assert_eq!(kept.start, 90);
        assert_eq!(kept.bytes, (0..10).collect::<Vec<u8>>());
        // Another layer's name or another length: not this layer's.
        let other = D.replace("0123", "3210");
        assert!(Kept::load(&file, &other, 100).is_err());
        assert!(Kept::load(&file, D, 101).is_err());
        // Cut short or past the blob's end.
        let raw = std::fs::read(&file).unwrap();
        std::fs::write(&file, &raw[..MAGIC.len() + 20]).unwrap();
        assert!(Kept::load(&file, D, 100).is_err());
        let mut past = raw.clone();
        let at = MAGIC.len() + D.len() + 1 + 8;
        past[at..at + 8].copy_from_slice(&95u64.to_le_bytes());
        std::fs::write(&file, &past).unwrap();
        assert!(Kept::load(&file, D, 100).is_err());
        std::fs::write(&file, &raw).unwrap();

        let remote: Arc<FetchRange> = Arc::new(|s, e| Ok(vec![0xee; (e - s) as usize]));
        let opened = Arc::new(AtomicBool::new(false));
        let fetch = Kept::load(&file, D, 100)
            .unwrap()
            .unwrap()
            .fetch(remote, opened.clone());
        assert_eq!(fetch(92, 95).unwrap(), [2, 3, 4]);
        assert_eq!(fetch(90, 100).unwrap().len(), 10);
        // Outside the kept bytes, while opening: an error, never the registry.
        assert!(fetch(89, 95).is_err());
        assert!(fetch(95, 101).is_err());
        opened.store(true, Ordering::Relaxed);
        assert_eq!(fetch(0, 2).unwrap(), [0xee, 0xee]);
    }

    #[test]
    fn ranges_that_do_not_join_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(dir.path(), D).unwrap();
        let fetched = record();
        fetched.lock().unwrap().push((10, vec![1]));
        fetched.lock().unwrap().push((20, vec![2]));
        save(&file, D, 100, &fetched);
        assert!(!file.exists());
    }
}
