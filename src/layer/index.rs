//! One pass over a (decompressed) layer tar → [`LayerIndex`]; digests are checked on the way.

use std::io::{self, BufReader, Read};

use super::path::{self, Class};
use crate::blob::{Decoder, HashReader};
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
}

/// Reads a layer blob once: decompresses, indexes the tar, and checks blob digest and diff_id.
pub fn index_layer(layer: &Layer) -> Result<LayerIndex> {
    let label = layer.label();
    let layer_err = |source: io::Error| Error::Layer {
        layer: label.clone(),
        source,
    };
    let compressed = HashReader::new(BufReader::with_capacity(256 * 1024, layer.blob.reader()));
    let decoder = Decoder::new(compressed, layer.compression).map_err(layer_err)?;
    let mut archive = tar::Archive::new(HashReader::new(decoder));
    let mut index = index_entries(&mut archive, &label)?;

    // Hash what follows the end-of-archive marker too: the diff_id covers the whole stream.
    let mut plain = archive.into_inner();
    io::copy(&mut plain, &mut io::sink()).map_err(layer_err)?;
    let (diff_id, tar_size, decoder) = plain.finish();
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
    Ok(index)
}

/// Indexes an uncompressed layer tar from any reader (digests left empty).
pub fn index_tar<R: Read>(reader: R, label: &str) -> Result<LayerIndex> {
    index_entries(&mut tar::Archive::new(reader), label)
}

fn index_entries<R: Read>(archive: &mut tar::Archive<R>, label: &str) -> Result<LayerIndex> {
    let layer_err = |source: io::Error| Error::Layer {
        layer: label.to_string(),
        source,
    };
    let mut index = LayerIndex {
        label: label.to_string(),
        ..LayerIndex::default()
    };
    for entry in archive.entries().map_err(layer_err)? {
        let mut entry = entry.map_err(layer_err)?;
        let raw_path = entry.path_bytes().into_owned();
        let entry_err = |msg: String| Error::Entry {
            layer: label.to_string(),
            entry: String::from_utf8_lossy(&raw_path).into_owned(),
            msg,
        };
        let etype = entry.header().entry_type();
        if etype.is_pax_global_extensions() {
            continue;
        }
        let class = path::classify(&raw_path).map_err(|m| entry_err(m.to_string()))?;
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

        let header = entry.header();
        let mut meta = Meta {
            mode: header.mode().map_err(|e| entry_err(e.to_string()))? & 0o7777,
            uid: header.uid().map_err(|e| entry_err(e.to_string()))?,
            gid: header.gid().map_err(|e| entry_err(e.to_string()))?,
            mtime: header.mtime().map_err(|e| entry_err(e.to_string()))? as i64,
            mtime_nsec: 0,
        };
        let dev = || -> io::Result<(u32, u32)> {
            Ok((
                header.device_major()?.unwrap_or(0),
                header.device_minor()?.unwrap_or(0),
            ))
        };
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let kind = match etype {
            tar::EntryType::Regular | tar::EntryType::Continuous if raw_path.ends_with(b"/") => {
                Kind::Dir
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink(link.unwrap_or_default()),
            tar::EntryType::Link => {
                let target = link.unwrap_or_default();
                let target = path::normalise(&target)
                    .map_err(|m| entry_err(format!("hardlink target: {m}")))?;
                if target.is_empty() {
                    return Err(entry_err("hardlink to the image root".into()));
                }
                Kind::Hardlink(target)
            }
            tar::EntryType::Char => {
                let (ma, mi) = dev().map_err(|e| entry_err(e.to_string()))?;
                Kind::Char(ma, mi)
            }
            tar::EntryType::Block => {
                let (ma, mi) = dev().map_err(|e| entry_err(e.to_string()))?;
                Kind::Block(ma, mi)
            }
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::GNUSparse => {
                return Err(entry_err("GNU sparse files are not supported".into()));
            }
            other => {
                return Err(entry_err(format!(
                    "unsupported tar entry type {:?}",
                    other.as_byte() as char
                )));
            }
        };

        let mut xattrs = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(layer_err)? {
            for ext in exts {
                let ext = ext.map_err(layer_err)?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), value.to_vec()));
                } else if key.starts_with(b"GNU.sparse.") {
                    return Err(entry_err("PAX sparse files are not supported".into()));
                } else {
                    match key {
                        b"mtime" => {
                            (meta.mtime, meta.mtime_nsec) = parse_pax_time(value)
                                .ok_or_else(|| entry_err("bad PAX mtime".into()))?;
                        }
                        b"uid" => {
                            meta.uid = parse_pax_u64(value)
                                .ok_or_else(|| entry_err("bad PAX uid".into()))?
                        }
                        b"gid" => {
                            meta.gid = parse_pax_u64(value)
                                .ok_or_else(|| entry_err("bad PAX gid".into()))?
                        }
                        _ => {}
                    }
                }
            }
        }
        if path.is_empty() && kind != Kind::Dir {
            return Err(entry_err("the image root must be a directory".into()));
        }
        let size = if kind == Kind::File { entry.size() } else { 0 };
        index.entries.push(Entry {
            path,
            kind,
            meta,
            size,
            offset: entry.raw_file_position(),
            xattrs,
        });
    }
    Ok(index)
}

fn parse_pax_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// Parses a PAX time, `[-]SECONDS[.FRACTION]`, keeping nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    // -1.25 means 1.25 s before the epoch: -2 s + 0.75 s.
    if nsec == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nsec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1700000000, 0)));
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1700000000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b""), None);
    }
}
