//! eStargz layers (containerd/stargz-snapshotter's `docs/estargz.md`): a gzip'd tar whose
//! files' contents are gzip members of their own, ending in a TOC (`stargz.index.json`, the
//! same JSON as zstd:chunked's) and a 51-byte footer naming the TOC member's offset; the TOC
//! is checked against the `containerd.io/snapshot/stargz/toc.digest` annotation.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::zstd_chunked::{MAX_TOC, parse_estargz};
use super::{MAX_CHUNK, Toc, parse_digest};
use crate::blob::FetchRange;
use crate::compress::{ESTARGZ_FOOTER, ESTARGZ_TOC_NAME, parse_estargz_footer};

/// The annotation giving the TOC JSON's sha256.
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

/// Names at the root of an eStargz layer that are the format's, not the image's.
const SPECIAL: [&str; 3] = [
    ESTARGZ_TOC_NAME,
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// True for the TOC entry and the prefetch landmarks (as a tar or TOC names them).
pub fn is_special(name: &[u8]) -> bool {
    let mut n = name;
    while let Some(rest) = n.strip_prefix(b"./").or_else(|| n.strip_prefix(b"/")) {
        n = rest;
    }
    SPECIAL.iter().any(|s| s.as_bytes() == n)
}

/// True for `.prefetch.landmark` (as a TOC names it): the end of the files to prefetch.
pub fn is_prefetch_landmark(name: &[u8]) -> bool {
    let mut n = name;
    while let Some(rest) = n.strip_prefix(b"./").or_else(|| n.strip_prefix(b"/")) {
        n = rest;
    }
    n == SPECIAL[1].as_bytes()
}

/// True when a layer descriptor (JSON) marks the layer as eStargz.
pub fn is_estargz(descriptor: &serde_json::Value) -> bool {
    descriptor
        .get("annotations")
        .and_then(|a| a.get(TOC_DIGEST))
        .is_some()
}

/// True for an eStargz layer: its descriptor says so or, with no descriptor (docker
/// archives), its local gzip blob ends in an eStargz footer.
pub fn is_estargz_layer(layer: &crate::source::Layer) -> bool {
    if let Some(d) = &layer.descriptor {
        // A descriptor is authoritative; and a read here could fetch from a registry.
        return is_estargz(d);
    }
    let blob = &layer.blob;
    let mut footer = [0u8; ESTARGZ_FOOTER];
    layer.compression == crate::blob::Compression::Gzip
        && !blob.is_lazy()
        && blob.len() >= ESTARGZ_FOOTER as u64
        && blob
            .read_exact_at(&mut footer, blob.len() - ESTARGZ_FOOTER as u64)
            .is_ok()
        && parse_estargz_footer(&footer).is_some()
}

/// The TOC digest an eStargz layer's annotations give; `None` when they give none.
pub fn locate(annotations: &serde_json::Value) -> Option<Result<[u8; 32], String>> {
    let d = annotations.get(TOC_DIGEST)?;
    Some(
        d.as_str()
            .and_then(parse_digest)
            .ok_or_else(|| format!("bad {TOC_DIGEST} annotation {d}")),
    )
}

/// Fetches an eStargz blob's footer and TOC (two range reads), checks the TOC against `digest`
/// and builds the layer's index from it. Any error means: read the layer the ordinary way.
pub fn open(
    digest: [u8; 32],
    blob_len: u64,
    name: &str,
    fetch: Box<FetchRange>,
) -> Result<Toc, String> {
    let footer_at = blob_len
        .checked_sub(ESTARGZ_FOOTER as u64)
        .ok_or("the blob is shorter than an eStargz footer")?;
    let footer = fetch(footer_at, blob_len).map_err(|e| format!("fetching the footer: {e}"))?;
    let toc_at = parse_estargz_footer(&footer).ok_or("no eStargz footer")?;
    if toc_at >= footer_at || footer_at - toc_at > MAX_TOC {
        return Err(format!(
            "the footer puts the TOC at {toc_at}, outside the {blob_len}-byte blob or too far from its end"
        ));
    }
    let raw = fetch(toc_at, footer_at).map_err(|e| format!("fetching the TOC: {e}"))?;
    let json = toc_json(&raw)?;
    if <[u8; 32]>::from(Sha256::digest(&json)) != digest {
        return Err(format!(
            "the TOC does not match its {TOC_DIGEST} annotation"
        ));
    }
    let (index, chunks, landmark) = parse_estargz(&json, toc_at)?;
    // A landmark past the TOC, or at the start, prefetches nothing.
    let prefetch_end = landmark.filter(|&l| l > 0 && l <= toc_at);
    log::info!(
        "{name}: eStargz TOC of {} entries ({} bytes of TOC and footer)",
        index.entries.len(),
        raw.len() + ESTARGZ_FOOTER
    );
    Ok(Toc {
        format: "eStargz",
        digest,
        index,
        chunks,
        name: name.to_string(),
        fetch,
        decode: decode_member,
        cache: Default::default(),
        fetched: ((raw.len() + ESTARGZ_FOOTER) as u64).into(),
        requests: 2.into(),
        prefetch_end,
        prefetched: 0.into(),
    })
}

/// The TOC JSON from its gzip member: a tar header named `stargz.index.json`, then the JSON.
fn toc_json(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut d = flate2::read::GzDecoder::new(raw);
    let mut header = [0u8; 512];
    d.read_exact(&mut header)
        .map_err(|e| format!("decompressing the TOC: {e}"))?;
    let h = tar::Header::from_byte_slice(&header);
    if h.path_bytes().as_ref() != ESTARGZ_TOC_NAME.as_bytes() {
        return Err(format!(
            "the TOC member does not start with {ESTARGZ_TOC_NAME}"
        ));
    }
    let size = h.entry_size().map_err(|e| format!("TOC header: {e}"))?;
    if size > MAX_TOC {
        return Err(format!("a TOC of {size} bytes is too large"));
    }
    let mut json = Vec::with_capacity(size as usize);
    d.take(size)
        .read_to_end(&mut json)
        .map_err(|e| format!("decompressing the TOC: {e}"))?;
    if json.len() as u64 != size {
        return Err("the TOC is cut short".into());
    }
    Ok(json)
}

/// A chunk's gzip member, decoded to its first `size` bytes (the rest is the padding and
/// headers that follow the chunk in the tar).
pub(super) fn decode_member(raw: &[u8], size: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(size.min(MAX_CHUNK) as usize);
    flate2::read::GzDecoder::new(raw)
        .take(size)
        .read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Kind;
    use std::io::Write as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An eStargz blob (chunks of 4 KiB) of a directory, a three-chunk file, a small file, a
    /// symlink and a landmark, and its TOC digest.
    fn blob() -> (Vec<u8>, [u8; 32], Vec<u8>) {
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, ".no.prefetch.landmark", &[0xf][..])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "d/", &[][..]).unwrap();
        for (name, data) in [("d/big", &big[..]), ("d/small", b"hi\n")] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o600);
            h.set_uid(7);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "d/l", "small").unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&b.into_inner().unwrap()).unwrap();
        let (out, e) = crate::compress::write_estargz(&f, Vec::new(), 4096, 6).unwrap();
        let digest = parse_digest(&e.toc_digest).unwrap();
        (out, digest, big)
    }

    fn fetcher(blob: Vec<u8>, lie: Arc<AtomicBool>) -> Box<FetchRange> {
        Box::new(move |s: u64, e: u64| {
            let Some(b) = blob.get(s as usize..e as usize) else {
                return Err(io::Error::other("out of range"));
            };
            let mut out = b.to_vec();
            if lie.load(Ordering::Relaxed) {
                let mid = out.len() / 2;
                out[mid] ^= 1;
            }
            Ok(out)
        })
    }

    #[test]
    fn the_writers_toc_gives_entries_and_verified_chunk_reads() {
        let (blob, digest, big) = blob();
        let lie = Arc::new(AtomicBool::new(false));
        let len = blob.len() as u64;
        let toc = open(digest, len, "t", fetcher(blob, lie.clone())).expect("open");
        let idx = toc.layer_index("1".into());
        let names: Vec<_> = idx.entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(names, [&b"d"[..], b"d/big", b"d/small", b"d/l"]);
        assert_eq!(idx.entries[3].kind, Kind::Symlink(b"small".to_vec()));
        assert_eq!(
            (idx.entries[1].meta.uid, idx.entries[1].meta.mode),
            (7, 0o600)
        );
        let mut got = vec![0u8; big.len()];
        toc.read(idx.entries[1].offset, &mut got).unwrap();
        assert_eq!(got, big);
        let mut small = [0u8; 3];
        toc.read(idx.entries[2].offset, &mut small).unwrap();
        assert_eq!(&small, b"hi\n");
        // A chunk not in the cache, fetched from a lying source: an error, not bytes.
        let toc2 = {
            let (blob, digest, _) = self::blob();
            open(digest, len, "t", fetcher(blob, lie.clone())).unwrap()
        };
        lie.store(true, Ordering::Relaxed);
        let mut buf = [0u8; 10];
        let err = toc2
            .read(idx.entries[1].offset + 5000, &mut buf)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn a_toc_that_does_not_match_the_annotation_is_refused() {
        let (blob, mut digest, _) = blob();
        digest[0] ^= 1;
        let len = blob.len() as u64;
        let e = open(digest, len, "t", fetcher(blob, Default::default())).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
    }

    #[test]
    fn hostile_footers_and_toc_members_are_errors() {
        let (blob, digest, _) = blob();
        let len = blob.len() as u64;
        let with_footer = |at: u64| {
            let mut b = blob.clone();
            let n = b.len() - ESTARGZ_FOOTER;
            b[n..].copy_from_slice(&crate::compress::estargz_footer(at));
            b
        };
        for at in [len - 51, len, u64::MAX] {
            let e = open(
                digest,
                len,
                "t",
                fetcher(with_footer(at), Default::default()),
            );
            assert!(e.unwrap_err().contains("outside"), "offset {at}");
        }
        // A TOC offset in the middle of a member: not a gzip member holding the TOC.
        let e = open(
            digest,
            len,
            "t",
            fetcher(with_footer(7), Default::default()),
        );
        assert!(e.is_err());
        // A footer far from the TOC (a huge blob): refused before any big fetch.
        let huge = MAX_TOC * 4;
        let footer = crate::compress::estargz_footer(0).to_vec();
        let fetch: Box<FetchRange> = Box::new(move |s, e| {
            assert!(e - s <= ESTARGZ_FOOTER as u64, "a {}-byte fetch", e - s);
            Ok(footer.clone())
        });
        assert!(
            open(digest, huge, "t", fetch)
                .unwrap_err()
                .contains("too far")
        );
        // Too short for a footer, and no footer at all.
        assert!(open(digest, 10, "t", fetcher(vec![0; 10], Default::default())).is_err());
        let e = open(digest, 100, "t", fetcher(vec![0; 100], Default::default()));
        assert_eq!(e.unwrap_err(), "no eStargz footer");
        // A TOC member whose tar header claims a huge TOC.
        let mut h = tar::Header::new_ustar();
        h.set_path(ESTARGZ_TOC_NAME).unwrap();
        h.set_size(1 << 40);
        h.set_cksum();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(h.as_bytes()).unwrap();
        let mut b = gz.finish().unwrap();
        b.extend(crate::compress::estargz_footer(0));
        let n = b.len() as u64;
        let e = open(digest, n, "t", fetcher(b, Default::default())).unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn hostile_tocs_are_errors_not_panics() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        let reg = |name: &str, size: u64, offset: u64, chunk: u64| {
            serde_json::json!({"name": name, "type": "reg", "size": size, "offset": offset,
                "chunkSize": chunk, "chunkDigest": d, "mode": 0o100644})
        };
        let piece = |offset: u64, at: u64, size: u64| {
            serde_json::json!({"name": "f", "type": "chunk", "offset": offset,
                "chunkOffset": at, "chunkSize": size, "chunkDigest": d})
        };
        let cases = [
            // Past the TOC, or at it.
            vec![reg("f", 10, 5000, 0)],
            vec![reg("f", 10, 1000, 0)],
            // Huge files and chunks: no overflow of the virtual offsets.
            vec![reg("f", u64::MAX, 0, 0), reg("g", u64::MAX, 10, 0)],
            vec![
                reg("f", u64::MAX, 0, u64::MAX / 2),
                piece(10, u64::MAX / 2, 0),
            ],
            // Chunks that do not add up, go backwards, or belong to nothing.
            vec![reg("f", 10, 0, 4), piece(10, 4, 4)],
            vec![reg("f", 10, 0, 4), piece(10, 3, 0)],
            vec![piece(10, 0, 4)],
            // Escapes and a non-directory root.
            vec![reg("../etc/passwd", 1, 0, 0)],
            vec![reg("/", 1, 0, 0)],
        ];
        for entries in cases {
            let json = serde_json::json!({"version": 1, "entries": entries}).to_string();
            let r = parse_estargz(json.as_bytes(), 1000);
            assert!(r.is_err(), "{json}");
        }
        for json in ["", "{", "[]", r#"{"version": 2, "entries": []}"#] {
            assert!(parse_estargz(json.as_bytes(), 1000).is_err(), "{json}");
        }
    }

    #[test]
    fn special_names() {
        assert!(is_special(b"stargz.index.json"));
        assert!(is_special(b"./.prefetch.landmark"));
        assert!(!is_special(b"d/stargz.index.json"));
        assert!(!is_special(b"stargz.index.json.bak"));
    }
}
