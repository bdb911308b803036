//! Output compression for export: pigz-style parallel gzip (independent blocks, one valid gzip
//! stream) and parallel seekable zstd (independent frames plus the seekable format's frame
//! table). Both give the same bytes whatever the number of threads. And eStargz: a finished
//! tar rewritten as gzip members per file chunk, with its table of contents and footer.

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

/// Uncompressed bytes per eStargz chunk: each is a gzip member of its own, the unit a lazy
/// reader fetches and verifies.
pub const ESTARGZ_CHUNK: u64 = 4 << 20;

/// Name of the eStargz TOC entry, the last in the tar.
pub const ESTARGZ_TOC_NAME: &str = "stargz.index.json";

/// Name of the eStargz landmark saying no file is prioritised for prefetching.
pub const ESTARGZ_NO_PREFETCH: &str = ".no.prefetch.landmark";

/// Length of the eStargz footer: an empty gzip member whose extra field holds the TOC offset.
pub const ESTARGZ_FOOTER: usize = 51;

/// What an eStargz layer's descriptor and config need besides its digest.
#[derive(Debug, Clone)]
pub struct EstargzOut {
    /// `sha256:` of the TOC JSON (the `containerd.io/snapshot/stargz/toc.digest` annotation).
    pub toc_digest: String,
    /// `sha256:` of the uncompressed stream (the layer's diff_id: the input tar plus the TOC).
    pub diff_id: String,
    /// Length of the uncompressed stream (`io.containers.estargz.uncompressed-size`).
    pub uncompressed: u64,
}

/// The footer of an eStargz blob whose TOC member starts at `toc_offset`: an empty gzip member
/// (stored, no compression) whose extra field is subfield `SG` = 16 hex digits + `STARGZ`.
pub fn estargz_footer(toc_offset: u64) -> [u8; ESTARGZ_FOOTER] {
    let mut f = [0u8; ESTARGZ_FOOTER];
    // Magic, deflate, FEXTRA, no mtime, no XFL, OS unknown; XLEN 26; subfield SG of 22 bytes.
    f[..12].copy_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 26, 0]);
    f[12..16].copy_from_slice(&[b'S', b'G', 22, 0]);
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // A final stored block of no bytes; CRC32 and ISIZE of nothing are zero.
    f[38..43].copy_from_slice(&[1, 0, 0, 0xff, 0xff]);
    f
}

/// The TOC offset an eStargz footer names, or `None` when `f` is not one.
pub fn parse_estargz_footer(f: &[u8]) -> Option<u64> {
    if f.len() != ESTARGZ_FOOTER
        || f[..4] != [0x1f, 0x8b, 8, 4]
        || f[10..16] != [26, 0, b'S', b'G', 22, 0]
    {
        return None;
    }
    let sub = std::str::from_utf8(&f[16..38]).ok()?;
    let hex = sub.strip_suffix("STARGZ")?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Rewrites the tar in `tar` as eStargz into `out`: each entry's headers in the current gzip
/// member, each regular file's contents in members of at most `chunk` bytes of their own
/// (listed in the TOC with their sha256), then the TOC as the tar's last entry, the end of the
/// archive, and the footer. Still one valid gzip'd tar; the TOC's entries follow the spec
/// (`docs/estargz.md` of containerd/stargz-snapshotter).
pub fn write_estargz<W: Write>(
    tar: &std::fs::File,
    out: W,
    chunk: u64,
    level: u32,
) -> io::Result<(W, EstargzOut)> {
    use sha2::{Digest as _, Sha256};
    use std::os::unix::fs::FileExt;

    let read_at = |at: u64, len: u64| -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        tar.read_exact_at(&mut buf, at)?;
        Ok(buf)
    };
    let mut w = Members {
        out,
        written: 0,
        member: None,
        level,
        diff: Sha256::new(),
        plain: 0,
    };
    // No file is prioritised for prefetching, which the spec says with this landmark: a
    // 1-byte regular file (0xf), first.
    let mut header = tar::Header::new_ustar();
    header.set_path(ESTARGZ_NO_PREFETCH)?;
    header.set_size(1);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    w.write(header.as_bytes())?;
    w.close()?;
    let landmark_at = w.written;
    w.write(&[0xf])?;
    w.write(&[0u8; 511])?;
    let landmark = format!("sha256:{}", hex(&Sha256::digest([0xfu8])));
    let mut entries = vec![serde_json::json!({
        "name": ESTARGZ_NO_PREFETCH, "type": "reg", "size": 1, "mode": 0o100644, "uid": 0,
        "gid": 0, "offset": landmark_at, "digest": landmark, "chunkDigest": landmark,
    })];
    let mut pos = 0u64;
    io::Seek::rewind(&mut &*tar)?;
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let data_at = entry.raw_file_position();
        let size = entry.size();
        // The entry's own header and any pax or GNU long-name headers before it.
        w.write(&read_at(pos, data_at - pos)?)?;
        pos = data_at + size.div_ceil(512) * 512;
        let h = entry.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => "reg",
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            _ => {
                w.write(&read_at(data_at, pos - data_at)?)?;
                continue;
            }
        };
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        // The mode with its file type bits, as the spec's examples and zstd:chunked have it.
        let ifmt = match kind {
            "reg" | "hardlink" => 0o100000,
            "dir" => 0o40000,
            "symlink" => 0o120000,
            "char" => 0o20000,
            "block" => 0o60000,
            _ => 0o10000,
        };
        let mut e = serde_json::json!({
            "name": name,
            "type": kind,
            "mode": h.mode().unwrap_or(0) & 0o7777 | ifmt,
            "uid": h.uid().unwrap_or(0),
            "gid": h.gid().unwrap_or(0),
        });
        let mtime = h.mtime().unwrap_or(0);
        e["modtime"] = crate::export::rfc3339(mtime as i64).into();
        if let Some(u) = h.username().ok().flatten().filter(|u| !u.is_empty()) {
            e["userName"] = u.into();
        }
        if let Some(g) = h.groupname().ok().flatten().filter(|g| !g.is_empty()) {
            e["groupName"] = g.into();
        }
        if let Some(l) = entry.link_name_bytes() {
            e["linkName"] = String::from_utf8_lossy(&l).into_owned().into();
        }
        if matches!(kind, "char" | "block") {
            e["devMajor"] = h.device_major().ok().flatten().unwrap_or(0).into();
            e["devMinor"] = h.device_minor().ok().flatten().unwrap_or(0).into();
        }
        let mut xattrs = serde_json::Map::new();
        if let Some(pax) = entry.pax_extensions()? {
            for ext in pax {
                let ext = ext?;
                if let Some(k) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.insert(
                        String::from_utf8_lossy(k).into_owned(),
                        base64(ext.value_bytes()).into(),
                    );
                }
            }
        }
        if !xattrs.is_empty() {
            e["xattrs"] = xattrs.into();
        }
        if kind != "reg" || size == 0 {
            if kind == "reg" {
                e["size"] = 0.into();
            }
            entries.push(e);
            w.write(&read_at(data_at, pos - data_at)?)?;
            continue;
        }
        e["size"] = size.into();
        let mut whole = Sha256::new();
        let mut done = 0u64;
        while done < size {
            let len = chunk.min(size - done);
            // Every chunk starts a member, so a reader can inflate it alone.
            w.close()?;
            let offset = w.written;
            let data = read_at(data_at + done, len)?;
            whole.update(&data);
            w.write(&data)?;
            let mut c = if done == 0 {
                std::mem::take(&mut e)
            } else {
                serde_json::json!({"name": name, "type": "chunk", "chunkOffset": done})
            };
            c["offset"] = offset.into();
            // The spec: every chunk but a file's last gives its size; the last says 0.
            if done + len < size {
                c["chunkSize"] = len.into();
            }
            c["chunkDigest"] = format!("sha256:{}", hex(&Sha256::digest(&data))).into();
            entries.push(c);
            done += len;
        }
        let first = entries.len() - size.div_ceil(chunk) as usize;
        entries[first]["digest"] = format!("sha256:{}", hex(&whole.finalize())).into();
        w.write(&read_at(data_at + size, pos - data_at - size)?)?;
    }
    w.close()?;
    let toc_offset = w.written;
    let toc = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries}))
        .map_err(io::Error::other)?;
    let mut header = tar::Header::new_ustar();
    header.set_path(ESTARGZ_TOC_NAME)?;
    header.set_size(toc.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    w.write(header.as_bytes())?;
    w.write(&toc)?;
    let pad = (toc.len() as u64).div_ceil(512) * 512 - toc.len() as u64;
    // The padding, then the end of the archive (two zero blocks).
    w.write(&vec![0u8; pad as usize + 1024])?;
    w.close()?;
    w.out.write_all(&estargz_footer(toc_offset))?;
    let done = EstargzOut {
        toc_digest: format!("sha256:{}", hex(&Sha256::digest(&toc))),
        diff_id: format!("sha256:{}", hex(&w.diff.finalize())),
        uncompressed: w.plain,
    };
    Ok((w.out, done))
}

/// A run of gzip members: bytes go into the open member; `close` ends it.
struct Members<W: Write> {
    out: W,
    written: u64,
    member: Option<flate2::write::GzEncoder<Vec<u8>>>,
    level: u32,
    diff: sha2::Sha256,
    plain: u64,
}

impl<W: Write> Members<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        use sha2::Digest as _;
        if data.is_empty() {
            return Ok(());
        }
        self.diff.update(data);
        self.plain += data.len() as u64;
        let level = flate2::Compression::new(self.level);
        self.member
            .get_or_insert_with(|| {
                flate2::GzBuilder::new()
                    .operating_system(255)
                    .write(Vec::new(), level)
            })
            .write_all(data)
    }

    fn close(&mut self) -> io::Result<()> {
        if let Some(m) = self.member.take() {
            let bytes = m.finish()?;
            self.out.write_all(&bytes)?;
            self.written += bytes.len() as u64;
        }
        Ok(())
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding (xattr values in an eStargz TOC).
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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

    use sha2::Digest as _;

    fn estargz_of(tar: &[u8], chunk: u64) -> (Vec<u8>, EstargzOut) {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(tar).expect("spool");
        let (out, e) = write_estargz(&f, Vec::new(), chunk, 6).expect("estargz");
        (out, e)
    }

    #[test]
    fn estargz_is_the_tar_plus_its_toc_in_per_chunk_members() {
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "d/", &[][..]).expect("dir");
        for (name, data) in [("d/big", &big[..]), ("d/small", b"hi"), ("d/empty", b"")] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).expect("file");
        }
        let tar = b.into_inner().expect("tar");
        let (out, e) = estargz_of(&tar, 4096);
        // Any gzip reader sees one tar: the input's entries, then the TOC, then the end.
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(&out[..])
            .read_to_end(&mut plain)
            .expect("members");
        assert_eq!(plain.len() as u64, e.uncompressed);
        assert_eq!(
            e.diff_id,
            format!("sha256:{}", hex(&sha2::Sha256::digest(&plain)))
        );
        // After the landmark (header and one block), the input tar but its end.
        let body = tar.len() - 1024;
        assert_eq!(plain[1024..1024 + body], tar[..body]);
        let mut names = Vec::new();
        let mut toc = Vec::new();
        for entry in tar::Archive::new(&plain[..]).entries().expect("entries") {
            let mut entry = entry.expect("entry");
            names.push(String::from_utf8_lossy(&entry.path_bytes()).into_owned());
            toc.clear();
            entry.read_to_end(&mut toc).expect("read");
        }
        assert_eq!(
            names,
            [
                ESTARGZ_NO_PREFETCH,
                "d/",
                "d/big",
                "d/small",
                "d/empty",
                ESTARGZ_TOC_NAME
            ]
        );
        assert_eq!(
            e.toc_digest,
            format!("sha256:{}", hex(&sha2::Sha256::digest(&toc)))
        );
        // The footer names the TOC's member; each chunk's member inflates to its bytes.
        let at = parse_estargz_footer(&out[out.len() - ESTARGZ_FOOTER..]).expect("footer");
        assert_eq!(gunzip(&out[at as usize..])[512..512 + toc.len()], toc[..]);
        let toc: serde_json::Value = serde_json::from_slice(&toc).expect("json");
        let chunks: Vec<_> = toc["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["name"] == "d/big")
            .collect();
        assert_eq!(chunks.len(), 3);
        for c in &chunks {
            let off = c["offset"].as_u64().expect("offset") as usize;
            let mut d = flate2::read::GzDecoder::new(&out[off..]);
            let from = c["chunkOffset"].as_u64().unwrap_or(0) as usize;
            let len = 4096.min(big.len() - from);
            let mut got = vec![0u8; len];
            d.read_exact(&mut got).expect("chunk");
            assert_eq!(got, big[from..from + len]);
            let want = format!("sha256:{}", hex(&sha2::Sha256::digest(&got)));
            assert_eq!(c["chunkDigest"], want.as_str());
        }
        assert_eq!(chunks[0]["size"], 10_000);
        assert_eq!(chunks[2]["chunkOffset"], 8192);
        assert_eq!(chunks[0]["chunkSize"], 4096);
        assert_eq!(chunks[2]["chunkSize"], serde_json::Value::Null);
        assert_eq!(chunks[0]["mode"], 0o100644);
        let whole = format!("sha256:{}", hex(&sha2::Sha256::digest(&big)));
        assert_eq!(chunks[0]["digest"], whole.as_str());
    }

    #[test]
    fn estargz_footers_round_trip_and_others_are_refused() {
        for off in [0, 1, 0x1234_5678_9abc, u64::MAX] {
            let f = estargz_footer(off);
            assert_eq!(parse_estargz_footer(&f), Some(off));
            // It is an empty gzip member any decoder accepts.
            assert_eq!(gunzip(&f), b"");
        }
        let good = estargz_footer(42);
        assert_eq!(parse_estargz_footer(&good[1..]), None);
        assert_eq!(parse_estargz_footer(&[0u8; ESTARGZ_FOOTER]), None);
        for (i, b) in [(12, b'X'), (20, b'g'), (37, b'z'), (10, 27)] {
            let mut f = good;
            f[i] = b;
            assert_eq!(parse_estargz_footer(&f), None, "byte {i}");
        }
    }
}
