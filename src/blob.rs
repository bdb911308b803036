//! Blobs: byte ranges of a file (a layout's blob file or a member of an archive), read with
//! positioned reads, and the decompressors and digesters that wrap them.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Set for a registry blob fetched on demand: reads fetch and verify their spans first.
    lazy: Option<Arc<Lazy>>,
    /// Set for a registry blob read through its own table of contents: file contents come
    /// from its verified chunks, never from this blob's (empty, local) file.
    toc: Option<Arc<crate::toc::Toc>>,
}

/// Blob bytes covered by one span digest: what a lazy read fetches and verifies at a time.
pub const SPAN_BYTES: u64 = 256 * 1024;

/// Spans fetched at once when a read needs fewer: neighbouring reads (a decompressor's next
/// input buffer) then cost no request of their own.
const MIN_FETCH_SPANS: usize = 2;

/// The sha256 of every [`SPAN_BYTES`] of a blob (the last span may be shorter), recorded by
/// the indexing pass, which reads every byte anyway: a lazy read can check the bytes it
/// fetched without the rest of the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanDigests {
    /// The blob's length.
    pub blob_len: u64,
    /// One digest per span, in order.
    pub digests: Vec<[u8; 32]>,
}

impl SpanDigests {
    /// Checked: exactly one digest per span of a blob of `blob_len` bytes.
    pub fn new(blob_len: u64, digests: Vec<[u8; 32]>) -> Option<Self> {
        (digests.len() as u64 == blob_len.div_ceil(SPAN_BYTES))
            .then_some(SpanDigests { blob_len, digests })
    }
}

/// Builds [`SpanDigests`] from a blob's bytes, fed in order in pieces of any size.
#[derive(Default)]
pub struct SpanHasher {
    hasher: Sha256,
    filled: u64,
    len: u64,
    digests: Vec<[u8; 32]>,
}

impl SpanHasher {
    /// Hashes the next bytes of the blob.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = bytes.len().min((SPAN_BYTES - self.filled) as usize);
            self.hasher.update(&bytes[..take]);
            self.filled += take as u64;
            self.len += take as u64;
            bytes = &bytes[take..];
            if self.filled == SPAN_BYTES {
                self.digests.push(self.hasher.finalize_reset().into());
                self.filled = 0;
            }
        }
    }

    /// The digests of everything fed.
    pub fn finish(mut self) -> SpanDigests {
        if self.filled > 0 {
            self.digests.push(self.hasher.finalize().into());
        }
        SpanDigests {
            blob_len: self.len,
            digests: self.digests,
        }
    }
}

/// Fetches bytes `[start, end)` of a remote blob (an HTTP range request).
pub type FetchRange = dyn Fn(u64, u64) -> io::Result<Vec<u8>> + Send + Sync;

/// A blob whose bytes are fetched when first read, a few spans at a time, each checked
/// against its span digest before it is written to the local (sparse) file the blob reads
/// from, so a re-read is local and unverified bytes are never read. A span that fails its
/// check is an error for that read and is not kept: a later read fetches it again.
pub struct Lazy {
    spans: SpanDigests,
    fetch: Box<FetchRange>,
    /// The blob's local file, for writing verified spans.
    file: File,
    name: String,
    /// Per span: (in the file, being fetched by some reader).
    state: Mutex<Vec<(bool, bool)>>,
    fetched_cond: Condvar,
    fetched: AtomicU64,
    requests: AtomicU64,
}

impl fmt::Debug for Lazy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lazy({})", self.name)
    }
}

impl Lazy {
    /// A blob of `spans.blob_len` bytes to be fetched by `fetch` into `file` (opened for
    /// writing, of the blob's length, empty), called `name` in messages.
    pub fn new(file: File, spans: SpanDigests, name: &str, fetch: Box<FetchRange>) -> Self {
        let n = spans.digests.len();
        Lazy {
            spans,
            fetch,
            file,
            name: name.into(),
            state: Mutex::new(vec![(false, false); n]),
            fetched_cond: Condvar::new(),
            fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// Bytes fetched and requests made so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.fetched.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    /// Makes bytes `[pos, end)` of the blob local: fetches and verifies the spans that are
    /// not, once, however many readers want them.
    pub fn ensure(&self, pos: u64, end: u64) -> io::Result<()> {
        self.ensure_spans(pos, end, MIN_FETCH_SPANS)
    }

    /// Makes the first bytes of the blob local (its magic number), fetching no more than
    /// the first span: a mount opens every layer, and may read nothing else of most.
    pub fn fetch_start(&self) -> io::Result<()> {
        self.ensure_spans(0, 4, 1)
    }

    /// [`Lazy::ensure`], fetching at least `min_spans` spans when it fetches any.
    fn ensure_spans(&self, pos: u64, end: u64, min_spans: usize) -> io::Result<()> {
        let n = self.spans.digests.len();
        if end <= pos || n == 0 {
            return Ok(());
        }
        let first = (pos / SPAN_BYTES) as usize;
        let last = (((end - 1) / SPAN_BYTES) as usize).min(n - 1);
        loop {
            let (a, b) = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let Some(a) = (first..=last).find(|&i| !s[i].0) else {
                        return Ok(());
                    };
                    if s[a].1 {
                        s = self.fetched_cond.wait(s).unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    let mut b = a + 1;
                    while b < n && !s[b].0 && !s[b].1 && (b <= last || b < a + min_spans) {
                        b += 1;
                    }
                    for span in &mut s[a..b] {
                        span.1 = true;
                    }
                    break (a, b);
                }
            };
            let r = self.fetch_spans(a, b);
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for span in &mut s[a..b] {
                *span = (r.is_ok(), false);
            }
            self.fetched_cond.notify_all();
            r?;
        }
    }

    /// Fetches spans `a..b`, checks each, and writes them to the file.
    fn fetch_spans(&self, a: usize, b: usize) -> io::Result<()> {
        let start = a as u64 * SPAN_BYTES;
        let end = (b as u64 * SPAN_BYTES).min(self.spans.blob_len);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = (self.fetch)(start, end)?;
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if bytes.len() as u64 != end - start {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: asked for bytes {start}-{} and got {} bytes",
                    self.name,
                    end - 1,
                    bytes.len()
                ),
            ));
        }
        for (i, span) in bytes.chunks(SPAN_BYTES as usize).enumerate() {
            let found: [u8; 32] = Sha256::digest(span).into();
            if found != self.spans.digests[a + i] {
                let at = start + i as u64 * SPAN_BYTES;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: bytes {at}-{} do not match the layer index's span digest",
                        self.name,
                        at + span.len() as u64 - 1
                    ),
                ));
            }
        }
        self.file.write_all_at(&bytes, start)
    }
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
            lazy: None,
            toc: None,
        }
    }

    /// The same blob, read from a local file that holds only the spans fetched so far:
    /// reads fetch (and verify) the spans they need first.
    pub fn lazy(mut self, lazy: Arc<Lazy>) -> Self {
        self.lazy = Some(lazy);
        self
    }

    /// True for a blob fetched on demand (see [`Blob::lazy`] and [`Blob::with_toc`]).
    pub fn is_lazy(&self) -> bool {
        self.lazy.is_some() || self.toc.is_some()
    }

    /// The same blob, read through its verified table of contents (`crate::toc`).
    pub fn with_toc(mut self, toc: Arc<crate::toc::Toc>) -> Self {
        self.toc = Some(toc);
        self
    }

    /// The table of contents this blob is read through, if any.
    pub fn toc(&self) -> Option<&Arc<crate::toc::Toc>> {
        self.toc.as_ref()
    }

    /// Logs what a blob fetched on demand has fetched so far (nothing for other blobs).
    pub fn log_fetched(&self) {
        if let Some(t) = &self.toc {
            let (bytes, requests) = t.stats();
            log::info!(
                "{}: fetched {bytes} of {} bytes in {requests} range requests ({} TOC)",
                t.name(),
                self.len,
                t.format
            );
        }
        if let Some(l) = &self.lazy {
            let (bytes, requests) = l.stats();
            log::info!(
                "{}: fetched {bytes} of {} bytes in {requests} range requests",
                l.name,
                l.spans.blob_len
            );
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
        self.check_not_toc()?;
        if let Some(a) = &self.arrival {
            a.wait(pos + n as u64)?;
        }
        if let Some(l) = &self.lazy {
            l.ensure(pos, pos + n as u64)?;
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
        self.check_not_toc()?;
        if let Some(a) = &self.arrival {
            a.wait(pos + buf.len() as u64)?;
        }
        if let Some(l) = &self.lazy {
            l.ensure(pos, pos + buf.len() as u64)?;
        }
        self.file.read_exact_at(buf, self.offset + pos)
    }

    /// A blob read through its TOC has an empty local file: its bytes come only by
    /// [`crate::toc::Toc::read`], verified, never from here.
    fn check_not_toc(&self) -> io::Result<()> {
        match &self.toc {
            Some(t) => Err(io::Error::other(format!(
                "{}: read only through its {} TOC",
                self.name, t.format
            ))),
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn noise(n: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn spans_of(data: &[u8]) -> SpanDigests {
        let mut h = SpanHasher::default();
        // Pieces that straddle span boundaries.
        for piece in data.chunks(100_003) {
            h.update(piece);
        }
        h.finish()
    }

    /// The ranges a test server was asked for.
    type Asked = Arc<Mutex<Vec<(u64, u64)>>>;

    /// A lazy blob over `data`, served by a closure that records its ranges and
    /// flips a byte while `lie` is set.
    fn lazy_blob(data: Arc<Vec<u8>>, lie: Arc<AtomicBool>) -> (Blob, Arc<Lazy>, Asked) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let file = File::create(&path).unwrap();
        file.set_len(data.len() as u64).unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (d, a) = (data.clone(), asked.clone());
        let fetch = Box::new(move |start: u64, end: u64| {
            a.lock().unwrap().push((start, end));
            let mut out = d[start as usize..end as usize].to_vec();
            if lie.load(Ordering::Relaxed) {
                out[0] ^= 1;
            }
            Ok(out)
        });
        let lazy = Arc::new(Lazy::new(file, spans_of(&data), "test", fetch));
        let read = Arc::new(File::open(&path).unwrap());
        let blob = Blob::new(read, 0, data.len() as u64, "test").lazy(lazy.clone());
        (blob, lazy, asked)
    }

    #[test]
    fn span_digests_match_one_pass_hashing() {
        let data = noise(SPAN_BYTES as usize * 2 + 5);
        let spans = spans_of(&data);
        assert_eq!(spans.blob_len, data.len() as u64);
        let want: Vec<[u8; 32]> = data
            .chunks(SPAN_BYTES as usize)
            .map(|c| Sha256::digest(c).into())
            .collect();
        assert_eq!(spans.digests, want);
        assert!(SpanDigests::new(data.len() as u64, want[..2].to_vec()).is_none());
    }

    #[test]
    fn lazy_reads_fetch_only_their_spans_once_and_check_them() {
        let data = Arc::new(noise(SPAN_BYTES as usize * 8 + 77));
        let lie = Arc::new(AtomicBool::new(false));
        let (blob, lazy, asked) = lazy_blob(data.clone(), lie.clone());
        let at = SPAN_BYTES * 5 + 10;
        let mut buf = vec![0; 1000];
        blob.read_exact_at(&mut buf, at).unwrap();
        assert_eq!(buf, data[at as usize..at as usize + 1000]);
        // Span 5 and the one after it (a neighbouring read is likely), in one request.
        assert_eq!(
            *asked.lock().unwrap(),
            vec![(SPAN_BYTES * 5, SPAN_BYTES * 7)]
        );
        // Again, and from several threads: local, no request.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut buf = vec![0; 1000];
                    blob.read_exact_at(&mut buf, at + 5).unwrap();
                });
            }
        });
        assert_eq!(asked.lock().unwrap().len(), 1);
        // A lying server: an error, nothing kept; once it behaves, the right bytes.
        lie.store(true, Ordering::Relaxed);
        let err = blob.read_exact_at(&mut buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        lie.store(false, Ordering::Relaxed);
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data[..1000]);
        // The short last span.
        let end = data.len() as u64;
        let mut tail = vec![0; 77];
        blob.read_exact_at(&mut tail, end - 77).unwrap();
        assert_eq!(tail, data[data.len() - 77..]);
        let (bytes, requests) = lazy.stats();
        // Spans 5-6, 0-1 twice (the lie is fetched, not kept), and the last one.
        assert_eq!((bytes, requests), (SPAN_BYTES * 6 + 77, 4));
    }

    #[test]
    fn concurrent_readers_of_one_span_fetch_it_once() {
        let data = Arc::new(noise(SPAN_BYTES as usize * 4));
        let (blob, _lazy, asked) = lazy_blob(data.clone(), Arc::new(AtomicBool::new(false)));
        std::thread::scope(|s| {
            for i in 0..8u64 {
                let blob = &blob;
                let data = &data;
                s.spawn(move || {
                    let mut buf = vec![0; 100];
                    let at = SPAN_BYTES + i * 1000;
                    blob.read_exact_at(&mut buf, at).unwrap();
                    assert_eq!(buf, data[at as usize..at as usize + 100]);
                });
            }
        });
        assert_eq!(*asked.lock().unwrap(), vec![(SPAN_BYTES, SPAN_BYTES * 3)]);
    }
}
