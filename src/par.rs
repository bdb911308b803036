//! Parallel decompression of one compressed layer from its cached index: export reads a gzip or
//! multi-frame zstd layer whose checkpoints (`zran.rs`, `zstd_frames.rs`) are known through a
//! [`ParallelReader`], which decompresses the ranges between checkpoints on several threads
//! and hands their bytes on in stream order, so the tar writer sees exactly what a
//! single-threaded decoder gives.
//!
//! Each range runs from one checkpoint to the output position of the next, and must produce
//! exactly that many bytes: a range that ends short is an error, never a silent gap. Memory
//! stays bounded: workers run at most a fixed number of ranges ahead of the reader.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::blob::{Blob, Compression};
use crate::zran::{Checkpoint, Checkpoints, GzipReader, MemberEnd};
use crate::zstd_frames::ZstdReader;

/// Most decompressed bytes in one range (at least: ranges end at the first checkpoint after
/// this much output). Big enough that starting a decoder and its thread hand-off are noise.
pub const RANGE: u64 = 4 << 20;

/// Compressed bytes each worker reads at a time.
const IN_BUF: usize = 256 * 1024;

/// Where one range starts and ends, as indexes into the checkpoints (`None`: the stream's
/// start, or its end).
#[derive(Clone, Copy, Debug)]
struct Range {
    from: Option<usize>,
    to: Option<usize>,
}

/// What every worker needs, shared read-only.
struct Job {
    blob: Blob,
    compression: Compression,
    checkpoints: Arc<Checkpoints>,
    ranges: Vec<Range>,
    /// Ranges decompressed but not yet taken by the reader, at most.
    ahead: usize,
}

struct State {
    /// The next range a worker takes up.
    next: usize,
    /// The next range the reader hands on.
    taken: usize,
    done: BTreeMap<usize, io::Result<Done>>,
    /// Buffers of ranges already read, for the next ones.
    free: Vec<Vec<u8>>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked left the state consistent (it only inserts whole results).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `Read` over a compressed layer's decompressed stream, decompressed on several threads
/// from the layer's checkpoints; the bytes are those of a single-threaded decoder.
pub struct ParallelReader {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    ranges: usize,
    current: Vec<u8>,
    pos: usize,
    /// Set once a range failed: every later read repeats the error.
    failed: Option<(io::ErrorKind, String)>,
    /// The error after the current range's bytes, returned once they are read.
    pending: Option<io::Error>,
    trailers: Trailers,
}

impl ParallelReader {
    /// Reads `blob` (compressed as `compression`, gzip or zstd, with `checkpoints` recorded
    /// from it) on `threads` threads, in ranges of about `range` bytes of output, with at most
    /// `ahead` ranges held in memory beyond the one being read.
    pub fn new(
        blob: Blob,
        compression: Compression,
        checkpoints: Arc<Checkpoints>,
        threads: usize,
        range: u64,
        ahead: usize,
    ) -> io::Result<Self> {
        if compression == Compression::None {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an uncompressed layer needs no parallel decompression",
            ));
        }
        let ranges = split(checkpoints.points(), range.max(1));
        let job = Arc::new(Job {
            blob,
            compression,
            checkpoints,
            ahead: ahead.max(1),
            ranges,
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next: 0,
                taken: 0,
                done: BTreeMap::new(),
                free: Vec::new(),
                stop: false,
            }),
            changed: Condvar::new(),
        });
        let count = job.ranges.len();
        let mut workers = Vec::new();
        for i in 0..threads.clamp(1, count) {
            let (job, shared) = (Arc::clone(&job), Arc::clone(&shared));
            let spawned = std::thread::Builder::new()
                .name(format!("inflate-{i}"))
                .spawn(move || work(&job, &shared));
            match spawned {
                Ok(h) => workers.push(h),
                // Fewer threads only make it slower; none at all is an error.
                Err(e) if workers.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(ParallelReader {
            shared,
            workers,
            ranges: count,
            current: Vec::new(),
            pos: 0,
            failed: None,
            pending: None,
            trailers: Trailers::new(),
        })
    }

    /// Takes the next range's bytes, waiting for a worker to finish it; `None` at the end.
    fn next_range(&mut self) -> io::Result<Option<Vec<u8>>> {
        let used = std::mem::take(&mut self.current);
        self.pos = 0;
        let mut state = self.shared.lock();
        if used.capacity() > 0 {
            // Back to the workers: a fresh buffer per range would fault in every page again.
            state.free.push(used);
        }
        if state.taken >= self.ranges {
            return Ok(None);
        }
        loop {
            let k = state.taken;
            if let Some(r) = state.done.remove(&k) {
                state.taken += 1;
                self.shared.changed.notify_all();
                drop(state);
                let done = r?;
                self.trailers.check(&done)?;
                self.pending = done.error;
                return Ok(Some(done.bytes));
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Ranges of at least `range` bytes of output, each ending at a checkpoint (the last at the
/// end of the stream).
fn split(points: &[Checkpoint], range: u64) -> Vec<Range> {
    let mut ranges = Vec::new();
    let mut from = None;
    let mut start = 0;
    for (i, p) in points.iter().enumerate() {
        if p.output - start >= range {
            ranges.push(Range { from, to: Some(i) });
            from = Some(i);
            start = p.output;
        }
    }
    ranges.push(Range { from, to: None });
    ranges
}

/// A worker: takes ranges in order while the reader is not too far behind.
fn work(job: &Job, shared: &Shared) {
    loop {
        let (k, buf) = {
            let mut state = shared.lock();
            loop {
                if state.stop || state.next >= job.ranges.len() {
                    return;
                }
                if state.next < state.taken + job.ahead {
                    break;
                }
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            state.next += 1;
            (state.next - 1, state.free.pop().unwrap_or_default())
        };
        // A panic must still leave a result: the reader waits for every range in turn.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decompress(job, job.ranges[k], buf)
        }))
        .unwrap_or_else(|_| Err(io::Error::other("a decompressing thread panicked")));
        let mut state = shared.lock();
        if result.as_ref().map_or(true, |d| d.error.is_some()) {
            // Later ranges would never be read past this one.
            state.next = job.ranges.len();
        }
        state.done.insert(k, result);
        shared.changed.notify_all();
    }
}

/// One range decompressed: its bytes, the gzip member ends in them, and the error that
/// stopped it short, if one did.
struct Done {
    bytes: Vec<u8>,
    ends: Vec<MemberEnd>,
    error: Option<io::Error>,
}

/// The decompressed bytes of one range, exactly as many as lie between its checkpoints.
fn decompress(job: &Job, range: Range, buf: Vec<u8>) -> io::Result<Done> {
    let points = job.checkpoints.points();
    let from = range.from.map(|i| &points[i]);
    let start = from.map_or(0, |c| c.output);
    let end = range.to.map(|i| points[i].output);
    let input = |pos: u64| BufReader::with_capacity(IN_BUF, job.blob.reader_from(pos));
    let at = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("decompressing from offset {start} of the layer: {e}"),
        )
    };
    match job.compression {
        Compression::Gzip => {
            let mut d = match from {
                None => GzipReader::new(input(0)),
                Some(c) => GzipReader::resume(input(c.read_from()), c),
            }
            .map_err(at)?;
            let (bytes, error) = read_range(&mut d, start, end, buf);
            // The decoder may have run past the range's end into output the next range has.
            let limit = end.unwrap_or(u64::MAX);
            let mut ends = d.take_member_ends();
            ends.retain(|e| e.output <= limit);
            Ok(Done {
                bytes,
                ends,
                error: error.map(at),
            })
        }
        Compression::Zstd => {
            let mut d = match from {
                None => ZstdReader::new(input(0)),
                Some(c) => ZstdReader::resume(input(c.input), c),
            }
            .map_err(at)?;
            let (bytes, error) = read_range(&mut d, start, end, buf);
            Ok(Done {
                bytes,
                ends: Vec::new(),
                error: error.map(at),
            })
        }
        Compression::None => unreachable!("refused by ParallelReader::new"),
    }
}

/// Reads from `start` to `end` (or the end of the stream), refusing to end short of `end`.
/// An error comes with the bytes before it: like one decoder's, it reaches the reader only if
/// the reader gets that far (a walk that stops at its last file never sees what follows it).
fn read_range(
    d: &mut impl Read,
    start: u64,
    end: Option<u64>,
    mut out: Vec<u8>,
) -> (Vec<u8>, Option<io::Error>) {
    let want = end.map(|end| end - start);
    out.clear();
    out.reserve(want.unwrap_or(RANGE) as usize);
    // read_to_end keeps what it read before an error.
    let read = match want {
        Some(n) => d.take(n).read_to_end(&mut out),
        None => d.read_to_end(&mut out),
    };
    if let Err(e) = read {
        return (out, Some(e));
    }
    if let (Some(end), Some(n)) = (end, want)
        && (out.len() as u64) < n
    {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the stream ends at decompressed offset {}, before its checkpoint at {end} \
                 (the layer or its cached index is damaged)",
                start + out.len() as u64
            ),
        );
        return (out, Some(e));
    }
    (out, None)
}

/// Checks, in stream order, the CRC-32 and length of gzip members that workers entered
/// mid-way: zlib checks a member it reads from its start, but a worker started at a checkpoint
/// never saw the member's beginning. The CRC of the whole stream so far is kept, with its value
/// at every place a member may have started (each member end, each range start), so the CRC
/// of any member is a difference of two of them.
#[derive(Default)]
struct Trailers {
    pos: u64,
    crc: crc32fast::Hasher,
    /// Stream CRC at each candidate member start.
    marks: BTreeMap<u64, u32>,
}

impl Trailers {
    fn new() -> Self {
        let mut t = Trailers::default();
        t.marks.insert(0, 0);
        t
    }

    fn check(&mut self, done: &Done) -> io::Result<()> {
        let start = self.pos;
        self.marks.insert(start, self.crc.clone().finalize());
        let mut at = 0usize;
        for e in &done.ends {
            let Some(upto) = e.output.checked_sub(start).map(|n| n as usize) else {
                continue;
            };
            let upto = upto.min(done.bytes.len());
            if upto > at {
                self.crc.update(&done.bytes[at..upto]);
                at = upto;
            }
            let here = start + at as u64;
            let crc_here = self.crc.clone().finalize();
            if let Some((crc, isize)) = e.trailer {
                self.check_member(here, crc_here, crc, isize)?;
            }
            self.marks.insert(here, crc_here);
        }
        self.crc.update(&done.bytes[at..]);
        self.pos = start + done.bytes.len() as u64;
        Ok(())
    }

    /// Checks the member ending at `end` (stream CRC there `crc_end`) against its trailer.
    fn check_member(&self, end: u64, crc_end: u32, crc: u32, isize: u32) -> io::Result<()> {
        // ISIZE is the length modulo 2^32: the member started at one of these places.
        let mut len = u64::from(isize);
        while len <= end {
            if let Some(&crc_start) = self.marks.get(&(end - len)) {
                let shifted = libz_rs_sys::crc32_combine(
                    crc_start.into(),
                    0,
                    i64::try_from(len).unwrap_or(i64::MAX) as _,
                ) as u32;
                if crc_end ^ shifted == crc {
                    return Ok(());
                }
            }
            len += 1 << 32;
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("gzip member ending at decompressed offset {end}: CRC-32 or length mismatch"),
        ))
    }
}

impl Read for ParallelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, msg)) = &self.failed {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        while self.pos == self.current.len() {
            if let Some(e) = self.pending.take() {
                self.failed = Some((e.kind(), e.to_string()));
                return Err(e);
            }
            match self.next_range() {
                Ok(Some(bytes)) => {
                    self.current = bytes;
                    self.pos = 0;
                }
                Ok(None) => return Ok(0),
                Err(e) => {
                    self.failed = Some((e.kind(), e.to_string()));
                    return Err(e);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for ParallelReader {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        for w in self.workers.drain(..) {
            // A worker's panic is already an error for whoever read its range.
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;

    use crate::zran::tests::{gzip_flushed, record, sample};
    use crate::zstd_frames::tests::zstd_frames;

    fn blob_of(data: &[u8]) -> Blob {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(data).expect("write");
        Blob::new(Arc::new(f), 0, data.len() as u64, "layer")
    }

    fn par(
        data: &[u8],
        c: Compression,
        points: Vec<Checkpoint>,
        plain_len: usize,
        range: u64,
    ) -> io::Result<Vec<u8>> {
        let cps = Checkpoints::new(points, plain_len as u64).expect("valid checkpoints");
        let mut r = ParallelReader::new(blob_of(data), c, Arc::new(cps), 3, range, 2)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    fn zstd_points(z: &[u8], span: u64) -> (Vec<u8>, Vec<Checkpoint>) {
        let mut r = ZstdReader::recording(z, span).expect("reader");
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("decode");
        (out, r.take_checkpoints())
    }

    #[test]
    fn gzip_with_windowed_checkpoints_gives_the_single_threaded_bytes() {
        let plain = sample(1, 900_000);
        let gz = gzip_flushed(&plain, 3_001);
        let (out, points) = record(&gz, 20_000);
        assert_eq!(out, plain);
        assert!(points.len() > 20 && points.iter().any(|p| !p.window.is_empty()));
        for range in [1, 50_000, 300_000, 10 << 20] {
            let got = par(&gz, Compression::Gzip, points.clone(), plain.len(), range).expect("par");
            assert!(got == plain, "range {range}");
        }
    }

    #[test]
    fn gzip_of_independent_blocks_gives_the_same_bytes() {
        let plain = sample(2, 3_000_000);
        let mut enc = crate::compress::ParallelGzip::new(Vec::new(), 6, 2);
        enc.write_all(&plain).expect("gzip");
        let gz = enc.finish().expect("gzip");
        let (out, points) = record(&gz, 100_000);
        assert_eq!(out, plain);
        assert!(points.len() >= 2, "{}", points.len());
        let got = par(&gz, Compression::Gzip, points, plain.len(), 1).expect("par");
        assert!(got == plain);
    }

    #[test]
    fn gzip_of_several_members_is_checked_across_ranges() {
        let plain = sample(8, 800_000);
        let mut gz = gzip_flushed(&plain[..300_000], 4_999);
        gz.extend(gzip_flushed(&plain[300_000..310_000], 777));
        gz.extend(gzip_flushed(&plain[310_000..], 7_001));
        let (_, points) = record(&gz, 25_000);
        for range in [1, 60_000, 290_000] {
            let got = par(&gz, Compression::Gzip, points.clone(), plain.len(), range);
            assert!(got.expect("par") == plain, "range {range}");
        }
        // A wrong CRC in the first member's trailer: only seen by a worker entering mid-member.
        let mut bad = gz.clone();
        let first = gzip_flushed(&plain[..300_000], 4_999).len();
        bad[first - 8] ^= 1;
        let e = par(&bad, Compression::Gzip, points, plain.len(), 1).unwrap_err();
        assert!(e.to_string().contains("CRC-32"), "{e}");
    }

    #[test]
    fn multi_frame_zstd_gives_the_same_bytes() {
        let plain = sample(3, 700_000);
        let z = zstd_frames(&plain, 30_000);
        let (out, points) = zstd_points(&z, 50_000);
        assert_eq!(out, plain);
        assert!(points.len() > 5);
        let got = par(&z, Compression::Zstd, points, plain.len(), 100_000).expect("par");
        assert!(got == plain);
    }

    #[test]
    fn a_single_checkpoint_and_none_both_work() {
        let plain = sample(4, 200_000);
        let gz = gzip_flushed(&plain, 5_000);
        let (_, points) = record(&gz, 120_000);
        assert_eq!(points.len(), 1);
        let got = par(&gz, Compression::Gzip, points, plain.len(), 1).expect("par");
        assert!(got == plain);
        let got = par(&gz, Compression::Gzip, Vec::new(), plain.len(), 1).expect("par");
        assert!(got == plain);
    }

    #[test]
    fn random_data_and_spacing_match_the_single_threaded_decoder() {
        let mut seed = 0x1234_5678_u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..6 {
            let len = 50_000 + (rand() % 600_000) as usize;
            // Noise and text mixed, so blocks of every kind occur.
            let mut plain = sample(rand(), len);
            for b in plain.iter_mut().step_by(1 + (rand() % 7) as usize) {
                *b = rand() as u8;
            }
            let span = 1 + rand() % 60_000;
            let range = rand() % 200_000;
            let (plain_len, got, single) = if round % 2 == 0 {
                let gz = gzip_flushed(&plain, 1 + (rand() % 20_000) as usize);
                let mut single = Vec::new();
                flate2::read::MultiGzDecoder::new(&gz[..])
                    .read_to_end(&mut single)
                    .expect("flate2");
                let (_, points) = record(&gz, span);
                let got = par(&gz, Compression::Gzip, points, plain.len(), range);
                (plain.len(), got.expect("par"), single)
            } else {
                let z = zstd_frames(&plain, 1 + (rand() % 50_000) as usize);
                let single = zstd::decode_all(&z[..]).expect("zstd");
                let (_, points) = zstd_points(&z, span);
                let got = par(&z, Compression::Zstd, points, plain.len(), range);
                (plain.len(), got.expect("par"), single)
            };
            assert_eq!(single.len(), plain_len);
            assert!(got == single, "round {round}: span {span}, range {range}");
        }
    }

    #[test]
    fn truncated_or_corrupt_input_is_an_error() {
        let plain = sample(5, 600_000);
        let gz = gzip_flushed(&plain, 4_000);
        let (_, points) = record(&gz, 50_000);
        let cut = &gz[..gz.len() * 2 / 3];
        let e = par(cut, Compression::Gzip, points.clone(), plain.len(), 1).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
            ),
            "{e}"
        );
        let mut bad = gz.clone();
        for b in &mut bad[gz.len() / 2..gz.len() / 2 + 64] {
            *b ^= 0x5a;
        }
        assert!(par(&bad, Compression::Gzip, points, plain.len(), 1).is_err());

        let z = zstd_frames(&plain, 40_000);
        let (_, points) = zstd_points(&z, 50_000);
        let cut = &z[..z.len() / 2];
        assert!(par(cut, Compression::Zstd, points, plain.len(), 1).is_err());
    }

    #[test]
    fn an_error_after_the_last_range_waits_until_it_is_read_to() {
        let plain = sample(9, 300_000);
        let mut gz = gzip_flushed(&plain, 4_000);
        let (_, points) = record(&gz, 30_000);
        gz.extend(b"garbage after the stream");
        let cps = Checkpoints::new(points, plain.len() as u64).expect("valid");
        let mut r = ParallelReader::new(blob_of(&gz), Compression::Gzip, Arc::new(cps), 2, 1, 2)
            .expect("reader");
        let mut all = vec![0; plain.len()];
        r.read_exact(&mut all)
            .expect("every byte before the garbage");
        assert!(all == plain);
        assert!(r.read(&mut [0; 10]).is_err());
        assert!(r.read(&mut [0; 10]).is_err(), "the error stays");
    }

    #[test]
    fn a_checkpoint_past_the_stream_is_an_error_naming_where() {
        let plain = sample(6, 100_000);
        let gz = gzip_flushed(&plain, 4_000);
        let (_, mut points) = record(&gz, 30_000);
        // A checkpoint that claims more output than the stream has before its successor.
        let mut extra = points.last().expect("points").clone();
        extra.output += 500_000;
        extra.input = gz.len() as u64 + 10;
        points.push(extra);
        let e = par(&gz, Compression::Gzip, points, plain.len() + 600_000, 1).unwrap_err();
        assert!(e.to_string().contains("before its checkpoint"), "{e}");
    }

    #[test]
    fn dropping_a_reader_midway_stops_its_workers() {
        let plain = sample(7, 2_000_000);
        let gz = gzip_flushed(&plain, 5_000);
        let (_, points) = record(&gz, 20_000);
        let cps = Checkpoints::new(points, plain.len() as u64).expect("valid");
        let mut r = ParallelReader::new(blob_of(&gz), Compression::Gzip, Arc::new(cps), 4, 1, 2)
            .expect("reader");
        let mut head = vec![0; 100_000];
        r.read_exact(&mut head).expect("read");
        assert!(head == plain[..100_000]);
        drop(r);
    }
}
