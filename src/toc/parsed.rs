//! Parsed TOCs kept on the host: what a verified TOC became (the layer index at virtual
//! offsets, the chunk table, the prefetch landmark) is written to `blobs/toc/HEX.parsed`, HEX
//! being the TOC's digest, so the next lazy mount of the layer skips reading, inflating,
//! hashing and parsing the kept TOC. Keyed by the TOC digest, never the layer digest: these
//! offsets are virtual and must not pass for the tar offsets of a full download's `.idx`.
//!
//! The cache dir is trusted as the index cache is: the file is checksummed like an `.idx`
//! (torn or damaged files are told apart, not forged ones), names its format, TOC digest and
//! blob length, and every offset is range checked; the chunks read through it are still
//! checked against their digests. A file that fails anything is ignored (and rewritten from
//! the kept or fetched TOC, which is verified again).

use std::path::{Path, PathBuf};

use super::{Chunk, MAX_CHUNK, Toc};
use crate::blob::FetchRange;
use crate::layer::LayerIndex;

/// What a parsed file starts with; the version of its layout.
const MAGIC: &[u8; 16] = b"flatfs-parsedtc1";

/// Bytes of one chunk record: virt, size, start, end, digest.
const CHUNK: usize = 8 * 4 + 32;

/// `blobs/toc/HEX.parsed` of the cache dir for the TOC of digest `toc`.
pub fn path(cache_dir: &Path, toc: &[u8; 32]) -> PathBuf {
    let hex: String = toc.iter().map(|b| format!("{b:02x}")).collect();
    cache_dir.join("blobs/toc").join(format!("{hex}.parsed"))
}

/// What the file's index is of: a mismatch means another TOC, format or blob.
fn key(format: &str, toc: &[u8; 32], blob_len: u64) -> String {
    let hex: String = toc.iter().map(|b| format!("{b:02x}")).collect();
    format!("toc {format} sha256:{hex} {blob_len}")
}

/// Writes `toc` (verified, of a `blob_len`-byte blob) to `file`, atomically; failing only costs
/// a parse next time.
pub fn save(file: &Path, toc: &Toc, blob_len: u64) {
    let bytes = encode(toc, blob_len);
    let write = || -> std::io::Result<()> {
        let dir = file
            .parent()
            .ok_or_else(|| std::io::Error::other("no parent"))?;
        crate::cache::write_atomically(dir, file, &bytes)
    };
    match write() {
        Ok(()) => log::debug!("{}: parsed TOC kept in {}", toc.name, file.display()),
        Err(e) => log::warn!("cannot keep the parsed TOC in {}: {e}", file.display()),
    }
}

/// The TOC in `file` if it is the parsed `format` TOC of digest `digest` for a blob of
/// `blob_len` bytes and holds up; its chunks are fetched with `fetch`. `None` otherwise
/// (including no file).
pub fn load(
    file: &Path,
    format: &'static str,
    digest: [u8; 32],
    blob_len: u64,
    name: &str,
    fetch: Box<FetchRange>,
) -> Option<Toc> {
    let raw = std::fs::read(file).ok()?;
    let decoder = match format {
        "eStargz" => super::estargz::decode_member,
        "zstd:chunked" => super::zstd_chunked::decode_frame,
        _ => return None,
    };
    let Some((index, chunks, prefetch_end)) = decode(&raw, format, &digest, blob_len) else {
        log::warn!(
            "{name}: the parsed TOC in {} does not hold; reading the TOC again",
            file.display()
        );
        return None;
    };
    Some(Toc {
        format,
        digest,
        index,
        chunks,
        name: name.to_string(),
        fetch,
        decode: decoder,
        cache: Default::default(),
        fetched: 0.into(),
        requests: 0.into(),
        prefetch_end,
        prefetched: 0.into(),
    })
}

/// `MAGIC`, the index part's length (u64 LE) and the index part (an unstamped index file),
/// then the chunks part: the landmark (0 or 1 and a u64), the chunk count and records, and
/// the checksum of the chunks part.
fn encode(toc: &Toc, blob_len: u64) -> Vec<u8> {
    let idx = crate::cache::encode_unstamped(&toc.index, &key(toc.format, &toc.digest, blob_len));
    let mut out = Vec::with_capacity(idx.len() + toc.chunks.len() * CHUNK + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(idx.len() as u64).to_le_bytes());
    out.extend_from_slice(&idx);
    let part = out.len();
    out.push(u8::from(toc.prefetch_end.is_some()));
    out.extend_from_slice(&toc.prefetch_end.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&(toc.chunks.len() as u64).to_le_bytes());
    for c in &toc.chunks {
        for v in [c.virt, c.size, c.start, c.end] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&c.digest);
    }
    let sum = crate::cache::checksum(&out[part..]);
    out.extend_from_slice(&sum);
    out
}

type Decoded = (LayerIndex, Vec<Chunk>, Option<u64>);

fn decode(raw: &[u8], format: &str, digest: &[u8; 32], blob_len: u64) -> Option<Decoded> {
    let rest = raw.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
    let (idx, rest) = (rest.get(..len)?, rest.get(len..)?);
    let (part, sum) = rest.split_at(rest.len().checked_sub(4)?);
    if crate::cache::checksum(part) != sum {
        return None;
    }
    let index = crate::cache::decode_unstamped(idx, &key(format, digest, blob_len))?;
    let u64_at = |b: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let landmark = match *part.first()? {
        0 => None,
        1 => Some(u64_at(part, 1)?),
        _ => return None,
    };
    let n = usize::try_from(u64_at(part, 9)?).ok()?;
    let records = part.get(17..)?;
    if records.len() != n.checked_mul(CHUNK)? {
        return None;
    }
    let mut chunks = Vec::with_capacity(n);
    let mut virt_end = 0u64;
    for r in records.chunks_exact(CHUNK) {
        let c = Chunk {
            virt: u64_at(r, 0)?,
            size: u64_at(r, 8)?,
            start: u64_at(r, 16)?,
            end: u64_at(r, 24)?,
            digest: r[32..].try_into().ok()?,
        };
        // What the parsers guarantee and the reads rely on: chunks in virtual order, not
        // overlapping, inside the virtual stream and the blob, none too big to decode.
        let end = c.virt.checked_add(c.size)?;
        let ok = c.virt >= virt_end
            && end <= index.tar_size
            && c.start < c.end
            && c.end <= blob_len
            && c.size <= MAX_CHUNK;
        if !ok {
            return None;
        }
        virt_end = end;
        chunks.push(c);
    }
    Some((index, chunks, landmark.filter(|&l| l <= blob_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Toc {
        let mut index = LayerIndex::default();
        index.entries.push(crate::layer::Entry {
            path: b"a".to_vec(),
            kind: crate::layer::Kind::File,
            meta: Default::default(),
            size: 10,
            offset: 0,
            xattrs: Vec::new(),
            sparse: None,
        });
        index.tar_size = 10;
        Toc {
            format: "eStargz",
            digest: [7; 32],
            index,
            chunks: vec![
                Chunk {
                    virt: 0,
                    size: 4,
                    start: 0,
                    end: 30,
                    digest: [1; 32],
                },
                Chunk {
                    virt: 4,
                    size: 6,
                    start: 30,
                    end: 60,
                    digest: [2; 32],
                },
            ],
            name: "x".into(),
            fetch: Box::new(|_, _| Ok(Vec::new())),
            decode: super::super::estargz::decode_member,
            cache: Default::default(),
            fetched: 0.into(),
            requests: 0.into(),
            prefetch_end: Some(30),
            prefetched: 0.into(),
        }
    }

    #[test]
    fn a_parsed_toc_round_trips_and_names_its_toc_format_and_blob() {
        let toc = sample();
        let raw = encode(&toc, 100);
        let (index, chunks, landmark) = decode(&raw, "eStargz", &[7; 32], 100).unwrap();
        assert_eq!(index.entries, toc.index.entries);
        assert_eq!(index.tar_size, 10);
        assert_eq!(chunks, toc.chunks);
        assert_eq!(landmark, Some(30));
        assert!(decode(&raw, "zstd:chunked", &[7; 32], 100).is_none());
        assert!(decode(&raw, "eStargz", &[8; 32], 100).is_none());
        assert!(decode(&raw, "eStargz", &[7; 32], 101).is_none());
        // A chunk past the blob's end.
        assert!(decode(&raw, "eStargz", &[7; 32], 59).is_none());
    }

    #[test]
    fn any_flipped_or_missing_byte_is_refused() {
        let raw = encode(&sample(), 100);
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad, "eStargz", &[7; 32], 100).is_none(), "byte {i}");
        }
        assert!(decode(&raw[..raw.len() - 1], "eStargz", &[7; 32], 100).is_none());
    }
}
