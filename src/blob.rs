//! Blobs: byte ranges of a file (a layout's blob file or a member of an archive), read with
//! positioned reads, and the decompressors and digesters that wrap them.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// Called once when every span of a lazy blob is in its file (to check the whole blob and
/// keep it as a full one).
pub type OnComplete = dyn Fn() + Send + Sync;

/// At most this many times [`MIN_FETCH_SPANS`] is fetched at once when reads of a blob are
/// sequential (each starts where the last ended): the fetch doubles with each sequential
/// fetch after the second, so a long read makes few requests, and a decompressor walking from
/// a checkpoint to one small file fetches little more than it reads.
const READAHEAD_SHIFT: u32 = 2;

/// Bytes beyond a reader going through a blob in order that the read-ahead thread keeps
/// fetched ([`Lazy::read_ahead_in_background`]).
const AHEAD_BYTES: u64 = 12 << 20;

/// Bytes the read-ahead thread asks for in one request.
const AHEAD_RUN: u64 = 4 << 20;

/// Spans a background prefetch asks for in one request: small enough that a foreground read
/// arriving meanwhile waits for at most this much of someone else's transfer.
const PREFETCH_SPANS: usize = 4;

/// Blobs up to this size are checked and kept whole by the reader that completes them; larger
/// ones on a thread of their own, so that reader does not wait for a whole-blob hash.
const INLINE_COMPLETE: u64 = 4 << 20;

/// Foreground reads waiting for the network (or for another reader's fetch), process-wide: a background prefetch holds back
/// while there are any, so the reads that someone waits for go first.
static FOREGROUND: AtomicUsize = AtomicUsize::new(0);

/// A span's state in [`Lazy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Span {
    /// Not in the file.
    Absent,
    /// In the file by the span map of an earlier mount; hashed again before first use.
    Stored,
    /// In the file and checked in this process.
    Local,
    /// Being fetched or checked by some reader.
    Busy,
}

/// What a lazy blob has cost so far, for `-v` and `flatfs stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LazyStats {
    /// The blob's length.
    pub blob_bytes: u64,
    /// Bytes of the blob in the local file (checked this run or recorded by an earlier one).
    pub local_bytes: u64,
    /// Bytes received from the registry (foreground and prefetch).
    pub fetched_bytes: u64,
    /// Range requests made.
    pub requests: u64,
    /// Of those bytes, fetched by the background prefetch.
    pub prefetched_bytes: u64,
    /// Reads whose spans were all local.
    pub span_hits: u64,
    /// Reads that had to fetch (or wait for another reader's fetch).
    pub span_misses: u64,
    /// Spans found in the file from an earlier mount and checked again before use.
    pub spans_reused: u64,
    /// Time reads spent waiting for the network, milliseconds (summed over readers).
    pub blocked_ms: u64,
    /// Every span is local (and the blob was kept whole, if it has a store).
    pub complete: bool,
}

/// A blob whose bytes are fetched when first read, a few spans at a time, each checked
/// against its span digest before it is written to the local (sparse) file the blob reads
/// from, so a re-read is local and unverified bytes are never read. A span that fails its
/// check is an error for that read and is not kept: a later read fetches it again.
///
/// With a span map ([`Lazy::with_map`]) the file outlives the process: the map holds one byte
/// per span, set only after that span's checked bytes are flushed to disk, so a crash leaves
/// at worst a span fetched again. A span recorded by an earlier process is hashed again before
/// its first use here (the file could have been damaged since): the cache is only ever a
/// shortcut to bytes that still match the index's digests.
pub struct Lazy {
    spans: SpanDigests,
    fetch: Box<FetchRange>,
    /// The blob's local file, for writing verified spans.
    file: File,
    name: String,
    /// One byte per span, 1 once the span's checked bytes are durably in `file`.
    map: Option<File>,
    on_complete: Option<Arc<OnComplete>>,
    state: Mutex<SpanTable>,
    fetched_cond: Condvar,
    /// Where the last foreground read ended, to see sequential reads.
    last_end: AtomicU64,
    /// Fetches made by sequential reads in a row.
    seq_run: AtomicU32,
    fetched: AtomicU64,
    requests: AtomicU64,
    prefetched: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    reused: AtomicU64,
    blocked_ns: AtomicU64,
    /// The compression the manifest says, which the first span's magic must match.
    expect: std::sync::OnceLock<Compression>,
    /// Where a reader going through the blob in order has got to (set, and signalled, for
    /// the read-ahead thread).
    ahead: Arc<(Mutex<Option<u64>>, Condvar)>,
    /// This blob, for the read-ahead thread, once [`Lazy::read_ahead_in_background`] allows it.
    me: std::sync::OnceLock<std::sync::Weak<Lazy>>,
    /// The process the read-ahead thread was started in (0: none yet). A mount forks after
    /// opening the image, and a thread does not cross a fork (nor may one exist then).
    worker_pid: AtomicU32,
}

/// The spans' states, and how many are in the file (`Stored` or `Local`).
struct SpanTable {
    spans: Vec<Span>,
    in_file: usize,
    completed: bool,
    /// When each span's last fetch failed for want of the registry (not a bad check), and
    /// that error: see [`FAIL_FAST`].
    failed: Vec<Option<Instant>>,
    failure: String,
}

/// How long a span whose fetch failed for want of the registry fails again at once, with no
/// new request. The kernel retries a failed read (its readahead, then the page itself), which
/// would otherwise double a reader's wait on a silent registry; after this, a read asks again,
/// so the mount recovers when the registry is back.
pub(crate) const FAIL_FAST: Duration = Duration::from_secs(2);

impl fmt::Debug for Lazy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lazy({})", self.name)
    }
}

/// Whose read it is: a reader waits for it, or the background prefetch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Reader,
    Prefetch,
}

impl Lazy {
    /// A blob of `spans.blob_len` bytes to be fetched by `fetch` into `file` (opened for
    /// reading and writing, of the blob's length, empty), called `name` in messages.
    pub fn new(file: File, spans: SpanDigests, name: &str, fetch: Box<FetchRange>) -> Self {
        let n = spans.digests.len();
        Lazy {
            spans,
            fetch,
            file,
            name: name.into(),
            map: None,
            on_complete: None,
            state: Mutex::new(SpanTable {
                spans: vec![Span::Absent; n],
                in_file: 0,
                completed: n == 0,
                failed: vec![None; n],
                failure: String::new(),
            }),
            fetched_cond: Condvar::new(),
            last_end: AtomicU64::new(u64::MAX),
            seq_run: AtomicU32::new(0),
            fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            blocked_ns: AtomicU64::new(0),
            expect: std::sync::OnceLock::new(),
            ahead: Default::default(),
            me: std::sync::OnceLock::new(),
            worker_pid: AtomicU32::new(0),
        }
    }

    /// Keeps the record of spans in `map` (one byte per span, as many bytes as spans): spans
    /// it marks are taken as in the file (checked again before first use), and spans checked
    /// from now on are marked in it once flushed.
    pub fn with_map(mut self, map: File) -> io::Result<Self> {
        let n = self.spans.digests.len();
        let mut marks = vec![0u8; n];
        let got = map.read_at(&mut marks, 0)?;
        {
            let table = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            for (i, &m) in marks[..got].iter().enumerate() {
                if m == 1 {
                    table.spans[i] = Span::Stored;
                    table.in_file += 1;
                }
            }
        }
        self.map = Some(map);
        Ok(self)
    }

    /// Runs `done` once every span is in the file (now, if it already is; else from the read
    /// that brings the last one, on a thread of its own for a big blob).
    pub fn on_complete(mut self, done: Arc<OnComplete>) -> Self {
        self.on_complete = Some(done);
        self
    }

    /// True when every span is in the file (checked in this process or recorded earlier).
    pub fn all_in_file(&self) -> bool {
        let t = self.state.lock().unwrap_or_else(|e| e.into_inner());
        t.in_file == self.spans.digests.len()
    }

    /// Bytes fetched and requests made so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.fetched.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    /// Everything counted so far.
    pub fn full_stats(&self) -> LazyStats {
        let (in_file, complete) = {
            let t = self.state.lock().unwrap_or_else(|e| e.into_inner());
            (t.in_file, t.completed)
        };
        let n = self.spans.digests.len();
        let local_bytes = if in_file == n {
            self.spans.blob_len
        } else {
            // Only the last span is short, and it is then counted at most once too many.
            (in_file as u64 * SPAN_BYTES).min(self.spans.blob_len)
        };
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LazyStats {
            blob_bytes: self.spans.blob_len,
            local_bytes,
            fetched_bytes: r(&self.fetched),
            requests: r(&self.requests),
            prefetched_bytes: r(&self.prefetched),
            span_hits: r(&self.hits),
            span_misses: r(&self.misses),
            spans_reused: r(&self.reused),
            blocked_ms: r(&self.blocked_ns) / 1_000_000,
            complete,
        }
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes bytes `[pos, end)` of the blob local: fetches and verifies the spans that are
    /// not, once, however many readers want them. Reads that carry on where the last one
    /// ended fetch a few spans ahead.
    pub fn ensure(&self, pos: u64, end: u64) -> io::Result<()> {
        let last = self.last_end.swap(end, Ordering::Relaxed);
        let sequential = last != u64::MAX && pos <= last && last < pos.saturating_add(SPAN_BYTES);
        let run = if sequential {
            self.seq_run.load(Ordering::Relaxed)
        } else {
            self.seq_run.store(0, Ordering::Relaxed);
            0
        };
        let ahead = MIN_FETCH_SPANS << run.saturating_sub(1).min(READAHEAD_SHIFT);
        let before = self.requests.load(Ordering::Relaxed);
        if sequential && run > READAHEAD_SHIFT {
            // At full stride: the read-ahead thread keeps the next MiBs coming meanwhile.
            let (at, wake) = &*self.ahead;
            *at.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);
            wake.notify_one();
            self.start_read_ahead();
        }
        let r = self.ensure_spans(pos, end, ahead, Who::Reader);
        if sequential && self.requests.load(Ordering::Relaxed) != before {
            self.seq_run.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Lets a thread keep [`AHEAD_BYTES`] beyond a reader going through the blob in order
    /// fetched (and checked), a run at a time, so the network works while the reader
    /// decompresses (a `tar` of a lazy mount, an export). The thread starts with the first
    /// such reader (so after the mount's fork) and ends once the blob is dropped.
    pub fn read_ahead_in_background(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Starts the read-ahead thread in this process, if allowed and not yet done.
    fn start_read_ahead(&self) {
        let pid = std::process::id();
        if self.worker_pid.swap(pid, Ordering::Relaxed) == pid {
            return;
        }
        let Some(lazy) = self.me.get().cloned() else {
            return;
        };
        let ahead = self.ahead.clone();
        let worker = move || {
            loop {
                let at = {
                    let mut at = ahead.0.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if let Some(pos) = at.take() {
                            break pos;
                        }
                        if lazy.strong_count() == 0 {
                            return;
                        }
                        at = ahead
                            .1
                            .wait_timeout(at, Duration::from_secs(1))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                };
                let Some(lazy) = lazy.upgrade() else { return };
                let len = lazy.spans.blob_len;
                let mut pos = at;
                while pos < at.saturating_add(AHEAD_BYTES).min(len) {
                    let end = (pos + AHEAD_RUN).min(len);
                    // A failure is the reader's to meet and report when it gets there.
                    if lazy.ensure_spans(pos, end, 1, Who::Prefetch).is_err() {
                        break;
                    }
                    pos = end;
                    // The reader has moved on: start again from where it is now.
                    if ahead.0.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        break;
                    }
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("lazy-read-ahead".into())
            .spawn(worker)
        {
            log::warn!("{}: no background read-ahead: {e}", self.name);
        }
    }

    /// Records the compression the blob is read with, taken from its media type before its
    /// first bytes are here: the first span fetched must start with its magic number.
    pub fn expect_compression(&self, c: Compression) {
        let _ = self.expect.set(c);
    }

    /// Makes the first bytes of the blob local (its magic number), fetching no more than
    /// the first span: a mount opens every layer, and may read nothing else of most.
    pub fn fetch_start(&self) -> io::Result<()> {
        self.ensure_spans(0, 4, 1, Who::Reader)
    }

    /// Fetches every span not yet local, in order, a few per request and one request at a
    /// time, holding back while foreground reads wait for the network. A failing request is
    /// tried again after a pause that grows (the registry may be away for a while); a span
    /// that keeps failing its check is left to the reads that need it.
    pub fn prefetch_all(&self) {
        let n = self.spans.digests.len();
        let mut span = 0;
        let mut failures = 0u32;
        while span < n {
            while FOREGROUND.load(Ordering::Relaxed) > 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let pos = span as u64 * SPAN_BYTES;
            let end = ((span + PREFETCH_SPANS) as u64 * SPAN_BYTES).min(self.spans.blob_len);
            match self.ensure_spans(pos, end, PREFETCH_SPANS, Who::Prefetch) {
                Ok(()) => {
                    span += PREFETCH_SPANS;
                    failures = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData && failures >= 3 => {
                    log::warn!("prefetch: {e}; skipped");
                    span += PREFETCH_SPANS;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    let wait = std::time::Duration::from_secs(1 << failures.min(5));
                    log::warn!("prefetch: {e}; trying again in {wait:?}");
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// [`Lazy::ensure`], fetching at least `min_spans` spans when it fetches any.
    fn ensure_spans(&self, pos: u64, end: u64, min_spans: usize, who: Who) -> io::Result<()> {
        let n = self.spans.digests.len();
        if end <= pos || n == 0 {
            return Ok(());
        }
        let first = (pos / SPAN_BYTES) as usize;
        let last = (((end - 1) / SPAN_BYTES) as usize).min(n - 1);
        let mut waited: Option<Waiting> = None;
        let r = self.ensure_loop(first, last, min_spans, who, &mut waited);
        if who == Who::Reader {
            match waited {
                None => self.hits.fetch_add(1, Ordering::Relaxed),
                Some(w) => {
                    let ns = u64::try_from(w.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    self.blocked_ns.fetch_add(ns, Ordering::Relaxed);
                    self.misses.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        r
    }

    fn ensure_loop(
        &self,
        first: usize,
        last: usize,
        min_spans: usize,
        who: Who,
        waited: &mut Option<Waiting>,
    ) -> io::Result<()> {
        let n = self.spans.digests.len();
        loop {
            let job = {
                let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let Some(a) = (first..=last).find(|&i| t.spans[i] != Span::Local) else {
                        return Ok(());
                    };
                    match t.spans[a] {
                        Span::Busy => {
                            waited.get_or_insert_with(|| Waiting::new(who));
                            t = self.fetched_cond.wait(t).unwrap_or_else(|e| e.into_inner());
                        }
                        Span::Stored => {
                            t.spans[a] = Span::Busy;
                            break Err(a);
                        }
                        _ if who == Who::Reader
                            && t.failed[a].is_some_and(|at| at.elapsed() < FAIL_FAST) =>
                        {
                            return Err(io::Error::other(format!(
                                "{} (less than {FAIL_FAST:?} ago; not asking again yet)",
                                t.failure
                            )));
                        }
                        _ => {
                            let b = fetch_run(&t.spans, a, last, min_spans);
                            // Spans of the run this reader fetches; a local gap in it is
                            // fetched again (and checked) but not rewritten.
                            let mine: Vec<bool> =
                                t.spans[a..b].iter().map(|&s| s == Span::Absent).collect();
                            for (s, &m) in t.spans[a..b].iter_mut().zip(&mine) {
                                if m {
                                    *s = Span::Busy;
                                }
                            }
                            break Ok((a, b, mine));
                        }
                    }
                }
            };
            match job {
                // A span an earlier mount stored: hash it from the file (local, no wait worth
                // counting); if it no longer matches, it is fetched like any other.
                Err(a) => {
                    let ok = self.check_stored(a);
                    let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    if ok {
                        t.spans[a] = Span::Local;
                        self.reused.fetch_add(1, Ordering::Relaxed);
                    } else {
                        t.spans[a] = Span::Absent;
                        t.in_file -= 1;
                    }
                    self.fetched_cond.notify_all();
                }
                Ok((a, b, mine)) => {
                    waited.get_or_insert_with(|| Waiting::new(who));
                    let r = self.fetch_spans(a, b, &mine, who);
                    let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    for (s, &m) in t.spans[a..b].iter_mut().zip(&mine) {
                        if m {
                            *s = if r.is_ok() { Span::Local } else { Span::Absent };
                        }
                    }
                    // A bad span is asked for again at once (the next answer may be right);
                    // a registry that is away, not for a moment.
                    let away = r
                        .as_ref()
                        .err()
                        .filter(|e| e.kind() != io::ErrorKind::InvalidData);
                    let mark = away.map(|_| Instant::now());
                    for (f, &m) in t.failed[a..b].iter_mut().zip(&mine) {
                        if m {
                            *f = mark;
                        }
                    }
                    if let Some(e) = away {
                        t.failure = e.to_string();
                    }
                    if r.is_ok() {
                        t.in_file += mine.iter().filter(|&&m| m).count();
                    }
                    let complete = t.in_file == n && !t.completed;
                    if complete {
                        t.completed = true;
                    }
                    self.fetched_cond.notify_all();
                    drop(t);
                    if complete {
                        self.completed();
                    }
                    r?;
                }
            }
        }
    }

    /// Every span is in the file: hand over to whoever keeps the blob whole.
    fn completed(&self) {
        let Some(done) = self.on_complete.clone() else {
            return;
        };
        if self.spans.blob_len <= INLINE_COMPLETE {
            done();
        } else if std::thread::Builder::new()
            .name("flatfs-complete".into())
            .spawn(move || done())
            .is_err()
        {
            log::warn!(
                "{}: cannot start a thread to keep the blob whole",
                self.name
            );
        }
    }

    /// Whether span `i`, recorded by an earlier process, still matches its digest in the file.
    fn check_stored(&self, i: usize) -> bool {
        let start = i as u64 * SPAN_BYTES;
        let len = SPAN_BYTES.min(self.spans.blob_len - start) as usize;
        let mut buf = vec![0; len];
        let ok = self.file.read_exact_at(&mut buf, start).is_ok()
            && <[u8; 32]>::from(Sha256::digest(&buf)) == self.spans.digests[i];
        if !ok {
            log::warn!(
                "{}: the stored bytes {start}-{} no longer match their span digest; fetching \
                 them again",
                self.name,
                start + len as u64 - 1
            );
            if let Some(map) = &self.map {
                let _ = map.write_all_at(&[0], i as u64);
            }
        }
        ok
    }

    /// Fetches spans `a..b`, checks each, and writes those this reader owns (`mine`) to the
    /// file (and, once flushed there, marks them in the span map).
    fn fetch_spans(&self, a: usize, b: usize, mine: &[bool], who: Who) -> io::Result<()> {
        let start = a as u64 * SPAN_BYTES;
        let end = (b as u64 * SPAN_BYTES).min(self.spans.blob_len);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = (self.fetch)(start, end)?;
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if who == Who::Prefetch {
            self.prefetched
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
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
        if let Some(&want) = self.expect.get().filter(|_| a == 0) {
            let found = Compression::of_magic(&bytes);
            if found != want {
                log::error!(
                    "{}: the blob starts as {found:?} but its media type says {want:?}; \
                     its reads fail",
                    self.name
                );
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: the blob starts as {found:?} but its media type says {want:?}",
                        self.name
                    ),
                ));
            }
        }
        for (i, span) in bytes.chunks(SPAN_BYTES as usize).enumerate() {
            if mine[i] {
                self.file
                    .write_all_at(span, start + i as u64 * SPAN_BYTES)?;
            }
        }
        if let Some(map) = &self.map {
            // The bytes first, durably; only then the marks that say they are there. A map
            // that cannot be written costs a refetch next time, not this read.
            let marked = self.file.sync_data().and_then(|()| {
                (a..b)
                    .filter(|i| mine[i - a])
                    .try_for_each(|i| map.write_all_at(&[1], i as u64))
            });
            if let Err(e) = marked {
                log::warn!("{}: cannot record the fetched spans: {e}", self.name);
            }
        }
        Ok(())
    }
}

/// Local spans a fetch for one read may span to take the absent ones on either side in one
/// request: a round trip costs more than 256 KiB fetched again.
const NEAR_GAP: usize = 1;

/// The end of the run of spans one fetch takes, starting at absent span `a`, for a read whose
/// last span is `last`: absent spans through `last` (and on to `min_spans` of them), plus gaps
/// of at most [`NEAR_GAP`] local spans between absent ones within the read. Spans being
/// fetched or checked by others, and spans stored by an earlier process, end the run.
fn fetch_run(spans: &[Span], a: usize, last: usize, min_spans: usize) -> usize {
    let n = spans.len();
    let mut b = a + 1;
    loop {
        if b < n && spans[b] == Span::Absent && (b <= last || b < a + min_spans) {
            b += 1;
            continue;
        }
        let mut g = b;
        while g < n && g <= last && g - b < NEAR_GAP && spans[g] == Span::Local {
            g += 1;
        }
        if g > b && g <= last && g < n && spans[g] == Span::Absent {
            b = g;
            continue;
        }
        return b;
    }
}

/// True while some foreground read waits for the network: background prefetches (also a TOC
/// layer's landmark prefetch) hold back meanwhile.
pub(crate) fn foreground_waiting() -> bool {
    FOREGROUND.load(Ordering::Relaxed) > 0
}

/// A foreground read of a TOC layer waiting for the network, counted in [`FOREGROUND`] while
/// it lives (as a lazy blob's reads are), so that prefetches give way to it.
pub(crate) struct ForegroundWait {
    _waiting: Waiting,
}

impl ForegroundWait {
    /// Counts one waiting read until dropped.
    pub(crate) fn new() -> Self {
        ForegroundWait {
            _waiting: Waiting::new(Who::Reader),
        }
    }
}

/// A read waiting for the network: since when, and (for a foreground read) counted in
/// [`FOREGROUND`] while it lives, so the prefetch gives way.
struct Waiting {
    since: std::time::Instant,
    foreground: bool,
}

impl Waiting {
    fn new(who: Who) -> Self {
        let foreground = who == Who::Reader;
        if foreground {
            FOREGROUND.fetch_add(1, Ordering::Relaxed);
        }
        Waiting {
            since: std::time::Instant::now(),
            foreground,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.foreground {
            FOREGROUND.fetch_sub(1, Ordering::Relaxed);
        }
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

    /// The fetching state of a blob fetched on demand (`None` for other blobs).
    pub fn lazy_handle(&self) -> Option<&Arc<Lazy>> {
        self.lazy.as_ref()
    }

    /// Logs what a blob fetched on demand has fetched so far (nothing for other blobs).
    pub fn log_fetched(&self) {
        if let Some(t) = &self.toc {
            let (bytes, requests) = t.stats();
            log::info!(
                "{}: fetched {bytes} of {} bytes in {requests} range requests ({} ahead of \
                 the reads; {} TOC); {} bytes of chunks read from the blob store",
                t.name(),
                self.len,
                t.requests_ahead(),
                t.format,
                t.local_bytes()
            );
        }
        if let Some(l) = &self.lazy {
            let s = l.full_stats();
            log::info!(
                "{}: fetched {} of {} bytes in {} range requests ({} prefetched); {} bytes \
                 local; {} reads local, {} waited {} ms for the network; {} spans reused \
                 from the cache",
                l.name,
                s.fetched_bytes,
                s.blob_bytes,
                s.requests,
                s.prefetched_bytes,
                s.local_bytes,
                s.span_hits,
                s.span_misses,
                s.blocked_ms,
                s.spans_reused
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
        Ok(Self::of_magic(&magic[..n]))
    }

    /// The compression whose magic number `start` (a blob's first bytes) begins with.
    pub fn of_magic(start: &[u8]) -> Self {
        match start {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
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
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
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
    fn a_span_the_registry_failed_fails_again_at_once_then_is_asked_again() {
        let data = Arc::new(noise(SPAN_BYTES as usize * 4));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(data.len() as u64).unwrap();
        let away = Arc::new(AtomicBool::new(true));
        let asked: Asked = Arc::default();
        let (d, a, gone) = (data.clone(), asked.clone(), away.clone());
        let fetch = Box::new(move |start: u64, end: u64| {
            a.lock().unwrap().push((start, end));
            if gone.load(Ordering::Relaxed) {
                return Err(io::Error::other("connection refused"));
            }
            Ok(d[start as usize..end as usize].to_vec())
        });
        let lazy = Arc::new(Lazy::new(file, spans_of(&data), "test", fetch));
        let blob = Blob::new(
            Arc::new(File::open(&path).unwrap()),
            0,
            data.len() as u64,
            "t",
        )
        .lazy(lazy.clone());
        let mut buf = vec![0; 1000];
        let err = blob.read_exact_at(&mut buf, 10).unwrap_err();
        assert!(err.to_string().contains("connection refused"), "{err}");
        // The kernel's retry of the same page: the same error, no new request.
        let err = blob.read_exact_at(&mut buf, 4096).unwrap_err();
        assert!(err.to_string().contains("not asking again yet"), "{err}");
        assert_eq!(asked.lock().unwrap().len(), 1);
        // Back, and the window over: the read asks again and gets the bytes.
        away.store(false, Ordering::Relaxed);
        std::thread::sleep(FAIL_FAST + Duration::from_millis(100));
        blob.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(buf, data[10..1010]);
        assert_eq!(asked.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_first_span_unlike_the_media_type_is_an_error_and_the_rest_reads() {
        let mut data = noise(SPAN_BYTES as usize * 3);
        data[..4].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
        let data = Arc::new(data);
        let (blob, lazy, _) = lazy_blob(data.clone(), Arc::new(AtomicBool::new(false)));
        lazy.expect_compression(Compression::Gzip);
        let mut buf = vec![0; 100];
        let err = blob.read_exact_at(&mut buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("media type says Gzip"), "{err}");
        let at = SPAN_BYTES * 2 + 5;
        blob.read_exact_at(&mut buf, at).unwrap();
        assert_eq!(buf, data[at as usize..at as usize + 100]);
        // The media type right: the first span reads.
        let (blob, lazy, _) = lazy_blob(data.clone(), Arc::new(AtomicBool::new(false)));
        lazy.expect_compression(Compression::Zstd);
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data[..100]);
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

    #[test]
    fn a_span_map_carries_checked_spans_to_the_next_process_which_checks_them_again() {
        let data = Arc::new(noise(SPAN_BYTES as usize * 6 + 9));
        let dir = tempfile::tempdir().unwrap();
        let rw = |p: &std::path::Path| {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .unwrap()
        };
        let (path, map_path) = (dir.path().join("blob"), dir.path().join("map"));
        let asked: Asked = Arc::default();
        let open = |lie: bool| {
            let file = rw(&path);
            file.set_len(data.len() as u64).unwrap();
            let map = rw(&map_path);
            map.set_len(7).unwrap();
            let (d, a) = (data.clone(), asked.clone());
            let fetch = Box::new(move |start: u64, end: u64| {
                a.lock().unwrap().push((start, end));
                let mut out = d[start as usize..end as usize].to_vec();
                if lie {
                    out[0] ^= 1;
                }
                Ok(out)
            });
            let done = Arc::new(AtomicU64::new(0));
            let d2 = done.clone();
            let lazy = Lazy::new(file, spans_of(&data), "test", fetch)
                .with_map(map)
                .unwrap()
                .on_complete(Arc::new(move || {
                    d2.fetch_add(1, Ordering::Relaxed);
                }));
            let lazy = Arc::new(lazy);
            let blob = Blob::new(
                Arc::new(File::open(&path).unwrap()),
                0,
                data.len() as u64,
                "t",
            )
            .lazy(lazy.clone());
            (blob, lazy, done)
        };
        let mut buf = vec![0; 100];
        {
            let (blob, _, _) = open(false);
            blob.read_exact_at(&mut buf, SPAN_BYTES * 2).unwrap();
        }
        assert_eq!(std::fs::read(&map_path).unwrap(), [0, 0, 1, 1, 0, 0, 0]);
        // A lying server in the next process: nothing new is marked.
        {
            let (blob, _, _) = open(true);
            assert!(blob.read_exact_at(&mut buf, 0).is_err());
        }
        assert_eq!(std::fs::read(&map_path).unwrap(), [0, 0, 1, 1, 0, 0, 0]);
        // Damage span 3 on disk: the next process reads span 2 locally, refetches span 3.
        let f = rw(&path);
        f.write_all_at(&[!data[SPAN_BYTES as usize * 3]], SPAN_BYTES * 3)
            .unwrap();
        asked.lock().unwrap().clear();
        let (blob, lazy, done) = open(false);
        blob.read_exact_at(&mut buf, SPAN_BYTES * 2).unwrap();
        assert_eq!(buf, data[SPAN_BYTES as usize * 2..][..100]);
        assert!(
            asked.lock().unwrap().is_empty(),
            "a stored span was fetched"
        );
        let mut buf3 = vec![0; 10];
        blob.read_exact_at(&mut buf3, SPAN_BYTES * 3).unwrap();
        assert_eq!(buf3, data[SPAN_BYTES as usize * 3..][..10]);
        assert_eq!(asked.lock().unwrap()[0].0, SPAN_BYTES * 3);
        // The rest: complete, once.
        lazy.prefetch_all();
        assert_eq!(done.load(Ordering::Relaxed), 1);
        assert_eq!(std::fs::read(&path).unwrap(), *data);
        assert_eq!(std::fs::read(&map_path).unwrap(), [1; 7]);
        let s = lazy.full_stats();
        assert!(s.complete && s.local_bytes == data.len() as u64, "{s:?}");
        assert_eq!(s.spans_reused, 1);
    }

    #[test]
    fn a_fetch_takes_near_absent_spans_of_the_read_across_a_small_local_gap() {
        use Span::{Absent as A, Busy as B, Local as L, Stored as S};
        // Across one local span within the read, not two, and not past the read's end.
        assert_eq!(fetch_run(&[A, L, A, A], 0, 3, 1), 4);
        assert_eq!(fetch_run(&[A, L, L, A], 0, 3, 1), 1);
        assert_eq!(fetch_run(&[A, L, A, A], 0, 1, 1), 1);
        // Read-ahead only over absent spans; others' work and stored spans end the run.
        assert_eq!(fetch_run(&[A, A, A, A, A], 0, 0, 3), 3);
        assert_eq!(fetch_run(&[A, B, A], 0, 2, 1), 1);
        assert_eq!(fetch_run(&[A, S, A], 0, 2, 1), 1);
        assert_eq!(fetch_run(&[A, L, S], 0, 2, 1), 1);
    }

    #[test]
    fn a_read_across_a_local_span_makes_one_request_and_rewrites_nothing_local() {
        let data = Arc::new(noise(SPAN_BYTES as usize * 6));
        let (blob, lazy, asked) = lazy_blob(data.clone(), Arc::new(AtomicBool::new(false)));
        // Span 1 alone is local.
        lazy.ensure_spans(SPAN_BYTES, SPAN_BYTES + 1, 1, Who::Prefetch)
            .unwrap();
        asked.lock().unwrap().clear();
        // Spans 0..=2, of which 1 is local: one request for all three.
        let mut buf = vec![0; SPAN_BYTES as usize * 3];
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data[..SPAN_BYTES as usize * 3]);
        assert_eq!(*asked.lock().unwrap(), vec![(0, SPAN_BYTES * 3)]);
        assert_eq!(lazy.full_stats().local_bytes, SPAN_BYTES * 3);
        // Now spans 0..=5 with 0..=2 local and 3 absent: nothing more for a gap of three.
        let mut one = vec![0; 10];
        blob.read_exact_at(&mut one, SPAN_BYTES * 4).unwrap();
        asked.lock().unwrap().clear();
        lazy.ensure_spans(SPAN_BYTES, SPAN_BYTES + 1, 1, Who::Prefetch)
            .unwrap();
        assert!(asked.lock().unwrap().is_empty());
        // Spans 0..=5 with 0..=2 and 4..=5 local: span 3 alone.
        asked.lock().unwrap().clear();
        let mut buf = vec![0; SPAN_BYTES as usize * 6];
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, *data);
        assert_eq!(
            *asked.lock().unwrap(),
            vec![(SPAN_BYTES * 3, SPAN_BYTES * 4)]
        );
        assert!(lazy.full_stats().complete);
    }

    #[test]
    fn a_reader_in_order_finds_the_next_mibs_fetched_in_the_background() {
        let data = Arc::new(noise(24 << 20));
        let (blob, lazy, asked) = lazy_blob(data.clone(), Default::default());
        lazy.read_ahead_in_background();
        // Reads of 64 KiB in order, as a decompressor's: the first few fetch for themselves,
        // at growing strides; then the read-ahead thread runs ahead of them.
        let mut buf = vec![0; 64 << 10];
        for pos in (0..16 << 20).step_by(buf.len()) {
            blob.read_exact_at(&mut buf, pos as u64).unwrap();
            assert!(buf == data[pos..pos + buf.len()], "at {pos}");
        }
        let s = lazy.full_stats();
        assert!(s.prefetched_bytes > 0, "nothing fetched ahead: {s:?}");
        // Every byte fetched once, and no further than the read-ahead's reach past the reads.
        let asked = asked.lock().unwrap();
        let mut ranges = asked.clone();
        ranges.sort();
        assert!(
            ranges.windows(2).all(|w| w[0].1 <= w[1].0),
            "fetched twice: {ranges:?}"
        );
        let fetched: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        assert!(fetched <= (16 << 20) + AHEAD_BYTES + AHEAD_RUN, "{fetched}");
        drop(asked);
        let weak = Arc::downgrade(&lazy);
        drop((blob, lazy));
        let start = Instant::now();
        while weak.strong_count() > 0 {
            assert!(
                start.elapsed().as_secs() < 10,
                "the read-ahead thread keeps the blob"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
