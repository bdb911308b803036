//! Output compression for export: pigz-style parallel gzip (independent blocks, one valid gzip
//! stream) and multithreaded zstd. Both give the same bytes whatever the number of threads.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, FlushCompress, Status};

/// Input bytes per independently compressed block. Fixed, so output does not depend on threads.
const BLOCK: usize = 1 << 20;

type Job = (Vec<u8>, bool, SyncSender<io::Result<Vec<u8>>>);

/// A gzip writer that deflates 1 MiB blocks on worker threads and writes them in order.
/// Each block ends with a sync flush (byte-aligned, not final) except the last, so the
/// concatenation is one deflate stream; CRC-32 and length are computed here, in order.
pub struct ParallelGzip<W: Write> {
    inner: Option<W>,
    level: u32,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
    jobs: Option<SyncSender<Job>>,
    pending: VecDeque<Receiver<io::Result<Vec<u8>>>>,
    max_pending: usize,
    workers: Vec<JoinHandle<()>>,
    header_written: bool,
}

impl<W: Write> ParallelGzip<W> {
    /// Compresses at `level` (0–9) with `threads` workers.
    pub fn new(inner: W, level: u32, threads: usize) -> Self {
        let threads = threads.max(1);
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                std::thread::spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((input, last, reply)) = job else { break };
                        // The writer may have gone away on an error: nothing to do then.
                        let _ = reply.send(deflate_block(&input, level, last));
                    }
                })
            })
            .collect();
        ParallelGzip {
            inner: Some(inner),
            level,
            buf: Vec::with_capacity(BLOCK),
            crc: crc32fast::Hasher::new(),
            len: 0,
            jobs: Some(tx),
            pending: VecDeque::new(),
            max_pending: threads * 2,
            workers,
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
            self.inner()
                .write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255])?;
            self.header_written = true;
        }
        let input = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK));
        self.crc.update(&input);
        self.len += input.len() as u64;
        let (tx, rx) = sync_channel(1);
        self.jobs
            .as_ref()
            .expect("used after finish")
            .send((input, last, tx))
            .map_err(|_| io::Error::other("compression worker died"))?;
        self.pending.push_back(rx);
        while self.pending.len() >= self.max_pending {
            self.write_one()?;
        }
        Ok(())
    }

    fn write_one(&mut self) -> io::Result<()> {
        if let Some(rx) = self.pending.pop_front() {
            let block = rx
                .recv()
                .map_err(|_| io::Error::other("compression worker died"))??;
            self.inner().write_all(&block)?;
        }
        Ok(())
    }

    /// Writes the last block and the trailer; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        while !self.pending.is_empty() {
            self.write_one()?;
        }
        let crc = std::mem::take(&mut self.crc).finalize();
        let len = self.len as u32; // ISIZE is the length modulo 2^32.
        let mut inner = self.inner.take().expect("finish runs once");
        inner.write_all(&crc.to_le_bytes())?;
        inner.write_all(&len.to_le_bytes())?;
        Ok(inner)
    }
}

impl<W: Write> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        // Closing the job channel ends the workers.
        self.jobs = None;
        self.pending.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
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
}
