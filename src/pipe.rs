//! Byte pipelines between threads, used by the indexing pass (read and hash the blob |
//! decompress | hash, spool and parse the tar) and by export (build the tar | hash, compress and
//! write it). A pipe hands whole buffers from one thread to the next; a fixed set of buffers
//! circulates between the two ends, so a pipe holds at most `buffers × size` bytes however long
//! the stream and however far one side runs ahead.

use std::io::{self, BufRead, Read, Write};
use std::sync::mpsc::{self, Receiver, Sender};

/// Buffer size for pipeline hand-offs: large enough that a hand-off (a few microseconds) costs
/// nothing next to the work on its bytes, small enough that a buffer is still in the CPU cache
/// when the next stage reads it, and that the pipes of an export stay within a few MiB.
pub const CHUNK: usize = 256 * 1024;
/// Buffers per pipe: one being filled, one being drained, and two in flight to absorb jitter.
pub const DEPTH: usize = 4;

/// A filled buffer; `len == 0` marks the clean end of the stream.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

/// The sending end of a pipe: fills buffers (as a [`Write`], or from a reader with
/// [`PipeWriter::pump`]) and hands them to the [`PipeReader`].
pub struct PipeWriter {
    pool: Receiver<Vec<u8>>,
    out: Sender<io::Result<Chunk>>,
    cur: Option<Chunk>,
}

/// The receiving end of a pipe, a [`BufRead`] over the buffers the writer sent.
pub struct PipeReader {
    input: Receiver<io::Result<Chunk>>,
    pool: Sender<Vec<u8>>,
    cur: Option<Chunk>,
    pos: usize,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Ended,
    Failed,
}

/// A pipe of `buffers` buffers of `size` bytes each.
pub fn pipe(buffers: usize, size: usize) -> (PipeWriter, PipeReader) {
    let (pool_tx, pool_rx) = mpsc::channel();
    for _ in 0..buffers.max(2) {
        // Cannot fail: the receiver is alive.
        let _ = pool_tx.send(vec![0; size.max(1)]);
    }
    let (tx, rx) = mpsc::channel();
    (
        PipeWriter {
            pool: pool_rx,
            out: tx,
            cur: None,
        },
        PipeReader {
            input: rx,
            pool: pool_tx,
            cur: None,
            pos: 0,
            state: State::Open,
        },
    )
}

/// The other end of a pipe went away: a consequence of an error elsewhere, never a cause.
// Not `BrokenPipe`: that kind means "the user's reader went away" to the binary.
#[derive(Debug)]
struct Hangup(&'static str);

impl std::fmt::Display for Hangup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Hangup {}

fn hung_up() -> io::Error {
    io::Error::other(Hangup("the reading stage stopped"))
}

fn stopped_early() -> io::Error {
    io::Error::other(Hangup("the stage feeding this pipe stopped early"))
}

/// True if `e` only says that the other end of a pipe went away, so the error that made it go
/// away is the one to report.
pub fn is_hangup(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Hangup>())
}

impl PipeWriter {
    fn take_buffer(&mut self) -> io::Result<&mut Chunk> {
        if self.cur.is_none() {
            // Every buffer is with the reader: wait for one back (or for the reader to go).
            let buf = self.pool.recv().map_err(|_| hung_up())?;
            self.cur = Some(Chunk { buf, len: 0 });
        }
        Ok(self.cur.as_mut().expect("set above"))
    }

    fn send_current(&mut self) -> io::Result<()> {
        match self.cur.take() {
            Some(chunk) if chunk.len > 0 => self.out.send(Ok(chunk)).map_err(|_| hung_up()),
            Some(chunk) => {
                self.cur = Some(chunk);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Reads `src` to its end, showing each filled buffer to `inspect` before handing it on,
    /// then marks the end of the stream. An error reading `src` goes to the reader, in order
    /// after the bytes before it, and is also returned.
    pub fn pump(mut self, src: &mut impl Read, mut inspect: impl FnMut(&[u8])) -> io::Result<u64> {
        let mut total = 0u64;
        loop {
            let (eof, err) = {
                let chunk = self.take_buffer()?;
                let mut eof = false;
                let mut err = None;
                while chunk.len < chunk.buf.len() {
                    match src.read(&mut chunk.buf[chunk.len..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => chunk.len += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                inspect(&chunk.buf[..chunk.len]);
                total += chunk.len as u64;
                (eof, err)
            };
            self.send_current()?;
            if let Some(e) = err {
                // io::Error is not Clone: the reader gets the original, the stage a copy.
                let copy = io::Error::new(e.kind(), e.to_string());
                self.fail(e);
                return Err(copy);
            }
            if eof {
                self.finish()?;
                return Ok(total);
            }
        }
    }

    /// Sends what is buffered and marks the clean end of the stream.
    pub fn finish(mut self) -> io::Result<()> {
        self.send_current()?;
        let buf = match self.cur.take() {
            Some(c) => c.buf,
            None => Vec::new(),
        };
        self.out
            .send(Ok(Chunk { buf, len: 0 }))
            .map_err(|_| hung_up())
    }

    /// Hands `e` to the reader as the stream's end (after what was already sent).
    pub fn fail(mut self, e: io::Error) {
        // The reader may be gone already; then nobody is left to tell.
        let _ = self.send_current();
        let _ = self.out.send(Err(e));
    }
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let chunk = self.take_buffer()?;
        let n = data.len().min(chunk.buf.len() - chunk.len);
        chunk.buf[chunk.len..chunk.len + n].copy_from_slice(&data[..n]);
        chunk.len += n;
        if chunk.len == chunk.buf.len() {
            self.send_current()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BufRead for PipeReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.state == State::Open && self.cur.as_ref().is_none_or(|c| self.pos == c.len) {
            if let Some(spent) = self.cur.take() {
                // The writer may be done and gone: the buffer is simply freed then.
                let _ = self.pool.send(spent.buf);
            }
            self.pos = 0;
            match self.input.recv() {
                Ok(Ok(chunk)) if chunk.len == 0 => {
                    let _ = self.pool.send(chunk.buf);
                    self.state = State::Ended;
                }
                Ok(Ok(chunk)) => self.cur = Some(chunk),
                Ok(Err(e)) => {
                    self.state = State::Failed;
                    return Err(e);
                }
                // No end marker: the writing stage stopped (or panicked) mid-stream. Reporting
                // a clean end here would pass a truncated stream off as a whole one.
                Err(_) => {
                    self.state = State::Failed;
                    return Err(stopped_early());
                }
            }
        }
        match (&self.cur, self.state) {
            (Some(c), State::Open) => Ok(&c.buf[self.pos..c.len]),
            (_, State::Failed) => Err(io::Error::other("read after a pipeline error")),
            _ => Ok(&[]),
        }
    }

    fn consume(&mut self, amt: usize) {
        self.pos += amt;
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Writes everything `input` delivers to `w`, without an intermediate copy.
pub fn drain_into(input: &mut PipeReader, w: &mut impl Write) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(total);
        }
        w.write_all(buf)?;
        let n = buf.len();
        total += n as u64;
        input.consume(n);
    }
}

/// The result of a stage thread: its own, or an error if it panicked.
pub fn joined<T>(r: std::thread::Result<io::Result<T>>) -> io::Result<T> {
    r.unwrap_or_else(|_| Err(io::Error::other("a pipeline thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn pumped_bytes_arrive_whole_and_in_order() {
        let input = data(100_003);
        let (tx, mut rx) = pipe(2, 4096);
        let src = input.clone();
        let mut seen = 0;
        std::thread::scope(|s| {
            let h = s.spawn(|| tx.pump(&mut &src[..], |b| seen += b.len()));
            let mut out = Vec::new();
            rx.read_to_end(&mut out).unwrap();
            assert_eq!(out, input);
            assert_eq!(h.join().unwrap().unwrap(), input.len() as u64);
        });
        assert_eq!(seen, input.len());
    }

    #[test]
    fn written_bytes_arrive_after_finish() {
        let input = data(10_000);
        let (mut tx, mut rx) = pipe(2, 1000);
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                let mut out = Vec::new();
                drain_into(&mut rx, &mut out).map(|_| out)
            });
            for piece in input.chunks(333) {
                tx.write_all(piece).unwrap();
            }
            tx.finish().unwrap();
            assert_eq!(h.join().unwrap().unwrap(), input);
        });
    }

    struct FailAfter(usize);

    impl Read for FailAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "corrupt here"));
            }
            let n = buf.len().min(self.0).min(100);
            buf[..n].fill(1);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_source_error_reaches_the_reader_after_the_bytes_before_it() {
        let (tx, mut rx) = pipe(2, 64);
        std::thread::scope(|s| {
            let h = s.spawn(|| tx.pump(&mut FailAfter(1000), |_| {}));
            let mut out = Vec::new();
            let e = rx.read_to_end(&mut out).unwrap_err();
            assert_eq!(e.to_string(), "corrupt here");
            assert_eq!(out.len(), 1000);
            assert_eq!(
                h.join().unwrap().unwrap_err().kind(),
                io::ErrorKind::InvalidData
            );
            // Later reads fail too rather than look like a clean end.
            assert!(rx.read(&mut [0; 8]).is_err());
        });
    }

    #[test]
    fn a_writer_dropped_without_finish_is_an_error_not_an_end() {
        let (mut tx, mut rx) = pipe(2, 64);
        tx.write_all(&[1; 100]).unwrap();
        drop(tx);
        let mut out = Vec::new();
        let e = rx.read_to_end(&mut out).unwrap_err();
        assert!(is_hangup(&e), "{e}");
        assert!(e.to_string().contains("stopped early"), "{e}");
    }

    #[test]
    fn a_panicking_writer_stage_is_an_error_for_the_reader() {
        let (mut tx, mut rx) = pipe(2, 64);
        let h = std::thread::spawn(move || {
            tx.write_all(&[1; 10]).unwrap();
            panic!("stage bug");
        });
        assert!(rx.read_to_end(&mut Vec::new()).is_err());
        assert!(h.join().is_err());
    }

    #[test]
    fn a_reader_that_goes_away_stops_the_writer() {
        let (tx, rx) = pipe(2, 64);
        let endless = std::thread::spawn(move || tx.pump(&mut io::repeat(7), |_| {}));
        drop(rx);
        let e = endless.join().unwrap().unwrap_err();
        assert!(is_hangup(&e), "{e}");
    }

    #[test]
    fn memory_is_bounded_by_the_buffers_however_far_the_writer_runs_ahead() {
        let (tx, mut rx) = pipe(3, 128);
        let (count_tx, count_rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(move || {
                tx.pump(&mut io::repeat(1).take(1 << 20), |b| {
                    let _ = count_tx.send(b.len());
                })
            });
            // Nothing read yet: the writer can fill only the three buffers, then must wait.
            for _ in 0..3 {
                count_rx
                    .recv_timeout(std::time::Duration::from_secs(60))
                    .unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(count_rx.try_recv().is_err(), "a fourth buffer was filled");
            let mut sink = io::sink();
            assert_eq!(drain_into(&mut rx, &mut sink).unwrap(), 1 << 20);
        });
    }
}
