//! Blobs: byte ranges of a file (a layout's blob file or a member of an archive), read with
//! positioned reads, and the decompressors and digesters that wrap them.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

use sha2::{Digest as _, Sha256};

use crate::zran::{Checkpoint, GzipReader};
use crate::zstd_frames::ZstdReader;

/// A byte range of an open file: a whole blob file, or one member of an image archive.
#[derive(Clone)]
pub struct Blob {
    file: Arc<File>,
    offset: u64,
    len: u64,
    name: Arc<str>,
    /// Set while the file is still being downloaded: reads wait for their bytes.
    arrival: Option<Arc<Arrival>>,
}

/// How much of a blob that is still being written (a registry download) is in its file, so
/// that indexing can read it as it streams in; or why the rest will never come.
#[derive(Debug, Default)]
pub struct Arrival {
    state: Mutex<(u64, Option<Result<(), String>>)>,
    cond: Condvar,
}

impl Arrival {
    /// The first `upto` bytes are in the file.
    pub fn advance(&self, upto: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.max(upto);
        self.cond.notify_all();
    }

    /// No more bytes will come: all are there (`Ok`), or the download failed (the message).
    pub fn finish(&self, result: Result<(), String>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = Some(result);
        self.cond.notify_all();
    }

    /// Waits until the first `end` bytes are in the file.
    pub fn wait(&self, end: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &s.1 {
                Some(Ok(())) => return Ok(()),
                Some(Err(msg)) => return Err(io::Error::other(msg.clone())),
                None if s.0 >= end => return Ok(()),
                None => s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} @{}+{})", self.name, self.offset, self.len)
    }
}

impl Blob {
    /// A blob of `len` bytes at `offset` in `file`, called `name` in error messages.
    pub fn new(file: Arc<File>, offset: u64, len: u64, name: &str) -> Self {
        Blob {
            file,
            offset,
            len,
            name: name.into(),
            arrival: None,
        }
    }

    /// The same blob, whose file is still being written: reads wait for their bytes to
    /// arrive (or fail with the reason they never will).
    pub fn arriving(mut self, arrival: Arc<Arrival>) -> Self {
        self.arrival = Some(arrival);
        self
    }

    /// Where the blob starts in its file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The metadata of the file holding the blob.
    pub fn metadata(&self) -> Option<std::fs::Metadata> {
        self.file.metadata().ok()
    }

    /// The blob's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-length blob.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The name used in error messages (member or file path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads at `pos` within the blob; returns 0 at the end. Never moves a shared cursor.
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        if pos >= self.len {
            return Ok(0);
        }
        let n = buf.len().min((self.len - pos) as usize);
        if let Some(a) = &self.arrival {
            a.wait(pos + n as u64)?;
        }
        self.file.read_at(&mut buf[..n], self.offset + pos)
    }

    /// Fills `buf` from `pos`, failing with `UnexpectedEof` if the blob (or the file under it,
    /// e.g. truncated since it was opened) ends first.
    pub fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let end = pos.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: read past the end of the blob", self.name),
            ));
        }
        if let Some(a) = &self.arrival {
            a.wait(pos + buf.len() as u64)?;
        }
        self.file.read_exact_at(buf, self.offset + pos)
    }

    /// A sequential reader over the whole blob, independent of other readers.
    pub fn reader(&self) -> BlobReader {
        self.reader_from(0)
    }

    /// A sequential reader starting at `pos`.
    pub fn reader_from(&self, pos: u64) -> BlobReader {
        BlobReader {
            blob: self.clone(),
            pos,
        }
    }

    /// Reads the whole blob into memory; for small JSON documents only.
    pub fn read_all(&self, limit: u64) -> io::Result<Vec<u8>> {
        if self.len > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {} bytes is larger than the {} allowed",
                    self.name, self.len, limit
                ),
            ));
        }
        let mut buf = vec![0; self.len as usize];
        self.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
}

/// A `Read` over a [`Blob`] with its own position.
pub struct BlobReader {
    blob: Blob,
    pos: u64,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.blob.read_at(buf, self.pos)?;
        if n == 0 && !buf.is_empty() && self.pos < self.blob.len {
            // The file shrank under us: a short blob is corrupt, not a clean end.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: file ends before the blob does", self.blob.name),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// How a layer blob is compressed, detected from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// One or more gzip members.
    Gzip,
    /// One or more zstd frames.
    Zstd,
}

impl Compression {
    /// Sniffs the magic number at the start of `blob`.
    pub fn detect(blob: &Blob) -> io::Result<Self> {
        let mut magic = [0u8; 4];
        let n = blob.read_at(&mut magic, 0)?;
        Ok(match &magic[..n] {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
            _ => Compression::None,
        })
    }
}

/// A decompressing reader that can hand back its input when done.
// The decoder states differ in size, but there is one per open layer stream: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Decoder<R: BufRead> {
    /// Pass-through.
    Plain(R),
    /// Multi-member gzip (pigz and concatenated streams).
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    /// Multi-member gzip that can record checkpoints or start at one (for random access).
    GzipIndexed(GzipReader<R>),
    /// zstd, all frames.
    Zstd(zstd::stream::read::Decoder<'static, R>),
    /// zstd, all frames, able to record frame starts or start at one (for random access).
    ZstdIndexed(ZstdReader<R>),
}

impl<R: BufRead> Decoder<R> {
    /// Wraps `input` according to `compression`.
    pub fn new(input: R, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Decoder::Plain(input),
            Compression::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(input)),
            Compression::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(input)?),
        })
    }

    /// The compressed input, e.g. to drain trailing bytes into a digest.
    pub fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::GzipIndexed(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
            Decoder::ZstdIndexed(d) => d.into_inner(),
        }
    }

    /// The checkpoints a recording [`Decoder::GzipIndexed`] or [`Decoder::ZstdIndexed`] made;
    /// `None` for other decoders.
    pub fn take_checkpoints(&mut self) -> Option<Vec<Checkpoint>> {
        match self {
            Decoder::GzipIndexed(d) => Some(d.take_checkpoints()),
            Decoder::ZstdIndexed(d) => Some(d.take_checkpoints()),
            _ => None,
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::GzipIndexed(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::ZstdIndexed(d) => d.read(buf),
        }
    }
}

/// Opens a decompressed sequential reader over a layer blob.
pub fn open_decoded(
    blob: &Blob,
    compression: Compression,
) -> io::Result<Decoder<BufReader<BlobReader>>> {
    Decoder::new(
        BufReader::with_capacity(256 * 1024, blob.reader()),
        compression,
    )
}

/// `sha256:<hex>` of a finished hasher.
pub fn digest_string(hasher: Sha256) -> String {
    let out = hasher.finalize();
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in out.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// `sha256:<hex>` of a byte slice.
pub fn sha256_of(bytes: &[u8]) -> String {
    digest_string(Sha256::new_with_prefix(bytes))
}

/// A reader that hashes and counts what passes through it.
pub struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R> HashReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The digest and byte count of everything read so far, and the inner reader.
    pub fn finish(self) -> (String, u64, R) {
        (digest_string(self.hasher), self.count, self.inner)
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for HashReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        if let Ok(buf) = self.inner.fill_buf() {
            // fill_buf after a successful fill returns the same buffer without I/O.
            self.hasher.update(&buf[..amt]);
        }
        self.count += amt as u64;
        self.inner.consume(amt);
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> HashWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The digest and byte count of everything written, and the inner writer.
    pub fn finish(self) -> (String, u64, W) {
        (digest_string(self.hasher), self.count, self.inner)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
