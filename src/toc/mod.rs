//! Layers that carry their own table of contents (zstd:chunked, eStargz): the TOC, checked against the
//! digest the (digest-checked) manifest gives for it, becomes the layer index with no pass over
//! the layer, and each file's bytes are read as the compressed chunk(s) holding them, fetched
//! by range and checked against their own digest before a byte is served (`content.rs` hooks
//! in here for such layers).
//!
//! A TOC gives compressed offsets, not offsets in the layer's tar: entries get offsets in a
//! virtual stream instead, each file's contents back to back in TOC order, and a read maps a
//! virtual offset to its chunk.

pub mod estargz;
pub mod kept;
pub mod parsed;
pub mod zstd_chunked;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use sha2::{Digest as _, Sha256};

use crate::blob::FetchRange;
use crate::layer::LayerIndex;

/// Decoded bytes kept per layer (whole chunks, least recently used out first).
const CACHED_BYTES: usize = 32 << 20;

/// Compressed bytes one request may cover when reads go through the chunks in order: a walk
/// of many small files (`tar` of the mount) would otherwise pay a round trip per file.
const READ_AHEAD: u64 = 2 << 20;

/// Runs the background read-ahead keeps fetched beyond the reads.
const RUNS_AHEAD: usize = 2;

/// Compressed bytes of a run the background read-ahead fetches: twice a reader's, as no reader
/// waits for it; held compressed until read, so a few of them cost a few MiB.
const AHEAD_RUN: u64 = 2 * READ_AHEAD;

/// The first read-ahead, doubled on each further read in order, up to [`READ_AHEAD`].
const FIRST_READ_AHEAD: u64 = 128 << 10;

/// Compressed bytes between two chunks (the next entries' tar headers) still fetched in the
/// same request rather than starting another.
const GAP: u64 = 64 << 10;

/// Largest chunk decoded into memory: a TOC naming a bigger one is not used.
pub const MAX_CHUNK: u64 = 64 << 20;

/// One chunk of a file's contents: where it sits in the virtual stream and in the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Start in the virtual stream.
    pub virt: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Compressed bytes `[start, end)` of the blob holding exactly this chunk.
    pub start: u64,
    /// End of the compressed bytes.
    pub end: u64,
    /// sha256 of the uncompressed chunk.
    pub digest: [u8; 32],
}

/// Where a TOC layer keeps the compressed bytes of the chunks it verified, so that a re-read,
/// by this mount or a later one, needs no request (the registry blob store's partial file).
/// What it returns is checked against the chunk digests like fetched bytes: it only says
/// where to look.
pub trait ChunkStore: Send + Sync {
    /// True if every byte of `[from, to)` is stored.
    fn has(&self, from: u64, to: u64) -> bool;
    /// Bytes `[from, to)` of the blob, if all are stored.
    fn get(&self, from: u64, to: u64) -> Option<Vec<u8>>;
    /// Keeps verified bytes found at `from` in the blob (best effort).
    fn put(&self, from: u64, bytes: &[u8]);
    /// Bytes of the blob stored.
    fn stored_bytes(&self) -> u64;
}

/// A verified TOC: the layer's entries and the chunks their contents are read from.
pub struct Toc {
    /// "zstd:chunked" or another format's name, for messages.
    pub format: &'static str,
    /// sha256 of the TOC as the manifest names it: identifies the virtual stream.
    pub digest: [u8; 32],
    index: LayerIndex,
    chunks: Vec<Chunk>,
    name: String,
    fetch: Box<FetchRange>,
    decode: fn(&[u8], u64) -> io::Result<Vec<u8>>,
    cache: Chunks,
    fetched: AtomicU64,
    requests: AtomicU64,
    /// eStargz's prefetch landmark: the chunks that start before this blob offset are the
    /// ones the layer's author wants fetched at once (`None`: no landmark, or
    /// `.no.prefetch.landmark`).
    prefetch_end: Option<u64>,
    /// Of `fetched`, by [`Toc::prefetch_landmark`].
    prefetched: AtomicU64,
}

impl std::fmt::Debug for Toc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Toc({} {})", self.format, self.name)
    }
}

impl Toc {
    /// The layer's index (entries at virtual offsets), labelled `label`.
    pub fn layer_index(&self, label: String) -> LayerIndex {
        LayerIndex {
            label,
            ..self.index.clone()
        }
    }

    /// Bytes fetched and range requests made for chunks so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.fetched.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    /// Keeps the chunks this TOC verifies in `store`, and reads them from there first.
    pub fn keep_chunks_in(&self, store: Box<dyn ChunkStore>) {
        let _ = self.cache.store.set(store);
    }

    /// Compressed bytes of chunks read from the [`ChunkStore`] instead of fetched.
    pub fn local_bytes(&self) -> u64 {
        self.cache.local.load(Ordering::Relaxed)
    }

    /// Of the range requests, those made ahead of the reads, in the background.
    pub fn requests_ahead(&self) -> u64 {
        self.cache.ahead_requests.load(Ordering::Relaxed)
    }

    /// Bytes fetched by the landmark prefetch and `--prefetch all` so far.
    pub fn prefetched(&self) -> u64 {
        self.prefetched.load(Ordering::Relaxed)
    }

    /// Compressed bytes before the prefetch landmark (0 without one).
    pub fn landmark_bytes(&self) -> u64 {
        let end = self.prefetch_end.unwrap_or(0);
        self.chunks
            .iter()
            .filter(|c| c.start < end)
            .map(|c| c.end - c.start)
            .sum()
    }

    /// Fetches, in blob order, the chunks before the layer's prefetch landmark (eStargz: the
    /// files its author expects to be read first) that are not cached yet, each checked as a
    /// read's, into the chunk cache and the chunk store; a request at a time, holding back
    /// while a foreground read waits for the network. Without a chunk store they live only in
    /// the in-memory cache, so at most half of it is prefetched then (the reads need room
    /// too). A failing request is tried again after a pause that grows; a chunk that keeps
    /// failing its check is left to its reads.
    pub fn prefetch_landmark(&self) {
        let Some(end) = self.prefetch_end else {
            return;
        };
        let n = self.chunks.partition_point(|c| c.start < end);
        self.prefetch_chunks(n, "landmark prefetch");
    }

    /// `mount --prefetch all`: fetches every chunk not yet local into the chunk store, in blob
    /// order, as [`Toc::prefetch_landmark`] does for the first ones, so that the mount, and the
    /// next, need the registry no more. Without a chunk store (nowhere to keep them) only the
    /// landmark's are fetched.
    pub fn prefetch_all(&self) {
        if self.cache.store.get().is_none() {
            self.prefetch_landmark();
            return;
        }
        self.prefetch_chunks(self.chunks.len(), "prefetch");
    }

    /// Compressed bytes of this layer in the chunk store (0 without one).
    pub fn stored_bytes(&self) -> u64 {
        self.cache.store.get().map_or(0, |s| s.stored_bytes())
    }

    /// Whether every chunk is in the chunk store.
    pub fn all_stored(&self) -> bool {
        self.chunks.iter().all(|c| self.stored(c))
    }

    /// Fetches chunks `0..n` that are not cached nor stored, for a prefetch called `what`.
    fn prefetch_chunks(&self, n: usize, what: &str) {
        let (mut i, mut failures, mut decoded) = (0, 0u32, 0u64);
        while i < n {
            while crate::blob::foreground_waiting() {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            // Without a chunk store, the chunks fetched live only in the cache.
            if self.cache.store.get().is_none() && decoded > (CACHED_BYTES / 2) as u64 {
                log::info!(
                    "{}: {what} stopped after {decoded} bytes (the chunk cache holds \
                     {CACHED_BYTES}); the rest is fetched when read",
                    self.name
                );
                return;
            }
            let run_end = {
                let mut cache = self.cache.lock();
                if cache.has(i) || cache.fetching(i) || self.stored(&self.chunks[i]) {
                    i += 1;
                    continue;
                }
                let end = self.run_end(i, n, READ_AHEAD, &cache);
                cache.in_flight.insert(i, end);
                end
            };
            let fetched = {
                let _done = InFlight {
                    chunks: &self.cache,
                    start: i,
                };
                let r = self.fetch_run(i, run_end, true);
                self.note(i, run_end, &r);
                r
            };
            match fetched {
                Ok(_) => {
                    decoded += self.chunks[i..run_end].iter().map(|c| c.size).sum::<u64>();
                    i = run_end;
                    failures = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData && failures >= 3 => {
                    log::warn!("{what}: {e}; skipped");
                    i += 1;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    let wait = std::time::Duration::from_secs(1 << failures.min(5));
                    log::warn!("{what}: {e}; trying again in {wait:?}");
                    std::thread::sleep(wait);
                }
            }
        }
        log::info!(
            "{}: {what} done ({} bytes fetched)",
            self.name,
            self.prefetched()
        );
    }

    /// True if chunk `c`'s compressed bytes are in the [`ChunkStore`].
    fn stored(&self, c: &Chunk) -> bool {
        self.cache
            .store
            .get()
            .is_some_and(|s| s.has(c.start, c.end))
    }

    /// The end of the run of chunks from `i` (before `limit`) one request fetches: neighbours
    /// in the blob, not cached, stored, nor being fetched, within `window` compressed bytes.
    fn run_end(&self, i: usize, limit: usize, window: u64, cache: &ChunkCache) -> usize {
        let first = &self.chunks[i];
        let mut end = i + 1;
        while let (Some(prev), Some(c)) = (self.chunks.get(end - 1), self.chunks.get(end)) {
            let near = c.start >= prev.end && c.start - prev.end <= GAP;
            if end >= limit
                || !near
                || c.end - first.start > window
                || cache.has(end)
                || cache.raw.contains_key(&end)
                || cache.fetching(end)
                || self.stored(c)
            {
                break;
            }
            end += 1;
        }
        end
    }

    /// Marks a TOC opened from bytes kept on the host: its open fetched nothing.
    pub fn opened_from_kept(&self) {
        self.fetched.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
    }

    /// The blob's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fills `buf` with the virtual stream's bytes at `pos`.
    pub fn read(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = pos + done as u64;
            let i = self.chunks.partition_point(|c| c.virt + c.size <= at);
            let chunk = self
                .chunks
                .get(i)
                .filter(|c| c.virt <= at)
                .ok_or_else(|| invalid(format!("{}: no chunk holds offset {at}", self.name)))?;
            let data = self.chunk(i)?;
            let within = (at - chunk.virt) as usize;
            let len = (buf.len() - done).min(data.len() - within);
            buf[done..done + len].copy_from_slice(&data[within..within + len]);
            done += len;
        }
        Ok(())
    }

    /// Starts a thread that keeps up to [`RUNS_AHEAD`] runs of chunks fetched ahead of reads
    /// going through the layer in order, so the network works while the reader decodes and
    /// serves the runs before (`tar` of a lazy mount). It ends once the TOC is dropped.
    ///
    /// The thread starts with the first such reader (so after the mount's fork: a thread does
    /// not cross a fork, nor may one exist then).
    pub fn read_ahead_in_background(self: &Arc<Self>) {
        let _ = self.cache.me.set(Arc::downgrade(self));
    }

    /// Starts the read-ahead thread in this process, if allowed and not yet done.
    fn start_read_ahead(&self) {
        let pid = std::process::id();
        if self.cache.worker_pid.swap(pid, Ordering::Relaxed) == pid {
            return;
        }
        let Some(toc) = self.cache.me.get().cloned() else {
            return;
        };
        let poke = self.cache.poke.clone();
        let worker = move || {
            loop {
                {
                    let mut poked = poke.0.lock().unwrap_or_else(|e| e.into_inner());
                    while !std::mem::take(&mut *poked) {
                        if toc.strong_count() == 0 {
                            return;
                        }
                        poked = poke
                            .1
                            .wait_timeout(poked, std::time::Duration::from_secs(1))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
                let Some(toc) = toc.upgrade() else { return };
                loop {
                    let next = {
                        let cache = toc.cache.lock();
                        let next = cache.next;
                        let go = cache.ahead.len() < RUNS_AHEAD
                            && next < toc.chunks.len()
                            && !cache.has(next)
                            && !cache.fetching(next);
                        if !go {
                            break;
                        }
                        next
                    };
                    // A failure is the reader's to meet and report when it gets there.
                    if toc.load(next, true).is_err() {
                        break;
                    }
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("toc-read-ahead".into())
            .spawn(worker)
        {
            log::warn!("{}: no background read-ahead: {e}", self.name);
        }
    }

    /// Wakes the read-ahead thread, if there is one, to top up the runs fetched ahead.
    fn poke_ahead(&self) {
        let (poked, wake) = &*self.cache.poke;
        *poked.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_one();
        self.start_read_ahead();
    }

    /// Chunk `i`, decoded and verified: from the cache, the chunk store, or fetched (with the
    /// chunks after it, when reads go through the layer in order).
    fn chunk(&self, i: usize) -> io::Result<Arc<[u8]>> {
        self.load(i, false)
    }

    /// [`Toc::chunk`]; `ahead` for the read-ahead thread's fetches, which only fetch: their
    /// chunks wait, unchecked, for the reader to decode and check them (and return nothing).
    fn load(&self, i: usize, ahead: bool) -> io::Result<Arc<[u8]>> {
        let store = self.cache.store.get();
        let (end, local) = {
            let mut cache = self.cache.lock();
            // The reader has reached a run fetched ahead: time for another one (kept across
            // waits: the run may still be arriving).
            let mut reached = false;
            // Another reader fetching this chunk (the kernel's readahead and the read it runs
            // ahead of often want the same one) is waited for, not raced: one request, not two.
            loop {
                if !ahead && cache.ahead.contains(&i) {
                    reached = true;
                    cache.ahead.retain(|&start| start > i);
                }
                if let Some(data) = cache.get(i) {
                    drop(cache);
                    if reached {
                        self.poke_ahead();
                    }
                    return Ok(data);
                }
                if let Some(raw) = (!ahead).then(|| cache.raw.remove(&i)).flatten() {
                    cache.raw_bytes -= raw.len();
                    // Fetched ahead, not yet checked: the reader decodes and checks it (the
                    // read-ahead thread only fetches, so the network never waits for that).
                    // Other readers of it wait while it is checked, rather than fetch it.
                    cache.in_flight.insert(i, i + 1);
                    drop(cache);
                    let _checking = InFlight {
                        chunks: &self.cache,
                        start: i,
                    };
                    if reached {
                        self.poke_ahead();
                    }
                    let c = &self.chunks[i];
                    return match self.verified(c, &raw) {
                        Ok(data) => {
                            if let Some(s) = store {
                                s.put(c.start, &raw);
                            }
                            self.cache.lock().put(i, data.clone());
                            Ok(data)
                        }
                        // Fetched again by the reader, which reports what it finds.
                        Err(_) => {
                            drop(_checking);
                            self.load(i, false)
                        }
                    };
                }
                if !cache.fetching(i) {
                    break;
                }
                cache = self
                    .cache
                    .arrived
                    .wait(cache)
                    .unwrap_or_else(|e| e.into_inner());
            }
            // A chunk whose fetch failed for want of the registry just now fails again at
            // once: the kernel retries a failed read, which would otherwise wait as long again.
            if let Some((at, why)) = cache.failed.get(&i).filter(|_| !ahead)
                && at.elapsed() < crate::blob::FAIL_FAST
            {
                return Err(io::Error::other(format!(
                    "{why} (less than {:?} ago; not asking again yet)",
                    crate::blob::FAIL_FAST
                )));
            }
            let in_order = i > 0 && i == cache.next;
            cache.window = if ahead {
                AHEAD_RUN
            } else if in_order {
                (cache.window * 2).clamp(FIRST_READ_AHEAD, READ_AHEAD)
            } else {
                0
            };
            let local = self.stored(&self.chunks[i]);
            let end = if local {
                i + 1
            } else {
                self.run_end(i, self.chunks.len(), cache.window, &cache)
            };
            cache.next = end;
            cache.in_flight.insert(i, end);
            if ahead {
                cache.ahead.push(i);
            }
            // A reader going in order at full stride: the run after this one is fetched
            // meanwhile.
            if in_order && !ahead && cache.window == READ_AHEAD && end < self.chunks.len() {
                cache.ahead.clear();
                cache.raw.clear();
                cache.raw_bytes = 0;
                drop(cache);
                self.poke_ahead();
            }
            (end, local)
        };
        let _done = InFlight {
            chunks: &self.cache,
            start: i,
        };
        if local {
            // Damaged or replaced stored bytes fail their digest and are fetched instead.
            let c = &self.chunks[i];
            let found = store.and_then(|s| s.get(c.start, c.end));
            if let Some(data) = found.and_then(|raw| self.verified(c, &raw).ok()) {
                self.cache
                    .local
                    .fetch_add(c.end - c.start, Ordering::Relaxed);
                self.cache.lock().put(i, data.clone());
                return Ok(data);
            }
        }
        let r = if ahead {
            self.fetch_ahead(i, end)
        } else {
            // A reader waits: background prefetches give way meanwhile.
            let _waiting = crate::blob::ForegroundWait::new();
            self.fetch_run(i, end, false)
        };
        self.note(i, end, &r);
        r
    }

    /// Records how a fetch of chunks `i..end` went: a failure for want of the registry (not
    /// a bad check) is remembered for [`crate::blob::FAIL_FAST`].
    fn note<T>(&self, i: usize, end: usize, r: &io::Result<T>) {
        let mut cache = self.cache.lock();
        match r {
            Err(e) if e.kind() != io::ErrorKind::InvalidData => {
                let now = std::time::Instant::now();
                for k in i..end {
                    cache.failed.insert(k, (now, e.to_string()));
                }
            }
            _ if !cache.failed.is_empty() => {
                for k in i..end {
                    cache.failed.remove(&k);
                }
            }
            _ => {}
        }
    }

    /// The compressed bytes of chunks `i..end` (neighbours in the blob), by one request.
    fn fetch_raw(&self, i: usize, end: usize) -> io::Result<(u64, Vec<u8>)> {
        let (from, to) = (self.chunks[i].start, self.chunks[end - 1].end);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let raw = (self.fetch)(from, to)?;
        self.fetched.fetch_add(raw.len() as u64, Ordering::Relaxed);
        if raw.len() as u64 != to - from {
            return Err(invalid(format!(
                "{}: chunk at {from}: asked for {} bytes, got {}",
                self.name,
                to - from,
                raw.len()
            )));
        }
        Ok((from, raw))
    }

    /// The read-ahead thread's fetch of chunks `i..end`: kept compressed and unchecked until a
    /// reader takes them (an empty result).
    fn fetch_ahead(&self, i: usize, end: usize) -> io::Result<Arc<[u8]>> {
        self.cache.ahead_requests.fetch_add(1, Ordering::Relaxed);
        let (from, raw) = self.fetch_raw(i, end)?;
        let mut cache = self.cache.lock();
        for (k, c) in self.chunks[i..end].iter().enumerate() {
            let bytes = &raw[(c.start - from) as usize..(c.end - from) as usize];
            cache.raw_bytes += bytes.len();
            if let Some(old) = cache.raw.insert(i + k, bytes.into()) {
                cache.raw_bytes -= old.len();
            }
        }
        // Chunks fetched ahead that no read took (the reader went elsewhere) go, oldest first.
        while cache.raw_bytes > 2 * RUNS_AHEAD * AHEAD_RUN as usize {
            match cache.raw.pop_first() {
                Some((_, old)) => cache.raw_bytes -= old.len(),
                None => break,
            }
        }
        Ok(Arc::from(&[][..]))
    }

    /// Fetches chunks `i..end` (neighbours in the blob) by one request and checks each; those
    /// that verify go into the cache and the chunk store. Chunk `i`'s bytes, or its error.
    fn fetch_run(&self, i: usize, end: usize, prefetch: bool) -> io::Result<Arc<[u8]>> {
        let (from, raw) = self.fetch_raw(i, end)?;
        if prefetch {
            self.prefetched
                .fetch_add(raw.len() as u64, Ordering::Relaxed);
        }
        let store = self.cache.store.get();
        let mut wanted = None;
        for (k, c) in self.chunks[i..end].iter().enumerate() {
            let bytes = &raw[(c.start - from) as usize..(c.end - from) as usize];
            match self.verified(c, bytes) {
                Ok(data) => {
                    if let Some(s) = store {
                        s.put(c.start, bytes);
                    }
                    let mut cache = self.cache.lock();
                    cache.put(i + k, data.clone());
                    if k == 0 {
                        wanted = Some(data);
                    }
                }
                // Only the chunk asked for fails the read; one read ahead is left for its
                // own read to fetch again and report.
                Err(e) if k == 0 => return Err(e),
                Err(_) => break,
            }
        }
        wanted.ok_or_else(|| invalid(format!("{}: chunk {i} not decoded", self.name)))
    }

    /// Chunk `c` decoded from its compressed `raw` bytes, checked against its digest.
    fn verified(&self, c: &Chunk, raw: &[u8]) -> io::Result<Arc<[u8]>> {
        let bad = |what: String| invalid(format!("{}: chunk at {}: {what}", self.name, c.start));
        let data = (self.decode)(raw, c.size).map_err(|e| bad(e.to_string()))?;
        if data.len() as u64 != c.size || <[u8; 32]>::from(Sha256::digest(&data)) != c.digest {
            return Err(bad("does not match its digest in the TOC".into()));
        }
        Ok(data.into())
    }
}

/// A layer's chunk cache, and the signal that a fetch into it has ended.
#[derive(Default)]
struct Chunks {
    state: Mutex<ChunkCache>,
    arrived: Condvar,
    /// Where verified chunks are kept across mounts, if anywhere.
    store: OnceLock<Box<dyn ChunkStore>>,
    /// Compressed bytes read from `store`.
    local: AtomicU64,
    /// Requests the read-ahead thread made.
    ahead_requests: AtomicU64,
    /// Set (and signalled) when the read-ahead thread should top up the runs ahead.
    poke: Arc<(Mutex<bool>, Condvar)>,
    /// The TOC, for the read-ahead thread, once [`Toc::read_ahead_in_background`] allows it.
    me: OnceLock<std::sync::Weak<Toc>>,
    /// The process the read-ahead thread was started in (0: none yet).
    worker_pid: std::sync::atomic::AtomicU32,
}

impl Chunks {
    fn lock(&self) -> MutexGuard<'_, ChunkCache> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A run of chunks being fetched: taken off the in-flight list when its fetch ends, however
/// it ends, and the readers waiting on it woken.
struct InFlight<'a> {
    chunks: &'a Chunks,
    start: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.chunks.lock().in_flight.remove(&self.start);
        self.chunks.arrived.notify_all();
    }
}

/// Decoded, verified chunks of one layer, and how its reads have been going.
#[derive(Default)]
struct ChunkCache {
    /// Chunk number → (bytes, when last used).
    chunks: HashMap<usize, (Arc<[u8]>, u64)>,
    /// When last used → chunk number: least recently used first.
    by_use: BTreeMap<u64, usize>,
    clock: u64,
    bytes: usize,
    /// The chunk after the last run fetched: a miss there is a read in order.
    next: usize,
    /// Compressed bytes the fetch of the next read in order may cover.
    window: u64,
    /// Runs of chunks being fetched now: first chunk → one past the last.
    in_flight: BTreeMap<usize, usize>,
    /// First chunks of the runs fetched ahead that no read has reached yet.
    ahead: Vec<usize>,
    /// Compressed bytes of chunks fetched ahead, not yet decoded nor checked.
    raw: BTreeMap<usize, Box<[u8]>>,
    /// Their size.
    raw_bytes: usize,
    /// Chunks whose last fetch failed for want of the registry: when, and the error.
    failed: HashMap<usize, (std::time::Instant, String)>,
}

impl ChunkCache {
    fn has(&self, i: usize) -> bool {
        self.chunks.contains_key(&i)
    }

    fn fetching(&self, i: usize) -> bool {
        self.in_flight
            .range(..=i)
            .next_back()
            .is_some_and(|(_, &end)| i < end)
    }

    fn get(&mut self, i: usize) -> Option<Arc<[u8]>> {
        self.clock += 1;
        let (data, used) = self.chunks.get_mut(&i)?;
        self.by_use.remove(used);
        *used = self.clock;
        self.by_use.insert(self.clock, i);
        Some(data.clone())
    }

    fn put(&mut self, i: usize, data: Arc<[u8]>) {
        if self.has(i) {
            return;
        }
        self.clock += 1;
        self.bytes += data.len();
        self.chunks.insert(i, (data, self.clock));
        self.by_use.insert(self.clock, i);
        // The newest always stays: a chunk bigger than the bound is still read.
        while self.bytes > CACHED_BYTES && self.chunks.len() > 1 {
            let Some((_, old)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((data, _)) = self.chunks.remove(&old) {
                self.bytes -= data.len();
            }
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `sha256:<hex>` → the 32 bytes.
fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Standard base64 (xattr values in a TOC), padding optional.
fn base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s.trim_end_matches('=').as_bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// An RFC 3339 time (`2023-11-14T22:13:20.5Z`, `…+02:00`) → seconds and nanoseconds.
fn rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut nsec = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let mut scale = 1_000_000_000u64;
        for c in frac[..digits].bytes().take(9) {
            scale /= 10;
            nsec += (u64::from(c - b'0') * scale) as u32;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            sign * (rest.get(1..3)?.parse::<i64>().ok()? * 3600
                + rest.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset, nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_base64_parse() {
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(rfc3339("2023-11-14T22:13:20Z"), Some((1_700_000_000, 0)));
        assert_eq!(
            rfc3339("2023-11-15T00:13:20.25+02:00"),
            Some((1_700_000_000, 250_000_000))
        );
        assert_eq!(rfc3339("0001-01-01T00:00:00Z"), Some((-62_135_596_800, 0)));
        assert_eq!(rfc3339("yesterday"), None);
        assert_eq!(base64("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(base64("AAEC").as_deref(), Some(&[0u8, 1, 2][..]));
        assert_eq!(base64("a*"), None);
    }
}
