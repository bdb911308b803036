//! One pass over a (decompressed) layer tar → [`LayerIndex`]; digests are checked on the way.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use super::path::{self, Class};
use super::sparse::{self, Segment};
use super::tar::TarReader;
use sha2::{Digest as _, Sha256};

use crate::blob::{Blob, Compression, Decoder, HashReader, digest_string};
use crate::error::{Error, Result};
use crate::pipe::{CHUNK, DEPTH, PipeReader, PipeWriter, drain_into, is_hangup, joined, pipe};
use crate::source::Layer;
use crate::zran::Checkpoint;

/// Ownership, permissions and times of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits incl. setuid/setgid/sticky (`& 0o7777`; type bits are masked off).
    pub mode: u32,
    /// Numeric owner (PAX wins over the header; names are ignored).
    pub uid: u64,
    /// Numeric group.
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Sub-second part of the mtime (from PAX).
    pub mtime_nsec: u32,
}

/// What kind of entry, with what only that kind carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Regular file; bytes at [`Entry::offset`], [`Entry::size`] long.
    File,
    /// Directory.
    Dir,
    /// Symbolic link and its raw target (never resolved).
    Symlink(Vec<u8>),
    /// Hard link to the normalised path of an earlier entry (this or a lower layer).
    Hardlink(Vec<u8>),
    /// Character device (major, minor).
    Char(u32, u32),
    /// Block device (major, minor).
    Block(u32, u32),
    /// Named pipe.
    Fifo,
}

/// One ordinary entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalised path, `""` for the root.
    pub path: Vec<u8>,
    /// Type and type-specific data.
    pub kind: Kind,
    /// Ownership, mode, mtime.
    pub meta: Meta,
    /// Content length (regular files; a sparse file's real size).
    pub size: u64,
    /// Offset of the content in the decompressed layer tar (a sparse file's first stored byte).
    pub offset: u64,
    /// Extended attributes in tar order, values byte-exact (empty ones kept).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A sparse file's data runs, stored back to back from `offset`; holes between them.
    pub sparse: Option<Box<[Segment]>>,
}

/// The file contents of a compressed layer, decompressed once by the indexing pass for export.
/// Only contents are kept, back to back in tar order: tar headers and padding would be more
/// than half the copy in a layer of small files, and export never reads them.
#[derive(Debug, Clone)]
pub struct Spooled {
    /// The contents.
    pub blob: Blob,
    /// Per entry of [`LayerIndex::entries`] (same order), where its content starts in `blob`
    /// (a sparse file's stored runs, back to back).
    pub offsets: Vec<u64>,
}

/// Everything the merge needs to know about one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerIndex {
    /// "N (sha256:…)", for messages.
    pub label: String,
    /// Ordinary entries in tar order.
    pub entries: Vec<Entry>,
    /// Paths hidden in lower layers by `.wh.NAME`.
    pub whiteouts: Vec<Vec<u8>>,
    /// Directories whose lower-layer children are hidden by `.wh..wh..opq`.
    pub opaques: Vec<Vec<u8>>,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    /// Length of the uncompressed tar.
    pub tar_size: u64,
    /// A decompressed copy of a compressed layer's file contents, when indexing was asked to
    /// keep one.
    pub decompressed: Option<Spooled>,
    /// Where decompression can start inside a gzip layer, or at which frame starts inside a zstd
    /// layer, for random access (`None` for uncompressed layers, read in place).
    pub checkpoints: Option<Arc<crate::zran::Checkpoints>>,
    /// The sha256 of every span of the compressed blob, so that a registry blob read by
    /// ranges can be checked span by span ([`crate::blob::Lazy`]).
    pub spans: Option<Arc<crate::blob::SpanDigests>>,
}

/// Reads a layer blob once: decompresses, indexes the tar, and checks blob digest and diff_id.
/// `progress` is told how many blob bytes have been read, as they are.
///
/// With `spool_dir`, a compressed layer's file contents are also written, as they are
/// decompressed, to an anonymous temp file there ([`LayerIndex::decompressed`]), so that export
/// can read them in place instead of decompressing the layer a second time.
pub fn index_layer(
    layer: &Layer,
    progress: &(dyn Fn(u64) + Sync),
    spool_dir: Option<&Path>,
) -> Result<LayerIndex> {
    let label = layer.label();
    let layer_err = |source: io::Error| Error::Layer {
        layer: label.clone(),
        source,
    };
    let spool_file = match spool_dir {
        Some(dir) if layer.compression != Compression::None => {
            Some(tempfile::tempfile_in(dir).map_err(|e| Error::io(dir.display(), e))?)
        }
        _ => None,
    };
    // Up to four threads, so that on a big layer reading and hashing the blob, inflating,
    // hashing and parsing the tar, and writing the spool overlap instead of taking turns.
    let (blob_digest, spans, checkpoints, mut index, diff_id, tar_size) =
        std::thread::scope(|s| -> Result<_> {
            let (raw_tx, raw_rx) = pipe(DEPTH, CHUNK);
            let reading = s.spawn(move || {
                let mut blob = ProgressReader {
                    inner: layer.blob.reader(),
                    progress,
                };
                let mut hasher = Sha256::new();
                let mut spans = crate::blob::SpanHasher::default();
                raw_tx.pump(&mut blob, |b| {
                    hasher.update(b);
                    spans.update(b);
                })?;
                Ok((digest_string(hasher), spans.finish()))
            });
            let (tar_tx, tar_rx) = pipe(DEPTH, CHUNK);
            let inflating = s.spawn(move || inflate_stage(raw_rx, tar_tx, layer, spool_dir));
            let (mut spool, spooling) = match spool_file {
                Some(mut file) => {
                    let (tx, mut rx) = pipe(DEPTH, CHUNK);
                    let spooling = s.spawn(move || {
                        drain_into(&mut rx, &mut file)?;
                        Ok(file)
                    });
                    let spool = ContentSpool {
                        out: tx,
                        len: 0,
                        offsets: Vec::new(),
                    };
                    (Some(spool), Some(spooling))
                }
                None => (None, None),
            };
            let mut reader = TarReader::new(HashReader::new(tar_rx));
            let indexed = index_entries(&mut reader, &label, spool.as_mut());
            let index = match (spool, spooling) {
                (Some(spool), Some(spooling)) => {
                    let len = spool.len;
                    // A failed finish means the writer is gone: its join says why.
                    let _ = spool.out.finish();
                    match (indexed, joined(spooling.join())) {
                        // The spool writer failed first (a full disk, say); the parser then
                        // found its pipe closed.
                        (Err(_), Err(e)) if !is_hangup(&e) => {
                            return Err(Error::io("layer spool", e));
                        }
                        (Err(e), _) => return Err(e),
                        (Ok(_), Err(e)) => return Err(Error::io("layer spool", e)),
                        (Ok(mut index), Ok(file)) => {
                            let name = format!("{} (decompressed)", layer.blob.name());
                            index.decompressed = Some(Spooled {
                                blob: Blob::new(Arc::new(file), 0, len, &name),
                                offsets: spool.offsets,
                            });
                            index
                        }
                    }
                }
                _ => indexed?,
            };
            // Hash what follows the end-of-archive marker too: the diff_id covers the whole
            // stream.
            let mut plain = reader.into_inner();
            io::copy(&mut plain, &mut io::sink()).map_err(layer_err)?;
            let (diff_id, tar_size, tar_rx) = plain.finish();
            drop(tar_rx);
            let checkpoints = joined(inflating.join()).map_err(layer_err)?;
            let (blob_digest, spans) = joined(reading.join()).map_err(layer_err)?;
            Ok((blob_digest, spans, checkpoints, index, diff_id, tar_size))
        })?;
    if let Some(expected) = &layer.digest
        && *expected != blob_digest
    {
        return Err(Error::DigestMismatch {
            what: format!("layer {} blob {}", layer.number, layer.blob.name()),
            expected: expected.clone(),
            found: blob_digest,
        });
    }
    if let Some(expected) = &layer.diff_id
        && *expected != diff_id
    {
        return Err(Error::DigestMismatch {
            what: format!("layer {} diff_id", layer.label()),
            expected: expected.clone(),
            found: diff_id,
        });
    }
    index.diff_id = diff_id;
    index.tar_size = tar_size;
    index.spans = Some(Arc::new(spans));
    index.checkpoints = checkpoints
        .and_then(|points| crate::zran::Checkpoints::new(points, tar_size))
        .map(Arc::new);
    Ok(index)
}

/// The decompressing stage: inflates everything `raw` delivers into `tar`, then reads what
/// follows the compressed stream (the blob digest covers it too). Returns the checkpoints a
/// gzip layer recorded. Any error also reaches the tar reader, which reports it in place.
fn inflate_stage(
    raw: PipeReader,
    tar: PipeWriter,
    layer: &Layer,
    spool_dir: Option<&Path>,
) -> io::Result<Option<Vec<Checkpoint>>> {
    let decoder = match layer.compression {
        // Export reads from the spooled copy: checkpoints would only cost memory.
        Compression::Gzip if spool_dir.is_some() => {
            crate::zran::GzipReader::new(raw).map(Decoder::GzipIndexed)
        }
        // This pass decompresses the whole layer anyway: note where later reads can start.
        Compression::Gzip => {
            use crate::zran::{GzipReader, SPAN};
            GzipReader::recording(raw, SPAN).map(Decoder::GzipIndexed)
        }
        // Frame starts, where a zstd layer has several frames.
        Compression::Zstd if spool_dir.is_none() => {
            crate::zstd_frames::ZstdReader::recording(raw, crate::zran::SPAN)
                .map(Decoder::ZstdIndexed)
        }
        other => Decoder::new(raw, other),
    };
    let mut decoder = match decoder {
        Ok(d) => d,
        Err(e) => {
            let copy = io::Error::new(e.kind(), e.to_string());
            tar.fail(e);
            return Err(copy);
        }
    };
    tar.pump(&mut decoder, |_| {})?;
    let checkpoints = decoder.take_checkpoints();
    io::copy(&mut decoder.into_inner(), &mut io::sink())?;
    Ok(checkpoints)
}

/// Where the indexing pass writes a compressed layer's file contents, and where each went.
struct ContentSpool {
    out: PipeWriter,
    len: u64,
    offsets: Vec<u64>,
}

struct ProgressReader<'p, R> {
    inner: R,
    progress: &'p (dyn Fn(u64) + Sync),
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// Indexes an uncompressed layer tar from any reader (digests left empty).
pub fn index_tar<R: Read>(reader: R, label: &str) -> Result<LayerIndex> {
    index_entries(&mut TarReader::new(io::BufReader::new(reader)), label, None)
}

/// An entry path for a message: a hostile one can be megabytes long, so keep both ends.
fn shown(path: &[u8]) -> String {
    const KEEP: usize = 120;
    if path.len() <= 2 * KEEP {
        return String::from_utf8_lossy(path).into_owned();
    }
    format!(
        "{}…({} bytes)…{}",
        String::from_utf8_lossy(&path[..KEEP]),
        path.len(),
        String::from_utf8_lossy(&path[path.len() - KEEP..])
    )
}

fn index_entries<R: io::BufRead>(
    reader: &mut TarReader<R>,
    label: &str,
    mut spool: Option<&mut ContentSpool>,
) -> Result<LayerIndex> {
    let mut index = LayerIndex {
        label: label.to_string(),
        ..LayerIndex::default()
    };
    let mut sparse_segments = 0usize;
    loop {
        let raw = match reader.next_entry() {
            Ok(Some(raw)) => raw,
            Ok(None) => break,
            Err(source) => {
                // Name the last entry read: it is where the stream went wrong.
                let after = index
                    .entries
                    .last()
                    .map(|e| format!(" (after entry {:?})", shown(&e.path)))
                    .unwrap_or_default();
                return Err(Error::Layer {
                    layer: format!("{label}{after}"),
                    source,
                });
            }
        };
        let entry_err = |msg: String| Error::Entry {
            layer: label.to_string(),
            entry: shown(&raw.path),
            msg,
        };
        let path = match path::classify(&raw.path).map_err(|m| entry_err(m.to_string()))? {
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
        let kind = match raw.typeflag {
            // Old (pre-POSIX) tars mark directories by a trailing slash on a regular entry.
            b'0' | b'\0' | b'7' if raw.path.ends_with(b"/") => Kind::Dir,
            b'0' | b'\0' | b'7' => Kind::File,
            b'5' => Kind::Dir,
            // A target is kept verbatim, but a NUL cannot be in one: no filesystem stores it,
            // and a tar header field would cut the target there.
            b'2' if raw.link.contains(&0) => {
                return Err(entry_err("symlink target contains a NUL byte".into()));
            }
            b'2' => Kind::Symlink(raw.link.clone()),
            b'1' => {
                let target = path::normalise(&raw.link)
                    .map_err(|m| entry_err(format!("hardlink target: {m}")))?;
                if target.is_empty() {
                    return Err(entry_err("hardlink to the image root".into()));
                }
                Kind::Hardlink(target)
            }
            b'3' => Kind::Char(raw.devmajor, raw.devminor),
            b'4' => Kind::Block(raw.devmajor, raw.devminor),
            b'6' => Kind::Fifo,
            other => {
                return Err(entry_err(format!(
                    "unsupported tar entry type {:?}",
                    char::from(other)
                )));
            }
        };
        if path.is_empty() && kind != Kind::Dir {
            return Err(entry_err("the image root must be a directory".into()));
        }
        let segments = match &raw.sparse {
            None => None,
            Some(_) if kind != Kind::File => {
                return Err(entry_err(
                    "a sparse map on an entry that is not a regular file".into(),
                ));
            }
            Some(map) => {
                let segments = sparse::segments(map, raw.offset, raw.size).map_err(entry_err)?;
                sparse_segments += segments.len();
                if sparse_segments > sparse::MAX_LAYER_SEGMENTS {
                    return Err(entry_err(format!(
                        "the layer's sparse maps exceed {} segments in all",
                        sparse::MAX_LAYER_SEGMENTS
                    )));
                }
                Some(segments)
            }
        };
        // What the layer stores; a sparse file's real size is its map's.
        let stored = if kind == Kind::File { raw.size } else { 0 };
        let size = match &raw.sparse {
            Some(map) if segments.is_some() => map.real_size,
            _ => stored,
        };
        if let Some(spool) = spool.as_deref_mut() {
            spool.offsets.push(spool.len);
            if stored > 0 {
                reader
                    .copy_data(stored, &mut spool.out)
                    .map_err(|source| Error::Layer {
                        layer: format!("{label} (in entry {:?})", shown(&raw.path)),
                        source,
                    })?;
                spool.len += stored;
            }
        }
        index.entries.push(Entry {
            path,
            kind,
            meta: Meta {
                mode: raw.mode & 0o7777,
                uid: raw.uid,
                gid: raw.gid,
                mtime: raw.mtime,
                mtime_nsec: raw.mtime_nsec,
            },
            size,
            offset: raw.offset,
            xattrs: raw.xattrs,
            sparse: segments,
        });
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::sha256_of;
    use std::io::{Seek, Write};

    /// A tar of `files` files of 20 KiB each (several pipeline buffers in all), then `last`.
    fn tar_of(files: usize, last: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..files {
            let data: Vec<u8> = (0..20_000u32).map(|k| (k * 31 + i as u32) as u8).collect();
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, format!("d/f{i:05}"), &data[..])
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_old_mut().name[..last.len()].copy_from_slice(last);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn layer(blob: &[u8], digest: String, diff_id: String) -> Layer {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(blob).unwrap();
        f.rewind().unwrap();
        let blob = Blob::new(Arc::new(f), 0, blob.len() as u64, "blob");
        Layer {
            number: 2,
            compression: Compression::detect(&blob).unwrap(),
            blob,
            digest: Some(digest),
            diff_id: Some(diff_id),
            descriptor: None,
        }
    }

    fn index(layer: &Layer, spool: bool) -> Result<LayerIndex> {
        let dir = std::env::temp_dir();
        index_layer(layer, &|_| {}, spool.then_some(dir.as_path()))
    }

    #[test]
    fn a_gzip_layer_is_indexed_spooled_and_verified() {
        let tar = tar_of(300, b"end");
        let gz = gzip(&tar);
        let l = layer(&gz, sha256_of(&gz), sha256_of(&tar));
        let idx = index(&l, true).unwrap();
        assert_eq!(idx.entries.len(), 301);
        assert_eq!(idx.diff_id, sha256_of(&tar));
        assert_eq!(idx.tar_size, tar.len() as u64);
        let copy = idx.decompressed.unwrap();
        let contents = copy.blob.read_all(u64::MAX).unwrap();
        assert_eq!(copy.offsets.len(), idx.entries.len());
        for (e, &at) in idx.entries.iter().zip(&copy.offsets) {
            let (at, off, n) = (at as usize, e.offset as usize, e.size as usize);
            assert_eq!(contents[at..at + n], tar[off..off + n], "{:?}", e.path);
        }
        let sizes: u64 = idx.entries.iter().map(|e| e.size).sum();
        assert_eq!(contents.len() as u64, sizes, "only contents are spooled");
        // Without a spool, the pass records checkpoints for random access instead.
        let idx = index(&l, false).unwrap();
        assert!(idx.decompressed.is_none());
        assert!(!idx.checkpoints.unwrap().is_empty());
    }

    #[test]
    fn corrupt_gzip_in_the_middle_is_an_error_naming_the_layer() {
        let tar = tar_of(300, b"end");
        let mut gz = gzip(&tar);
        let mid = gz.len() / 2;
        gz[mid..mid + 64].fill(0xff);
        let l = layer(&gz, sha256_of(&gz), sha256_of(&tar));
        for spool in [true, false] {
            let e = index(&l, spool).unwrap_err();
            assert!(
                matches!(&e, Error::Layer { layer, .. } if layer.starts_with(&l.label())),
                "{e}"
            );
        }
    }

    #[test]
    fn a_truncated_zstd_layer_is_an_error_naming_the_layer() {
        let tar = tar_of(100, b"end");
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        let cut = &zst[..zst.len() - 100];
        let l = layer(cut, sha256_of(cut), sha256_of(&tar));
        let e = index(&l, true).unwrap_err();
        assert!(e.to_string().contains(&l.label()), "{e}");
    }

    #[test]
    fn digest_mismatches_name_the_layer() {
        let tar = tar_of(50, b"end");
        let gz = gzip(&tar);
        let l = layer(&gz, sha256_of(b"other"), sha256_of(&tar));
        let e = index(&l, true).unwrap_err();
        assert!(
            matches!(&e, Error::DigestMismatch { what, found, .. }
                if what.contains("layer 2") && *found == sha256_of(&gz)),
            "{e}"
        );
        let l = layer(&gz, sha256_of(&gz), sha256_of(b"other"));
        let e = index(&l, false).unwrap_err();
        assert!(
            matches!(&e, Error::DigestMismatch { what, found, .. }
                if what.contains("diff_id") && what.contains(&l.label()) && *found == sha256_of(&tar)),
            "{e}"
        );
    }

    #[test]
    fn a_bad_entry_early_in_a_big_layer_stops_every_stage() {
        // The bad entry comes first, with megabytes still to inflate behind it: the reading and
        // inflating threads must notice the parser has gone, or this test never returns.
        let mut tar = tar_of(0, b"../escape");
        tar.extend_from_slice(&tar_of(400, b"end"));
        let gz = gzip(&tar);
        let l = layer(&gz, sha256_of(&gz), sha256_of(&tar));
        let e = index(&l, true).unwrap_err();
        assert!(
            matches!(&e, Error::Entry { layer, .. } if *layer == l.label()),
            "{e}"
        );
    }

    #[test]
    fn bytes_after_the_tar_count_and_garbage_after_the_gzip_is_an_error() {
        let mut tar = tar_of(10, b"end");
        tar.extend_from_slice(&[7; 5000]);
        let mut gz = gzip(&tar);
        let l = layer(&gz, sha256_of(&gz), sha256_of(&tar));
        assert_eq!(index(&l, true).unwrap().tar_size, tar.len() as u64);
        // Garbage after the last member is reported when the stream ends, after the tar did.
        gz.extend_from_slice(&[0; 700]);
        let l = layer(&gz, sha256_of(&gz), sha256_of(&tar));
        let e = index(&l, true).unwrap_err();
        assert!(
            matches!(&e, Error::Layer { layer, .. } if *layer == l.label()),
            "{e}"
        );
    }

    /// A tar whose last file's 100 bytes end 412 bytes of padding and 1024 of end blocks
    /// before its end.
    fn tar_ending_in_data() -> Vec<u8> {
        // `tar_of` writes its own end blocks: drop them, then append one more file.
        let mut start = tar_of(3, b"first");
        start.truncate(start.len() - 1024);
        let mut b = tar::Builder::new(start);
        let mut h = tar::Header::new_ustar();
        h.set_size(100);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "last", &[9u8; 100][..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_cut_after_the_last_data_byte_padding_or_one_end_block_are_whole() {
        let full = tar_ending_in_data();
        let end = full.len();
        for cut in [end - 1024 - 412, end - 1024, end - 512, end] {
            let tar = &full[..cut];
            let blobs = [tar.to_vec(), gzip(tar), zstd::encode_all(tar, 3).unwrap()];
            for blob in blobs {
                let l = layer(&blob, sha256_of(&blob), sha256_of(tar));
                for spool in [true, false] {
                    let idx = index(&l, spool).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
                    assert_eq!(idx.entries.len(), 5, "cut at {cut}");
                    let last = idx.entries.last().unwrap();
                    assert_eq!((last.path.as_slice(), last.size), (&b"last"[..], 100));
                    assert_eq!(idx.diff_id, sha256_of(tar));
                    assert_eq!(idx.tar_size, cut as u64);
                    if let Some(copy) = idx.decompressed {
                        let at = *copy.offsets.last().unwrap();
                        let mut data = vec![0; 100];
                        copy.blob.read_exact_at(&mut data, at).unwrap();
                        assert_eq!(data, [9; 100]);
                    }
                }
            }
        }
        // One byte short of the data is a short stream, compressed or not.
        let tar = &full[..end - 1024 - 413];
        for blob in [tar.to_vec(), gzip(tar), zstd::encode_all(tar, 3).unwrap()] {
            let l = layer(&blob, sha256_of(&blob), sha256_of(tar));
            let e = index(&l, true).unwrap_err();
            assert!(
                e.to_string().contains("ends inside an entry's data")
                    && e.to_string().contains(&l.label()),
                "{e}"
            );
        }
    }

    /// A PAX 0.1 sparse entry `name` of `real` bytes with `map`, storing `stored`.
    fn sparse_tar(name: &str, real: u64, map: &str, stored: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let records = [
            ("GNU.sparse.size", real.to_string()),
            ("GNU.sparse.name", name.to_string()),
            ("GNU.sparse.map", map.to_string()),
        ];
        b.append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(stored.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "GNUSparseFile.1/x", stored).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn sparse_entries_become_files_of_their_real_size_with_placed_runs() {
        let tar = sparse_tar(
            "dir/disk",
            1 << 40,
            "4096,3,1099511627770,6,1099511627776,0",
            b"abcdefghi",
        );
        let idx = index_tar(&tar[..], "1").unwrap();
        let e = &idx.entries[0];
        assert_eq!((e.path.as_slice(), e.size), (&b"dir/disk"[..], 1 << 40));
        let runs = e.sparse.as_deref().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(&tar[runs[0].tar as usize..][..3], b"abc");
        assert_eq!(&tar[runs[1].tar as usize..][..6], b"defghi");
        assert_eq!(runs[1].logical, (1 << 40) - 6);
        assert_eq!(runs.iter().map(|r| r.len).sum::<u64>(), 9);
    }

    #[test]
    fn bad_sparse_maps_are_errors_naming_the_layer_and_entry() {
        for (map, stored, what) in [
            ("0,5,3,5", &b"0123456789"[..], "overlaps"),
            ("50,5,0,5", b"0123456789", "overlaps"),
            ("98,5", b"01234", "real size"),
            ("0,5", b"012", "more data"),
            ("0,5", b"0123456", "places only 5"),
            ("0,x", b"", "bad number"),
        ] {
            let tar = sparse_tar("the/file", 100, map, stored);
            let e = index_tar(&tar[..], "3 (sha256:x)").unwrap_err();
            assert!(
                matches!(&e, Error::Entry { layer, entry, msg }
                    if layer == "3 (sha256:x)" && entry == "the/file" && msg.contains(what)),
                "{map}: {e}"
            );
        }
    }

    #[test]
    fn an_absurd_sparse_map_is_an_error_not_an_allocation() {
        let pairs = sparse::MAX_SEGMENTS + 1;
        let map = vec!["0,0"; pairs].join(",");
        let tar = sparse_tar("f", 1, &map, b"");
        let e = index_tar(&tar[..], "1").unwrap_err();
        assert!(
            matches!(&e, Error::Entry { entry, msg, .. }
                if entry == "f" && msg.contains("exceeds the limit")),
            "{e}"
        );
    }
}
