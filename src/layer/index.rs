//! One pass over a (decompressed) layer tar → [`LayerIndex`]; digests are checked on the way.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;

use super::path::{self, Class};
use super::tar::TarReader;
use crate::blob::{Blob, Compression, Decoder, HashReader};
use crate::error::{Error, Result};
use crate::source::Layer;

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
    /// Content length (regular files).
    pub size: u64,
    /// Offset of the content in the decompressed layer tar.
    pub offset: u64,
    /// Extended attributes in tar order, values byte-exact (empty ones kept).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
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
    /// A decompressed copy of a compressed layer, when indexing was asked to keep one.
    pub decompressed: Option<Blob>,
    /// Where decompression can start inside a gzip layer, or at which frame starts inside a zstd
    /// layer, for random access (`None` for uncompressed layers, read in place).
    pub checkpoints: Option<Arc<crate::zran::Checkpoints>>,
}

/// Reads a layer blob once: decompresses, indexes the tar, and checks blob digest and diff_id.
/// `progress` is told how many blob bytes have been read, as they are.
///
/// With `spool_dir`, a compressed layer's tar is also written, as it is decompressed, to an
/// anonymous temp file there ([`LayerIndex::decompressed`]), so that export can read file
/// contents in place instead of decompressing the layer a second time.
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
    let blob = ProgressReader {
        inner: layer.blob.reader(),
        progress,
    };
    let compressed = HashReader::new(BufReader::with_capacity(256 * 1024, blob));
    let decoder = match layer.compression {
        // Export reads from the spooled copy: checkpoints would only cost memory.
        Compression::Gzip if spool_dir.is_some() => {
            crate::zran::GzipReader::new(compressed).map(Decoder::GzipIndexed)
        }
        // This pass decompresses the whole layer anyway: note where later reads can start.
        Compression::Gzip => {
            use crate::zran::{GzipReader, SPAN};
            GzipReader::recording(compressed, SPAN).map(Decoder::GzipIndexed)
        }
        // Frame starts, where a zstd layer has several frames.
        Compression::Zstd if spool_dir.is_none() => {
            crate::zstd_frames::ZstdReader::recording(compressed, crate::zran::SPAN)
                .map(Decoder::ZstdIndexed)
        }
        other => Decoder::new(compressed, other),
    }
    .map_err(layer_err)?;
    let spool = match spool_dir {
        Some(dir) if layer.compression != Compression::None => Some(BufWriter::with_capacity(
            1 << 20,
            tempfile::tempfile_in(dir).map_err(|e| Error::io(dir.display(), e))?,
        )),
        _ => None,
    };
    let tee = Tee {
        inner: decoder,
        copy: spool,
    };
    let mut reader = TarReader::new(HashReader::new(tee));
    let mut index = index_entries(&mut reader, &label)?;

    // Hash what follows the end-of-archive marker too: the diff_id covers the whole stream.
    let mut plain = reader.into_inner();
    io::copy(&mut plain, &mut io::sink()).map_err(layer_err)?;
    let (diff_id, tar_size, tee) = plain.finish();
    if let Some(copy) = tee.copy {
        let file = copy
            .into_inner()
            .map_err(|e| Error::io("layer spool", e.into_error()))?;
        index.decompressed = Some(Blob::new(
            Arc::new(file),
            0,
            tar_size,
            &format!("{} (decompressed)", layer.blob.name()),
        ));
    }
    let mut decoder = tee.inner;
    let checkpoints = decoder.take_checkpoints();
    let mut compressed = decoder.into_inner();
    io::copy(&mut compressed, &mut io::sink()).map_err(layer_err)?;
    let (digest, _, _) = compressed.finish();

    if let Some(expected) = &layer.digest
        && *expected != digest
    {
        return Err(Error::DigestMismatch {
            what: format!("layer {} blob {}", layer.number, layer.blob.name()),
            expected: expected.clone(),
            found: digest,
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
    index.checkpoints = checkpoints
        .and_then(|points| crate::zran::Checkpoints::new(points, tar_size))
        .map(Arc::new);
    Ok(index)
}

/// Copies everything read through it into `copy`.
struct Tee<R> {
    inner: R,
    copy: Option<BufWriter<File>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(copy) = &mut self.copy {
            copy.write_all(&buf[..n])?;
        }
        Ok(n)
    }
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
    index_entries(&mut TarReader::new(reader), label)
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

fn index_entries<R: Read>(reader: &mut TarReader<R>, label: &str) -> Result<LayerIndex> {
    let mut index = LayerIndex {
        label: label.to_string(),
        ..LayerIndex::default()
    };
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
        if raw.sparse {
            return Err(entry_err("sparse files are not supported".into()));
        }
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
        let size = if kind == Kind::File { raw.size } else { 0 };
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
        });
    }
    Ok(index)
}
