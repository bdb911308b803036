//! Output compression for export: pigz-style parallel gzip (independent blocks, one valid gzip
//! stream) and parallel seekable zstd (independent frames plus the seekable format's frame
//! table). Both give the same bytes whatever the number of threads.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, FlushCompress, Status};

/// Input bytes per independently compressed gzip block. Fixed, so output does not depend on
/// threads.
const BLOCK: usize = 1 << 20;

/// Input bytes per zstd frame. Each frame starts a fresh decoder, so a reader (flatfs's mount,
/// zstd:chunked-aware tools) can start at any of them and a random read decompresses at most
/// one frame. 2 MiB costs 0.85% in size over one frame at level 3 (its window is 2 MiB), on
/// 300 MB of `/usr` as tar: 1 MiB frames cost 1.6%, 4 MiB 0.35% but twice the work per read.
pub const ZSTD_FRAME: usize = 2 << 20;

/// Compresses one block: its input and whether it is the last one.
type Encode = Box<dyn FnMut(&[u8], bool) -> io::Result<Vec<u8>> + Send>;
type Job = (Vec<u8>, bool, SyncSender<io::Result<Vec<u8>>>);

/// Worker threads compressing blocks in parallel; results come back in submission order.
struct Pool {
    jobs: Option<SyncSender<Job>>,
    /// Submitted blocks: input length and where the compressed block will arrive.
    pending: VecDeque<(usize, Receiver<io::Result<Vec<u8>>>)>,
    max_pending: usize,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// `threads` workers, each with its own encoder from `make` (so contexts are reused).
    fn new(threads: usize, make: impl Fn() -> Encode) -> Self {
        let threads = threads.max(1);
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                let mut encode = make();
                std::thread::spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((input, last, reply)) = job else { break };
                        // The writer may have gone away on an error: nothing to do then.
                        let _ = reply.send(encode(&input, last));
                    }
                })
            })
            .collect();
        Pool {
            jobs: Some(tx),
            pending: VecDeque::new(),
            max_pending: threads * 2,
            workers,
        }
    }

    fn submit(&mut self, input: Vec<u8>, last: bool) -> io::Result<()> {
        let (tx, rx) = sync_channel(1);
        let len = input.len();
        self.jobs
            .as_ref()
            .expect("used after finish")
            .send((input, last, tx))
            .map_err(|_| io::Error::other("compression worker died"))?;
        self.pending.push_back((len, rx));
        Ok(())
    }

    /// True when enough blocks are in flight that the oldest should be written before more.
    fn full(&self) -> bool {
        self.pending.len() >= self.max_pending
    }

    /// The oldest block's input length and compressed bytes, waiting for them; `None` when
    /// nothing is pending.
    fn next(&mut self) -> io::Result<Option<(usize, Vec<u8>)>> {
        let Some((len, rx)) = self.pending.pop_front() else {
            return Ok(None);
        };
        let block = rx
            .recv()
            .map_err(|_| io::Error::other("compression worker died"))??;
        Ok(Some((len, block)))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job channel ends the workers.
        self.jobs = None;
        self.pending.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A gzip writer that deflates 1 MiB blocks on worker threads and writes them in order.
/// Each block ends with a sync flush (byte-aligned, not final) except the last, so the
/// concatenation is one deflate stream; CRC-32 and length are computed here, in order. Blocks
/// are deflated without a dictionary, and the header says so, for flatfs's indexing pass.
pub struct ParallelGzip<W: Write> {
    inner: Option<W>,
    level: u32,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
    pool: Pool,
    header_written: bool,
}

impl<W: Write> ParallelGzip<W> {
    /// Compresses at `level` (0–9) with `threads` workers.
    pub fn new(inner: W, level: u32, threads: usize) -> Self {
        let pool = Pool::new(threads, || {
            Box::new(move |input: &[u8], last| deflate_block(input, level, last))
        });
        ParallelGzip {
            inner: Some(inner),
            level,
            buf: Vec::with_capacity(BLOCK),
            crc: crc32fast::Hasher::new(),
            len: 0,
            pool,
            header_written: false,
        }
    }

    fn inner(&mut self) -> &mut W {
        self.inner.as_mut().expect("used after finish")
    }

    fn submit(&mut self, last: bool) -> io::Result<()> {
        if !self.header_written {
            // No mtime, no name, OS unknown: reproducible.
            let xfl = match self.level {
                9 => 2,
                1 => 4,
                _ => 0,
            };
            // FEXTRA: flatfs's note that no back-reference crosses a block, so the indexing
            // pass keeps no window at block starts (`zran::INDEPENDENT_BLOCKS_ID`).
            let [a, b] = crate::zran::INDEPENDENT_BLOCKS_ID;
            let mut header = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, xfl, 255, 8, 0, a, b, 4, 0];
            header.extend((BLOCK as u32).to_le_bytes());
            self.inner().write_all(&header)?;
            self.header_written = true;
        }
        let input = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK));
        self.crc.update(&input);
        self.len += input.len() as u64;
        self.pool.submit(input, last)?;
        while self.pool.full() {
            self.write_one()?;
        }
        Ok(())
    }

    fn write_one(&mut self) -> io::Result<bool> {
        let Some((_, block)) = self.pool.next()? else {
            return Ok(false);
        };
        self.inner().write_all(&block)?;
        Ok(true)
    }

    /// Writes the last block and the trailer; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        while self.write_one()? {}
        let crc = std::mem::take(&mut self.crc).finalize();
        let len = self.len as u32; // ISIZE is the length modulo 2^32.
        let mut inner = self.inner.take().expect("finish runs once");
        inner.write_all(&crc.to_le_bytes())?;
        inner.write_all(&len.to_le_bytes())?;
        Ok(inner)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == BLOCK {
            self.submit(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Magic number of the skippable frame holding the seekable format's frame table (any of
/// 0x184D2A50..=0x184D2A5F is skippable; the seekable format uses the last).
const SEEK_TABLE_SKIPPABLE: u32 = 0x184D_2A5E;
/// The seekable format's own magic number, last in the stream.
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;

/// A zstd writer that compresses [`ZSTD_FRAME`] bytes of input per frame on worker threads
/// and writes the frames in order, then the frame table of the zstd seekable format in a
/// skippable frame, which every decoder skips. Every frame records its content size and a
/// checksum, as the `zstd` tool writes them.
/// See: <https://github.com/facebook/zstd/blob/dev/contrib/seekable_format/zstd_seekable_compression_format.md>
pub struct ParallelZstd<W: Write> {
    inner: W,
    buf: Vec<u8>,
    pool: Pool,
    /// (compressed, decompressed) size of every frame written.
    frames: Vec<(u32, u32)>,
}

impl<W: Write> ParallelZstd<W> {
    /// Compresses at `level` with `threads` workers.
    pub fn new(inner: W, level: i32, threads: usize) -> io::Result<Self> {
        let make = move || {
            let mut ctx = zstd::bulk::Compressor::new(level)?;
            ctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
            io::Result::Ok(ctx)
        };
        // Made once here, so a bad level is an error now rather than in every block.
        make()?;
        let pool = Pool::new(threads, || {
            let mut ctx = make();
            Box::new(move |input: &[u8], _last| match &mut ctx {
                Ok(ctx) => ctx.compress(input),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            })
        });
        Ok(ParallelZstd {
            inner,
            buf: Vec::with_capacity(ZSTD_FRAME),
            pool,
            frames: Vec::new(),
        })
    }

    fn submit(&mut self) -> io::Result<()> {
        let input = std::mem::replace(&mut self.buf, Vec::with_capacity(ZSTD_FRAME));
        self.pool.submit(input, false)?;
        while self.pool.full() {
            self.write_one()?;
        }
        Ok(())
    }

    fn write_one(&mut self) -> io::Result<bool> {
        let Some((len, frame)) = self.pool.next()? else {
            return Ok(false);
        };
        self.inner.write_all(&frame)?;
        // Frames are a few MiB: both sizes fit the table's 32-bit fields.
        let size =
            |n: usize| u32::try_from(n).map_err(|_| io::Error::other("zstd frame too large"));
        self.frames.push((size(frame.len())?, size(len)?));
        Ok(true)
    }

    /// Writes the last frame and the frame table; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        // An empty input still gets one (empty) frame: a stream of only a skippable frame is
        // not something every decoder accepts.
        if !self.buf.is_empty() || (self.frames.is_empty() && self.pool.pending.is_empty()) {
            self.submit()?;
        }
        while self.write_one()? {}
        let frames = u32::try_from(self.frames.len())
            .map_err(|_| io::Error::other("too many zstd frames"))?;
        let mut table = Vec::with_capacity(8 + self.frames.len() * 8 + 9);
        table.extend(SEEK_TABLE_SKIPPABLE.to_le_bytes());
        let body = self.frames.len() * 8 + 9;
        let body = u32::try_from(body).map_err(|_| io::Error::other("too many zstd frames"))?;
        table.extend(body.to_le_bytes());
        for (compressed, decompressed) in &self.frames {
            table.extend(compressed.to_le_bytes());
            table.extend(decompressed.to_le_bytes());
        }
        table.extend(frames.to_le_bytes());
        // Descriptor: no per-frame checksums in the table (each frame carries its own).
        table.push(0);
        table.extend(SEEKABLE_MAGIC.to_le_bytes());
        self.inner.write_all(&table)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParallelZstd<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(ZSTD_FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == ZSTD_FRAME {
            self.submit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn deflate_block(input: &[u8], level: u32, last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(4096));
        }
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&input[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let done_input = c.total_in() as usize == input.len();
        match status {
            Status::StreamEnd => break,
            // A sync flush is complete once all input is in and output space was left over.
            _ if !last && done_input && out.len() < out.capacity() => break,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    fn compress(data: &[u8], threads: usize) -> Vec<u8> {
        let mut gz = ParallelGzip::new(Vec::new(), 6, threads);
        for chunk in data.chunks(100_000) {
            gz.write_all(chunk).expect("write");
        }
        gz.finish().expect("finish")
    }

    #[test]
    fn round_trips_and_is_independent_of_thread_count() {
        let data: Vec<u8> = (0..3_500_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7000) as u8)
            .collect();
        let one = compress(&data, 1);
        let four = compress(&data, 4);
        assert_eq!(one, four, "output must not depend on the number of threads");
        assert_eq!(gunzip(&one), data);
    }

    #[test]
    fn empty_and_exact_block_inputs() {
        assert_eq!(gunzip(&compress(b"", 2)), b"");
        let exact = vec![7u8; BLOCK * 2];
        assert_eq!(gunzip(&compress(&exact, 2)), exact);
    }

    fn zstd(data: &[u8], threads: usize) -> Vec<u8> {
        let mut z = ParallelZstd::new(Vec::new(), 3, threads).expect("zstd");
        for chunk in data.chunks(300_000) {
            z.write_all(chunk).expect("write");
        }
        z.finish().expect("finish")
    }

    /// The seekable format's frame table at the end of `z`: (compressed, decompressed) sizes.
    fn seek_table(z: &[u8]) -> Vec<(u32, u32)> {
        let u32_at = |i: usize| u32::from_le_bytes(z[i..i + 4].try_into().expect("4 bytes"));
        assert_eq!(u32_at(z.len() - 4), SEEKABLE_MAGIC);
        assert_eq!(z[z.len() - 5], 0, "descriptor");
        let frames = u32_at(z.len() - 9) as usize;
        let start = z.len() - 9 - frames * 8;
        assert_eq!(u32_at(start - 8), SEEK_TABLE_SKIPPABLE);
        assert_eq!(u32_at(start - 4) as usize, frames * 8 + 9);
        (0..frames)
            .map(|i| (u32_at(start + i * 8), u32_at(start + i * 8 + 4)))
            .collect()
    }

    #[test]
    fn zstd_writes_one_frame_per_block_and_a_seek_table_any_decoder_skips() {
        let data = crate::zran::tests::sample(31, ZSTD_FRAME * 3 + 12_345);
        let one = zstd(&data, 1);
        assert_eq!(one, zstd(&data, 3), "output must not depend on threads");
        assert_eq!(zstd::decode_all(&one[..]).expect("decode"), data);
        let table = seek_table(&one);
        let sizes: Vec<u32> = table.iter().map(|&(_, d)| d).collect();
        let f = ZSTD_FRAME as u32;
        assert_eq!(sizes, [f, f, f, 12_345]);
        // Each table entry is one frame, starting where the previous one ended.
        let mut at = 0;
        for &(c, d) in &table {
            let frame = &one[at..at + c as usize];
            let size = zstd::zstd_safe::get_frame_content_size(frame).expect("content size");
            assert_eq!(size, Some(u64::from(d)), "frame at {at} records its size");
            assert_eq!(
                zstd::decode_all(frame).expect("one frame").len(),
                d as usize
            );
            at += c as usize;
        }
        assert_eq!(at + 8 + table.len() * 8 + 9, one.len());
    }

    #[test]
    fn zstd_frames_are_checkpoints_for_the_indexing_pass() {
        use crate::zstd_frames::ZstdReader;
        let data = crate::zran::tests::sample(32, ZSTD_FRAME * 4 + 777);
        let z = zstd(&data, 2);
        let mut reader = ZstdReader::recording(&z[..], crate::zran::SPAN).expect("reader");
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("decode");
        assert_eq!(out, data);
        let points = reader.take_checkpoints();
        let outputs: Vec<u64> = points.iter().map(|p| p.output).collect();
        let f = ZSTD_FRAME as u64;
        assert_eq!(outputs, [f, 2 * f, 3 * f, 4 * f]);
        for p in &points {
            let mut rest = Vec::new();
            ZstdReader::resume(&z[p.input as usize..], p)
                .expect("resume")
                .read_to_end(&mut rest)
                .expect("decode from a frame start");
            assert_eq!(rest, &data[p.output as usize..]);
        }
    }

    #[test]
    fn zstd_empty_input_is_one_empty_frame() {
        let z = zstd(b"", 2);
        assert_eq!(zstd::decode_all(&z[..]).expect("decode"), b"");
        assert_eq!(seek_table(&z), [(z.len() as u32 - 8 - 8 - 9, 0)]);
    }

    #[test]
    fn gzip_block_starts_are_checkpoints_without_windows() {
        use crate::zran::{GzipReader, SPAN};
        let data = crate::zran::tests::sample(33, BLOCK * 4 + 999);
        let gz = compress(&data, 2);
        let mut reader = GzipReader::recording(&gz[..], SPAN).expect("reader");
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("decode");
        assert_eq!(out, data);
        let points = reader.take_checkpoints();
        let b = BLOCK as u64;
        let outputs: Vec<u64> = points.iter().map(|p| p.output).collect();
        assert_eq!(outputs, [b, 2 * b, 3 * b, 4 * b]);
        for p in &points {
            assert!(p.window.is_empty(), "{p:?}");
            let mut rest = Vec::new();
            GzipReader::resume(&gz[p.read_from() as usize..], p)
                .expect("resume")
                .read_to_end(&mut rest)
                .expect("decode from a block start");
            assert!(rest == data[p.output as usize..], "from {p:?}");
        }
    }
}
