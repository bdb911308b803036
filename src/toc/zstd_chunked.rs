//! zstd:chunked layers (containers/storage): a zstd layer whose files' contents are frames
//! of their own and whose TOC (a JSON "manifest" in a frame of its own) is located by the
//! `…zstd-chunked.manifest-position` annotation (`offset:length:uncompressedLength:type`) and
//! checked by `…zstd-chunked.manifest-checksum`. Read from the containers/storage format docs
//! and from layers written by `skopeo copy --dest-compress-format zstd:chunked`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{Chunk, MAX_CHUNK, Toc, base64, parse_digest, rfc3339};
use crate::blob::FetchRange;
use crate::layer::path::{self, Class};
use crate::layer::{Entry, Kind, LayerIndex, Meta};

/// Annotation prefixes: skopeo 1.9 writes the first, later containers/storage the second.
const PREFIXES: [&str; 2] = [
    "io.containers.zstd-chunked.",
    "io.github.containers.zstd-chunked.",
];

/// Largest TOC accepted, compressed or not: a lying annotation must not cost a huge fetch.
pub(super) const MAX_TOC: u64 = 256 << 20;

/// Where a TOC is: offset, compressed and uncompressed length, sha256.
pub type Position = (u64, u64, u64, [u8; 32]);

/// Where the TOC is and its digest, from a layer descriptor's annotations; `None` when the
/// layer is not zstd:chunked. A malformed position is an error.
pub fn locate(annotations: &serde_json::Value) -> Option<Result<Position, String>> {
    let get = |key: &str| {
        PREFIXES
            .iter()
            .find_map(|p| annotations.get(format!("{p}{key}"))?.as_str())
    };
    let position = get("manifest-position")?;
    Some((|| {
        let sum = get("manifest-checksum")
            .and_then(parse_digest)
            .ok_or("no usable manifest-checksum annotation")?;
        let parts: Vec<&str> = position.split(':').collect();
        let nums: Vec<u64> = parts.iter().filter_map(|p| p.parse().ok()).collect();
        match (parts.len(), nums.as_slice()) {
            (4, [offset, len, plain, 1]) => Ok((*offset, *len, *plain, sum)),
            (4, [_, _, _, t]) => Err(format!("TOC of unknown type {t}")),
            _ => Err(format!("bad manifest-position {position:?}")),
        }
    })())
}

/// Fetches the TOC of a zstd:chunked blob of `blob_len` bytes (at `offset`, `len` bytes,
/// `plain` decompressed, digest `sum`), checks it and builds the layer's index from it. Any
/// error means: read the layer the ordinary way.
pub fn open(
    (offset, len, plain, sum): Position,
    blob_len: u64,
    name: &str,
    fetch: Box<FetchRange>,
) -> Result<Toc, String> {
    let end = offset.checked_add(len).filter(|&e| e <= blob_len);
    let Some(end) = end.filter(|_| len <= MAX_TOC && plain <= MAX_TOC) else {
        return Err(format!(
            "TOC position {offset}+{len} is outside the {blob_len}-byte blob"
        ));
    };
    let raw = fetch(offset, end).map_err(|e| format!("fetching the TOC: {e}"))?;
    if <[u8; 32]>::from(Sha256::digest(&raw)) != sum {
        return Err("the TOC does not match its manifest-checksum annotation".into());
    }
    let json = zstd::bulk::decompress(&raw, plain as usize)
        .map_err(|e| format!("decompressing the TOC: {e}"))?;
    let (index, chunks) = parse(&json, blob_len)?;
    log::info!(
        "{name}: zstd:chunked TOC of {} entries ({len} bytes of TOC)",
        index.entries.len()
    );
    Ok(Toc {
        format: "zstd:chunked",
        digest: sum,
        index,
        chunks,
        name: name.to_string(),
        fetch,
        decode: decode_frame,
        cache: Default::default(),
        fetched: (len).into(),
        requests: 1.into(),
        prefetch_end: None,
        prefetched: 0.into(),
    })
}

/// A chunk's frame(s), decoded to at most `size` bytes.
pub(super) fn decode_frame(raw: &[u8], size: u64) -> io::Result<Vec<u8>> {
    zstd::bulk::decompress(raw, size as usize)
}

// Strings borrow from the JSON where they hold no escapes: a big layer's TOC has tens of
// thousands of entries, and an allocation per string was most of its parse.
#[derive(Deserialize)]
struct Manifest<'a> {
    version: u32,
    #[serde(borrow)]
    entries: Vec<TocEntry<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct TocEntry<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    link_name: Cow<'a, str>,
    mode: u32,
    size: u64,
    uid: u64,
    gid: u64,
    #[serde(borrow)]
    modtime: Option<Cow<'a, str>>,
    dev_major: u32,
    dev_minor: u32,
    xattrs: BTreeMap<String, String>,
    #[serde(borrow)]
    digest: Cow<'a, str>,
    offset: u64,
    end_offset: u64,
    chunk_size: u64,
    chunk_offset: u64,
    #[serde(borrow)]
    chunk_digest: Cow<'a, str>,
    #[serde(borrow)]
    chunk_type: Cow<'a, str>,
}

/// The index and chunk table a TOC describes, under the same name and entry rules as a tar
/// pass; anything the TOC cannot express the way a tar would is an error (fall back).
pub fn parse(json: &[u8], blob_len: u64) -> Result<(LayerIndex, Vec<Chunk>), String> {
    let m: Manifest = serde_json::from_slice(json).map_err(|e| format!("TOC JSON: {e}"))?;
    build(m, blob_len)
}

/// An eStargz TOC (the same JSON, see `estargz.rs`) whose TOC member starts at `toc_offset`:
/// its entries say where a chunk's gzip member starts but not where it ends (where the next
/// member holding a chunk, or the TOC's, starts), nor a last chunk's size (the file's rest);
/// its prefetch landmarks are markers, not files. Also returns where `.prefetch.landmark`
/// starts, if the TOC has it: the files before it are the ones to prefetch.
pub(super) fn parse_estargz(
    json: &[u8],
    toc_offset: u64,
) -> Result<(LayerIndex, Vec<Chunk>, Option<u64>), String> {
    let mut m: Manifest = serde_json::from_slice(json).map_err(|e| format!("TOC JSON: {e}"))?;
    let landmark = m
        .entries
        .iter()
        .find(|e| super::estargz::is_prefetch_landmark(e.name.as_bytes()))
        .map(|e| e.offset);
    m.entries
        .retain(|e| !super::estargz::is_special(e.name.as_bytes()));
    let holds = |e: &TocEntry| e.kind == "chunk" || (e.kind == "reg" && e.size > 0);
    let mut starts: Vec<u64> = m
        .entries
        .iter()
        .filter(|e| holds(e))
        .map(|e| e.offset)
        .collect();
    starts.push(toc_offset);
    starts.sort_unstable();
    starts.dedup();
    let mut file_size = 0;
    for e in m.entries.iter_mut().filter(|e| holds(e)) {
        let i = starts.partition_point(|&s| s <= e.offset);
        // A start past the TOC's is caught by `build`'s range check as an empty chunk.
        e.end_offset = starts.get(i).copied().unwrap_or(e.offset);
        if e.kind == "reg" {
            file_size = e.size;
        } else if e.chunk_size == 0 {
            e.chunk_size = file_size.saturating_sub(e.chunk_offset);
        }
    }
    // A file's own entry ends where its last chunk does.
    for i in (0..m.entries.len()).rev() {
        if m.entries[i].kind == "reg" {
            let last = m.entries[i + 1..]
                .iter()
                .take_while(|e| e.kind == "chunk")
                .last()
                .map(|e| e.end_offset);
            if let Some(end) = last {
                m.entries[i].end_offset = end;
            }
        }
    }
    let (index, chunks) = build(m, toc_offset)?;
    Ok((index, chunks, landmark))
}

fn build(m: Manifest, blob_len: u64) -> Result<(LayerIndex, Vec<Chunk>), String> {
    if m.version != 1 {
        return Err(format!("TOC version {} is not supported", m.version));
    }
    let mut index = LayerIndex::default();
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut virt = 0u64;
    // The regular file whose chunks are being read: its name, start, size, and where its
    // compressed bytes end. A "chunk" entry gives where it starts, not where it ends: a
    // chunk's frame ends where the next begins, the last one where the file's do.
    let mut open_file: Option<(String, u64, u64, u64)> = None;
    let close = |open: &mut Option<(String, u64, u64, u64)>,
                 chunks: &mut Vec<Chunk>,
                 virt: u64|
     -> Result<(), String> {
        if let Some((name, start, size, end)) = open.take() {
            if virt - start != size {
                return Err(format!(
                    "{name:?}: its chunks hold {} of its {size} bytes",
                    virt - start
                ));
            }
            if let Some(last) = chunks.last_mut() {
                last.end = end;
            }
        }
        Ok(())
    };
    for e in &m.entries {
        let bad = |msg: &str| format!("TOC entry {:?}: {msg}", e.name);
        if e.kind == "chunk" {
            let Some((_, start, size, _)) = &open_file else {
                return Err(bad("a chunk with no file before it"));
            };
            if e.chunk_offset != virt - start || e.chunk_size == 0 || virt - start >= *size {
                return Err(bad("chunks out of order"));
            }
            if let Some(prev) = chunks.last_mut() {
                prev.end = e.offset;
            }
            if e.chunk_size > MAX_CHUNK {
                return Err(bad("a chunk larger than a chunk may be"));
            }
            chunks.push(chunk(e, virt, e.chunk_size, &e.chunk_digest).map_err(|m| bad(&m))?);
            virt += e.chunk_size;
            continue;
        }
        close(&mut open_file, &mut chunks, virt)?;
        let class = path::classify(e.name.as_bytes()).map_err(&bad)?;
        let path = match class {
            Class::Skip => continue,
            Class::Whiteout(p) => {
                index.whiteouts.push(p);
                continue;
            }
            Class::Opaque(p) => {
                index.opaques.push(p);
                continue;
            }
            Class::Entry(p) => p,
        };
        let kind = match e.kind.as_ref() {
            "reg" => Kind::File,
            "dir" => Kind::Dir,
            "symlink" if e.link_name.contains('\0') => {
                return Err(bad("symlink target contains a NUL byte"));
            }
            "symlink" => Kind::Symlink(e.link_name.as_bytes().to_vec()),
            "hardlink" => {
                let target = path::normalise(e.link_name.as_bytes()).map_err(&bad)?;
                if target.is_empty() {
                    return Err(bad("hardlink to the image root"));
                }
                Kind::Hardlink(target)
            }
            "char" => Kind::Char(e.dev_major, e.dev_minor),
            "block" => Kind::Block(e.dev_major, e.dev_minor),
            "fifo" => Kind::Fifo,
            other => return Err(bad(&format!("entry type {other:?} is not supported"))),
        };
        if path.is_empty() && kind != Kind::Dir {
            return Err(bad("the image root must be a directory"));
        }
        let (mtime, mtime_nsec) = match &e.modtime {
            Some(t) => rfc3339(t).ok_or_else(|| bad("bad modtime"))?,
            None => (0, 0),
        };
        let mut xattrs = Vec::with_capacity(e.xattrs.len());
        for (k, v) in &e.xattrs {
            let v = base64(v).ok_or_else(|| bad("xattr value is not base64"))?;
            xattrs.push((k.clone().into_bytes(), v));
        }
        let size = if kind == Kind::File { e.size } else { 0 };
        if size > 0 {
            // The first chunk is described by the file's own entry: all of it unless a
            // chunkSize says the file goes on in "chunk" entries.
            let first = if e.chunk_size > 0 { e.chunk_size } else { size };
            let digest = if e.chunk_digest.is_empty() {
                &e.digest
            } else {
                &e.chunk_digest
            };
            // Checked here, not only at the end: the virtual offsets must not overflow first.
            if first > MAX_CHUNK {
                return Err(bad("a chunk larger than a chunk may be"));
            }
            if first > size {
                return Err(bad("a chunk larger than its file"));
            }
            chunks.push(chunk(e, virt, first, digest).map_err(|m| bad(&m))?);
            open_file = Some((e.name.to_string(), virt, size, e.end_offset));
        }
        index.entries.push(Entry {
            path,
            kind,
            meta: Meta {
                mode: e.mode & 0o7777,
                uid: e.uid,
                gid: e.gid,
                mtime,
                mtime_nsec,
            },
            size,
            offset: virt,
            xattrs,
            sparse: None,
        });
        virt += size.min(if e.chunk_size > 0 { e.chunk_size } else { size });
    }
    close(&mut open_file, &mut chunks, virt)?;
    if let Some(c) = chunks
        .iter()
        .find(|c| c.start >= c.end || c.end > blob_len || c.size > MAX_CHUNK)
    {
        return Err(format!(
            "TOC: a chunk at {}-{} is not in the {blob_len}-byte blob",
            c.start, c.end
        ));
    }
    index.tar_size = virt;
    Ok((index, chunks))
}

/// A chunk of `size` bytes at `virt`, its compressed bytes from `e.offset` (their end is
/// checked once known).
fn chunk(e: &TocEntry, virt: u64, size: u64, digest: &str) -> Result<Chunk, String> {
    if !matches!(e.chunk_type.as_ref(), "" | "data") {
        return Err(format!("chunk type {:?} is not supported", e.chunk_type));
    }
    let digest = parse_digest(digest).ok_or("no usable chunk digest")?;
    Ok(Chunk {
        virt,
        size,
        start: e.offset,
        end: e.end_offset,
        digest,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    fn hex(d: &[u8]) -> String {
        format!(
            "sha256:{}",
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }

    /// A zstd:chunked-style blob: one frame per file, then the TOC frame; returns the blob
    /// and its annotations.
    pub(crate) fn build(
        files: &[(&str, &[u8])],
        extra: &[serde_json::Value],
    ) -> (Vec<u8>, serde_json::Value) {
        let mut blob = Vec::new();
        let mut entries = vec![
            serde_json::json!({"type": "dir", "name": "d/", "mode": 0o755,
            "modtime": "2023-11-14T22:13:20Z"}),
        ];
        for (name, data) in files {
            let start = blob.len();
            blob.extend(zstd::encode_all(*data, 3).unwrap());
            entries.push(
                serde_json::json!({"type": "reg", "name": name, "mode": 0o100644,
                "size": data.len(), "uid": 7, "modtime": "2023-11-14T22:13:20.5Z",
                "digest": hex(&Sha256::digest(data)), "offset": start, "endOffset": blob.len(),
                "xattrs": {"user.a": "aGVsbG8="}}),
            );
        }
        entries.extend(extra.iter().cloned());
        let json = serde_json::json!({"version": 1, "entries": entries}).to_string();
        let toc = zstd::encode_all(json.as_bytes(), 3).unwrap();
        let at = blob.len();
        blob.extend(&toc);
        blob.extend([0u8; 40]);
        let ann = serde_json::json!({
            "io.containers.zstd-chunked.manifest-position": format!("{at}:{}:{}:1", toc.len(), json.len()),
            "io.containers.zstd-chunked.manifest-checksum": hex(&Sha256::digest(&toc)),
        });
        (blob, ann)
    }

    type Asked = Arc<Mutex<Vec<(u64, u64)>>>;

    fn fetcher(blob: Vec<u8>, lie: Arc<AtomicBool>) -> (Box<FetchRange>, Asked) {
        let asked: Asked = Default::default();
        let a = asked.clone();
        let f = Box::new(move |s: u64, e: u64| {
            a.lock().unwrap().push((s, e));
            let mut out = blob[s as usize..e as usize].to_vec();
            if lie.load(Ordering::Relaxed) {
                let mid = out.len() / 2;
                out[mid] ^= 1;
            }
            Ok(out)
        });
        (f, asked)
    }

    #[test]
    fn a_toc_gives_entries_and_verified_chunk_reads() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let files: [(&str, &[u8]); 3] = [("d/a", b"hello"), ("d/big", &big), ("d/.wh.gone", b"")];
        let (blob, ann) = build(
            &files,
            &[serde_json::json!({"type": "symlink", "name": "d/l",
            "linkName": "a"})],
        );
        let lie = Arc::new(AtomicBool::new(false));
        let (fetch, asked) = fetcher(blob.clone(), lie.clone());
        let toc = open_on(&blob, &ann, fetch);
        let idx = toc.layer_index("1".into());
        let names: Vec<&[u8]> = idx.entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(names, [&b"d"[..], b"d/a", b"d/big", b"d/l"]);
        assert_eq!(idx.whiteouts, [b"d/gone".to_vec()]);
        let a = &idx.entries[1];
        assert_eq!((a.size, a.meta.mode, a.meta.uid), (5, 0o644, 7));
        assert_eq!(
            (a.meta.mtime, a.meta.mtime_nsec),
            (1_700_000_000, 500_000_000)
        );
        assert_eq!(a.xattrs, [(b"user.a".to_vec(), b"hello".to_vec())]);
        assert_eq!(idx.entries[3].kind, Kind::Symlink(b"a".to_vec()));
        let b = &idx.entries[2];
        let mut buf = vec![0; 1000];
        toc.read(b.offset + 299_000, &mut buf).unwrap();
        assert_eq!(buf, big[299_000..]);
        // Across the two files' chunks.
        let mut buf = vec![0; 7];
        toc.read(a.offset, &mut buf).unwrap();
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(&buf[5..], &big[..2]);
        // The TOC, then each chunk once (the big one is cached).
        assert_eq!(asked.lock().unwrap().len(), 3);
        // A lying server: the chunk does not verify, and nothing wrong is served or kept.
        let (fetch, _) = fetcher(blob.clone(), lie.clone());
        let toc = open_on(&blob, &ann, fetch);
        lie.store(true, Ordering::Relaxed);
        let e = toc.read(b.offset, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        lie.store(false, Ordering::Relaxed);
        toc.read(b.offset, &mut buf).unwrap();
        assert_eq!(buf, big[..7]);
    }

    #[test]
    fn a_file_in_chunk_entries_reads_across_them() {
        // As containers/storage writes a big file: its entry describes the first chunk,
        // "chunk" entries the rest, each its own frame, ending where the next one starts.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 256) as u8).collect();
        let cuts = [0, 30_000, 30_001, 100_000];
        let mut blob = b"junk".to_vec();
        let mut entries = Vec::new();
        let file_start = blob.len();
        for w in cuts.windows(2) {
            let piece = &data[w[0]..w[1]];
            let start = blob.len();
            blob.extend(zstd::encode_all(piece, 3).unwrap());
            let d = hex(&Sha256::digest(piece));
            entries.push(if w[0] == 0 {
                serde_json::json!({"type": "reg", "name": "c", "size": data.len(),
                    "digest": hex(&Sha256::digest(&data)), "offset": start,
                    "chunkSize": piece.len(), "chunkDigest": d})
            } else {
                serde_json::json!({"type": "chunk", "name": "c", "offset": start,
                    "chunkOffset": w[0], "chunkSize": piece.len(), "chunkDigest": d})
            });
        }
        entries[0]["endOffset"] = blob.len().into();
        assert!(file_start > 0);
        let json = serde_json::json!({"version": 1, "entries": entries}).to_string();
        let (idx, chunks) = parse(json.as_bytes(), blob.len() as u64).unwrap();
        assert_eq!(idx.entries[0].size, 100_000);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(chunks[2].end, blob.len() as u64);
        let (fetch, asked) = fetcher(blob, Default::default());
        // A landmark (eStargz's; any TOC reads the same way) after the first two chunks.
        let landmark = chunks[2].start;
        let toc = Toc {
            format: "zstd:chunked",
            digest: [0; 32],
            index: idx,
            chunks,
            name: "t".into(),
            fetch,
            decode: decode_frame,
            cache: Default::default(),
            fetched: 0.into(),
            requests: 0.into(),
            prefetch_end: Some(landmark),
            prefetched: 0.into(),
        };
        // The prefetch fetches the chunks before it in one request, checked; a read of
        // them then fetches nothing, and one after it fetches its own chunk.
        toc.prefetch_landmark();
        assert_eq!(asked.lock().unwrap().len(), 1);
        assert_eq!(toc.prefetched(), toc.landmark_bytes());
        let mut buf = vec![0; 30_001];
        toc.read(0, &mut buf).unwrap();
        assert!(buf == data[..30_001]);
        assert_eq!(asked.lock().unwrap().len(), 1);
        let mut buf = vec![0; 5000];
        toc.read(28_000, &mut buf).unwrap();
        assert!(buf == data[28_000..33_000]);
        assert_eq!(asked.lock().unwrap().len(), 2);
        assert_eq!(toc.stats().1, 2);
        // A chunk offset that skips bytes is refused.
        let bad = json.replace("\"chunkOffset\":30001", "\"chunkOffset\":30002");
        assert_ne!(bad, json);
        assert!(parse(bad.as_bytes(), 1 << 20).is_err());
    }

    #[test]
    fn a_tampered_or_unusable_toc_is_refused() {
        let (blob, ann) = build(&[("d/a", b"x")], &[]);
        let (at, len, ..) = locate(&ann).unwrap().unwrap();
        let mut bad = blob.clone();
        bad[(at + len / 2) as usize] ^= 1;
        let (fetch, _) = fetcher(bad, Default::default());
        let e = open(
            locate(&ann).unwrap().unwrap(),
            blob.len() as u64,
            "t",
            fetch,
        )
        .unwrap_err();
        assert!(e.contains("manifest-checksum"), "{e}");
        for extra in [
            serde_json::json!({"type": "reg", "name": "../out", "size": 0}),
            serde_json::json!({"type": "whatever", "name": "x"}),
            serde_json::json!({"type": "chunk", "name": "x", "chunkSize": 3}),
            serde_json::json!({"type": "reg", "name": "z", "size": 9, "offset": 0,
                "endOffset": 1u64 << 40, "digest": hex(&[0; 32])}),
        ] {
            let (blob, ann) = build(&[("d/a", b"x")], std::slice::from_ref(&extra));
            let (fetch, _) = fetcher(blob.clone(), Default::default());
            let r = open(
                locate(&ann).unwrap().unwrap(),
                blob.len() as u64,
                "t",
                fetch,
            );
            assert!(r.is_err(), "{extra}");
        }
        let ann = serde_json::json!({"io.containers.zstd-chunked.manifest-position": "1:2:3"});
        assert!(locate(&ann).unwrap().is_err());
        assert!(locate(&serde_json::json!({})).is_none());
    }

    /// The TOC of layer `blob` (annotations `ann`), its chunks fetched by `fetch`.
    fn open_on(blob: &[u8], ann: &serde_json::Value, fetch: Box<FetchRange>) -> Toc {
        open(locate(ann).unwrap().unwrap(), blob.len() as u64, "t", fetch).unwrap()
    }

    /// A layer of files `d/f000`, `d/f001`, … holding `bodies`, in that order.
    fn build_numbered(bodies: &[Vec<u8>]) -> (Vec<u8>, serde_json::Value) {
        let names: Vec<String> = (0..bodies.len()).map(|i| format!("d/f{i:03}")).collect();
        let files: Vec<(&str, &[u8])> = names
            .iter()
            .zip(bodies)
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        build(&files, &[])
    }

    #[test]
    fn reads_in_order_fetch_chunks_ahead_and_a_lone_read_only_its_own() {
        // 200 small files, each its own frame, read in TOC order: far fewer requests than
        // files, every byte checked. Then a lone read of one file on a fresh TOC: one request,
        // exactly its frame.
        let bodies: Vec<Vec<u8>> = (0..200u32)
            .map(|i| {
                format!("file {i} ")
                    .repeat(50 + i as usize % 7)
                    .into_bytes()
            })
            .collect();
        let (blob, ann) = build_numbered(&bodies);
        let open_toc = || {
            let (fetch, asked) = fetcher(blob.clone(), Default::default());
            let at = locate(&ann).unwrap().unwrap();
            (open(at, blob.len() as u64, "t", fetch).unwrap(), asked)
        };
        let (toc, asked) = open_toc();
        let toc_requests = asked.lock().unwrap().len();
        let index = toc.layer_index("t".into());
        let regular: Vec<_> = index.entries.iter().filter(|e| e.size > 0).collect();
        assert_eq!(regular.len(), 200);
        for (e, body) in regular.iter().zip(&bodies) {
            let mut buf = vec![0; e.size as usize];
            toc.read(e.offset, &mut buf).unwrap();
            assert!(buf == *body, "{}", String::from_utf8_lossy(&e.path));
        }
        let reads = asked.lock().unwrap().len() - toc_requests;
        assert!(reads <= 10, "{reads} requests for 200 files read in order");

        let (toc, asked) = open_toc();
        let e = regular[117];
        let mut buf = vec![0; e.size as usize];
        toc.read(e.offset, &mut buf).unwrap();
        assert!(buf == bodies[117]);
        let asked = asked.lock().unwrap();
        assert_eq!(asked.len(), toc_requests + 1);
        let (s, t) = asked[asked.len() - 1];
        let c = toc.chunks.iter().find(|c| c.virt == e.offset).unwrap();
        assert_eq!(
            (s, t),
            (c.start, c.end),
            "a lone read fetches only its frame"
        );
    }

    #[test]
    fn readers_wanting_a_chunk_being_fetched_wait_for_it_instead_of_fetching_it_again() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (blob, ann) = build(&[("d/big", &big)], &[]);
        let (inner, asked) = fetcher(blob.clone(), Default::default());
        // A slow registry: the second reader arrives while the first one's fetch is out.
        let fetch = Box::new(move |s: u64, e: u64| {
            std::thread::sleep(std::time::Duration::from_millis(200));
            inner(s, e)
        });
        let toc = open_on(&blob, &ann, fetch);
        let before = asked.lock().unwrap().len();
        let offset = toc.layer_index("t".into()).entries[0].offset;
        std::thread::scope(|scope| {
            let readers: Vec<_> = [0u64, 4096, 8192]
                .into_iter()
                .map(|at| {
                    let (toc, big) = (&toc, &big);
                    scope.spawn(move || {
                        let mut buf = vec![0; 4096];
                        toc.read(offset + at, &mut buf).unwrap();
                        assert!(buf == big[at as usize..at as usize + 4096]);
                    })
                })
                .collect();
            for r in readers {
                r.join().unwrap();
            }
        });
        assert_eq!(
            asked.lock().unwrap().len() - before,
            1,
            "one request for one chunk"
        );
    }

    #[test]
    fn a_reader_in_order_finds_the_next_run_fetched_in_the_background() {
        // 48 files of 128 KiB of noise (incompressible: 6 MiB of frames), read in order.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let bodies: Vec<Vec<u8>> = (0..48)
            .map(|_| {
                (0..128 << 10)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect();
        let (blob, ann) = build_numbered(&bodies);
        let (inner, asked) = fetcher(blob.clone(), Default::default());
        let behind = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let b = behind.clone();
        let fetch = Box::new(move |s: u64, e: u64| {
            if std::thread::current().name() == Some("toc-read-ahead") {
                b.fetch_add(1, Ordering::Relaxed);
            }
            inner(s, e)
        });
        let at = locate(&ann).unwrap().unwrap();
        let toc = Arc::new(open(at, blob.len() as u64, "t", fetch).unwrap());
        toc.read_ahead_in_background();
        let before = asked.lock().unwrap().len();
        let index = toc.layer_index("t".into());
        let regular: Vec<_> = index.entries.iter().filter(|e| e.size > 0).collect();
        let read = |k: usize| {
            let mut buf = vec![0; regular[k].size as usize];
            toc.read(regular[k].offset, &mut buf).unwrap();
            assert!(buf == bodies[k], "file {k}");
        };
        for k in 0..regular.len() {
            read(k);
        }
        // 128 KiB doubling to 2 MiB, then a run fetched ahead of each the reader fetches.
        let behind = behind.load(Ordering::Relaxed);
        assert!(behind >= 1, "nothing was fetched ahead");
        // Every byte once: what was fetched ahead was used, not fetched again.
        let asked = asked.lock().unwrap();
        let fetched: u64 = asked[before..].iter().map(|(s, e)| e - s).sum();
        let frames: u64 = toc.chunks.iter().map(|c| c.end - c.start).sum();
        assert!(
            fetched <= frames + 48 * crate::toc::GAP,
            "{fetched} bytes fetched for {frames}"
        );
        drop(asked);
        let weak = Arc::downgrade(&toc);
        drop(toc);
        // The thread holds the TOC only while it fetches, then lets it go.
        let start = std::time::Instant::now();
        while weak.strong_count() > 0 {
            assert!(
                start.elapsed().as_secs() < 10,
                "the read-ahead thread keeps the TOC"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_chunk_whose_fetch_failed_fails_again_at_once_for_a_moment() {
        let (blob, ann) = build_numbered(&[b"one".to_vec(), b"two".to_vec()]);
        let (inner, asked) = fetcher(blob.clone(), Default::default());
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = down.clone();
        let fetch = Box::new(move |s: u64, e: u64| {
            if d.load(Ordering::Relaxed) {
                asked.lock().unwrap().push((s, e));
                return Err(io::Error::other("registry away"));
            }
            inner(s, e)
        });
        let toc = open_on(&blob, &ann, fetch);
        let e = toc.layer_index("t".into()).entries[1].clone();
        assert_eq!(&*e.path, b"d/f000");
        let (requests, _) = (toc.stats().1, ());
        down.store(true, Ordering::Relaxed);
        let mut buf = vec![0; 3];
        assert!(toc.read(e.offset, &mut buf).is_err());
        // The kernel's retry of the failed read: answered at once, no request.
        let again = toc.read(e.offset, &mut buf).unwrap_err();
        assert!(
            again.to_string().contains("not asking again yet"),
            "{again}"
        );
        assert_eq!(toc.stats().1, requests + 1);
        // The registry is back, and after the moment the read asks again.
        down.store(false, Ordering::Relaxed);
        std::thread::sleep(crate::blob::FAIL_FAST + std::time::Duration::from_millis(100));
        toc.read(e.offset, &mut buf).unwrap();
        assert_eq!(buf, b"one");
    }
}
