//! Random access into gzip layers: a multi-member gzip decompressor that records checkpoints
//! while the indexing pass reads a layer, and that can later start at any of them, so a read
//! anywhere in a layer decompresses at most about one [`SPAN`].
//!
//! A deflate stream can only be entered at a block boundary, and then needs the exact bit
//! position there and the 32 KiB of output before it (back-references reach that far). zlib's
//! `Z_BLOCK` flush makes `inflate` stop at block boundaries and say how many bits of the last
//! byte are still unread; `inflatePrime` and `inflateSetDictionary` restore both. This is the
//! idea of zlib's `examples/zran.c`, extended to streams of several gzip members (pigz output,
//! concatenated files): a checkpoint may lie in any member, and a reader started in one skips
//! that member's trailer and goes on with the next member's header.
//! See: <https://www.zlib.net/manual.html> (`Z_BLOCK`, `data_type`, `inflatePrime`).
//!
//! flate2 hides block boundaries, so this module drives the same zlib-rs implementation through
//! its C API (`libz-rs-sys`); the `unsafe` calls are confined to the private `Inflate` wrapper.

use std::ffi::{CStr, c_int, c_uint};
use std::fmt;
use std::io::{self, BufRead, Read};
use std::ptr;
use std::sync::{Mutex, OnceLock};

use libz_rs_sys::{
    Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END, inflate, inflateEnd,
    inflateGetDictionary, inflateInit2_, inflatePrime, inflateReset2, inflateSetDictionary,
    z_stream, zlibVersion,
};

/// Decompressed bytes between checkpoints (at least: each lies on the first block boundary
/// after this much output since the previous one).
pub const SPAN: u64 = 1 << 20;

/// Deflate's largest back-reference distance, so the most output a checkpoint must keep.
pub const WINDOW: usize = 32 * 1024;
/// Most checkpoints one layer keeps (their windows then take at most 32 MiB); past it the
/// spacing doubles, so a read still decompresses at most one (wider) span.
pub const MAX_POINTS: usize = 1024;

/// `windowBits` for a gzip member: 15-bit window, gzip header and trailer checked by zlib.
const GZIP_BITS: c_int = 15 + 16;
/// `windowBits` for raw deflate, used when starting at a checkpoint (no header to read there).
const RAW_BITS: c_int = -15;

/// `data_type` flags after `inflate` (zlib.h): at a block boundary, and the last block was final.
const AT_BOUNDARY: c_int = 128;
const AFTER_FINAL: c_int = 64;
/// `data_type` bits holding how many input bits inflate holds unused. zlib keeps fewer than 8;
/// zlib-rs may buffer more (up to 63), and 64 is the next flag, so take all six bits.
const HELD_BITS: c_int = 63;

/// Output decompressed ahead for small reads: the tar reader asks for 512-byte headers and
/// skips in 8 KiB steps, and an `inflate` call that small costs about twice as much per byte.
const OUT_BUF: usize = 64 * 1024;

/// Calls that neither consume nor produce anything before the stream is called stuck. Only
/// empty blocks decoded from bits already held can do that legitimately, a handful at most.
const MAX_STALLS: u32 = 64;

/// A place in a gzip stream where decompression can start.
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the compressed stream of the first byte none of whose bits were read.
    pub input: u64,
    /// How many high bits of the byte before `input` are still unread (0..=7).
    pub bits: u8,
    /// Offset in the decompressed stream.
    pub output: u64,
    /// The output just before `output`: 32 KiB, or less near the start of a member (a member
    /// never refers back past its own start).
    pub window: Box<[u8]>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Checkpoint(in {}-{}b, out {}, window {})",
            self.input,
            self.bits,
            self.output,
            self.window.len()
        )
    }
}

impl Checkpoint {
    /// Where a reader of the compressed stream must start for [`GzipReader::resume`]: one byte
    /// early when the checkpoint lies inside a byte.
    pub fn read_from(&self) -> u64 {
        self.input - u64::from(self.bits > 0)
    }
}

/// The checkpoints of one gzip stream, ordered by offset. Those of a cached index may be
/// [`Checkpoints::lazy`]: read and checked on first use, so a warm mount does not read the
/// windows of layers nobody reads.
pub struct Checkpoints {
    points: OnceLock<(Vec<Checkpoint>, Option<u64>)>,
    load: Mutex<Option<Loader>>,
    /// Where deferred points are, from a checked index head: a read that needs one before
    /// all are loaded gets that one alone.
    table: Option<Table>,
}

/// Where a checkpoint is, without its window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    /// As [`Checkpoint::input`].
    pub input: u64,
    /// As [`Checkpoint::bits`].
    pub bits: u8,
    /// As [`Checkpoint::output`].
    pub output: u64,
    /// The window's length.
    pub window_len: u32,
}

/// Gets the window of the checkpoint at an index of the table, checked; `None` if it can't.
pub type WindowFetch = Box<dyn Fn(usize) -> Option<Box<[u8]>> + Send + Sync>;

/// The places of deferred checkpoints, and how to get one window alone.
struct Table {
    output_len: u64,
    places: Vec<Place>,
    window: WindowFetch,
    /// Points got alone, by index (`None`: that failed; the whole set is then waited for).
    alone: Box<[OnceLock<Option<Checkpoint>>]>,
}

/// True when `places` could be the checkpoints of a stream of `output_len` bytes: every field
/// in range, in stream order (what [`Checkpoints::new`] checks, windows aside).
pub fn places_are_sane(places: impl IntoIterator<Item = Place>, output_len: u64) -> bool {
    let mut last: Option<Place> = None;
    // The position in bits, for ordering; saturating, as it is computed before the checks.
    let bit = |p: &Place| p.input.saturating_mul(8).saturating_sub(u64::from(p.bits));
    for p in places {
        let sane = p.bits <= 7
            && (p.bits == 0 || p.input > 0)
            && p.window_len as usize <= WINDOW
            && u64::from(p.window_len) <= p.output
            && p.output <= output_len;
        let ordered = last.is_none_or(|l| p.output > l.output && bit(&p) > bit(&l));
        if !sane || !ordered {
            return false;
        }
        last = Some(p);
    }
    true
}

/// Reads and checks deferred checkpoints; `None` if they turned out unusable.
type Loader = Box<dyn FnOnce() -> Option<Checkpoints> + Send>;

impl Default for Checkpoints {
    fn default() -> Self {
        Checkpoints {
            points: OnceLock::from((Vec::new(), Some(0))),
            load: Mutex::new(None),
            table: None,
        }
    }
}

impl Clone for Checkpoints {
    fn clone(&self) -> Self {
        Checkpoints {
            points: OnceLock::from((self.points().to_vec(), self.output_len())),
            load: Mutex::new(None),
            table: None,
        }
    }
}

impl PartialEq for Checkpoints {
    fn eq(&self, other: &Self) -> bool {
        self.points() == other.points()
    }
}

impl Eq for Checkpoints {}

impl fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.points.get() {
            Some((points, _)) => write!(f, "Checkpoints({} points)", points.len()),
            None => write!(f, "Checkpoints(not loaded)"),
        }
    }
}

impl Checkpoints {
    /// Checkpoints of a stream of `output_len` decompressed bytes; `None` unless they are in
    /// stream order and every field is in range (they may come from a file).
    pub fn new(points: Vec<Checkpoint>, output_len: u64) -> Option<Self> {
        let places = points.iter().map(|p| Place {
            input: p.input,
            bits: p.bits,
            output: p.output,
            window_len: u32::try_from(p.window.len()).unwrap_or(u32::MAX),
        });
        if !places_are_sane(places, output_len) {
            return None;
        }
        Some(Checkpoints {
            points: OnceLock::from((points, Some(output_len))),
            load: Mutex::new(None),
            table: None,
        })
    }

    /// Checkpoints that `load` reads (and checks, as [`Checkpoints::new`] does) when first
    /// asked for. If it fails they are none at all: the stream is then read from its start,
    /// slower but right, as no value from a file that failed its checks is ever used.
    pub fn lazy(load: impl FnOnce() -> Option<Checkpoints> + Send + 'static) -> Self {
        Checkpoints {
            points: OnceLock::new(),
            load: Mutex::new(Some(Box::new(load))),
            table: None,
        }
    }

    /// [`Checkpoints::lazy`], with their `places` (checked with [`places_are_sane`]; `None`
    /// if they are not) in a stream of `output_len` bytes: until all are loaded, a read gets
    /// the one checkpoint it needs from `window` alone (the whole set may be waiting for the
    /// network), and none before the first. The loader must refuse points at other places;
    /// a window of another length is refused here.
    pub fn lazy_placed(
        places: Vec<Place>,
        output_len: u64,
        window: WindowFetch,
        load: impl FnOnce() -> Option<Checkpoints> + Send + 'static,
    ) -> Option<Self> {
        if !places_are_sane(places.iter().copied(), output_len) {
            return None;
        }
        let alone = places.iter().map(|_| OnceLock::new()).collect();
        Some(Checkpoints {
            table: Some(Table {
                output_len,
                places,
                window,
                alone,
            }),
            ..Checkpoints::lazy(load)
        })
    }

    /// True once the points are in memory (always, unless made [`Checkpoints::lazy`]).
    pub fn is_loaded(&self) -> bool {
        self.points.get().is_some()
    }

    /// The length of the decompressed stream, if known (loads deferred points; `None` if
    /// they failed their checks).
    pub fn output_len(&self) -> Option<u64> {
        match &self.table {
            Some(t) if !self.is_loaded() => Some(t.output_len),
            _ => self.loaded().1,
        }
    }

    /// All checkpoints, in stream order.
    pub fn points(&self) -> &[Checkpoint] {
        &self.loaded().0
    }

    /// The points and the stream's length, loaded if deferred.
    fn loaded(&self) -> &(Vec<Checkpoint>, Option<u64>) {
        self.points.get_or_init(|| {
            // Taken, not called under the lock: get_or_init already lets one caller in.
            let load = self.load.lock().unwrap_or_else(|e| e.into_inner()).take();
            // The loader says why if it fails.
            load.and_then(|load| load())
                .and_then(|c| c.points.into_inner())
                .unwrap_or_default()
        })
    }

    /// Loads deferred points; false if they were placed (their head said how many) and the
    /// load failed, so that there are none.
    pub fn is_complete(&self) -> bool {
        let n = self.points().len();
        self.table.as_ref().is_none_or(|t| t.places.len() == n)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.points().len()
    }

    /// True when the stream has none (it is shorter than a span).
    pub fn is_empty(&self) -> bool {
        match &self.table {
            Some(t) if !self.is_loaded() => t.places.is_empty(),
            _ => self.points().is_empty(),
        }
    }

    /// The last checkpoint at or before decompressed offset `pos`.
    pub fn at_or_before(&self, pos: u64) -> Option<&Checkpoint> {
        if let Some(t) = self.table.as_ref().filter(|_| !self.is_loaded()) {
            // The place is known; its window alone, unless that fails.
            let i = t
                .places
                .partition_point(|p| p.output <= pos)
                .checked_sub(1)?;
            let alone = t.alone[i].get_or_init(|| {
                let place = t.places[i];
                let window = (t.window)(i).filter(|w| w.len() == place.window_len as usize)?;
                Some(Checkpoint {
                    input: place.input,
                    bits: place.bits,
                    output: place.output,
                    window,
                })
            });
            if let Some(c) = alone {
                return Some(c);
            }
        }
        let points = self.points();
        let i = points.partition_point(|p| p.output <= pos);
        i.checked_sub(1).map(|i| &points[i])
    }

    /// Bytes of window data held.
    pub fn window_bytes(&self) -> usize {
        self.points().iter().map(|p| p.window.len()).sum()
    }
}

/// What one `inflate` call did.
struct Step {
    ret: c_int,
    consumed: usize,
    produced: usize,
    data_type: c_int,
}

/// An initialised zlib-rs inflate stream, with a safe method for each C call used.
struct Inflate {
    // Boxed: zlib's state points back at its stream, so the stream must not move.
    strm: Box<z_stream>,
}

impl Inflate {
    fn new(window_bits: c_int) -> io::Result<Self> {
        // Default sets zlib-rs's allocator; everything else starts null or zero.
        let mut inflate = Inflate {
            strm: Box::default(),
        };
        let size = c_int::try_from(size_of::<z_stream>()).unwrap_or(c_int::MAX);
        // SAFETY: the stream is a valid, default-initialised `z_stream` with its allocator set,
        // the version string is zlib-rs's own static C string and the size is the struct's.
        let ret = unsafe { inflateInit2_(&mut *inflate.strm, window_bits, zlibVersion(), size) };
        inflate.check(ret, "inflateInit2")?;
        Ok(inflate)
    }

    /// Restarts for a new stream (keeping allocations), e.g. the next gzip member.
    fn reset(&mut self, window_bits: c_int) -> io::Result<()> {
        // SAFETY: the stream was initialised by `inflateInit2_` in `new`.
        let ret = unsafe { inflateReset2(&mut *self.strm, window_bits) };
        self.check(ret, "inflateReset2")
    }

    /// Feeds the low `bits` bits of `value` before any input byte.
    fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: the stream was initialised by `inflateInit2_` in `new`.
        let ret = unsafe { inflatePrime(&mut *self.strm, c_int::from(bits), c_int::from(value)) };
        self.check(ret, "inflatePrime")
    }

    /// Sets the output that back-references may reach into (raw deflate only).
    fn set_dictionary(&mut self, dict: &[u8]) -> io::Result<()> {
        if dict.is_empty() {
            return Ok(());
        }
        let len = c_uint::try_from(dict.len()).map_err(|_| invalid("dictionary too large"))?;
        // SAFETY: the stream was initialised; `dict` is valid for `len` bytes for this call,
        // and zlib copies it into its own window.
        let ret = unsafe { inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        self.check(ret, "inflateSetDictionary")
    }

    /// The last (up to) 32 KiB of output, oldest first.
    fn window(&self) -> Box<[u8]> {
        let mut buf = vec![0u8; WINDOW];
        let mut len: c_uint = 0;
        // SAFETY: the stream was initialised with a window of at most 2^15 = `WINDOW` bytes
        // (`GZIP_BITS`/`RAW_BITS`), so zlib copies at most `buf.len()` bytes into `buf`.
        unsafe { inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut len) };
        buf.truncate((len as usize).min(WINDOW));
        buf.into_boxed_slice()
    }

    /// One `inflate` call from `input` into `output`.
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: c_int) -> Step {
        let avail_in = c_uint::try_from(input.len()).unwrap_or(c_uint::MAX);
        let avail_out = c_uint::try_from(output.len()).unwrap_or(c_uint::MAX);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        // SAFETY: the stream was initialised; `next_in`/`avail_in` describe (a prefix of)
        // `input` and `next_out`/`avail_out` (a prefix of) `output`, both borrowed for the
        // whole call. zlib keeps no pointer into them afterwards (it copies into its window).
        let ret = unsafe { inflate(&mut *self.strm, flush) };
        let step = Step {
            ret,
            consumed: (avail_in - self.strm.avail_in) as usize,
            produced: (avail_out - self.strm.avail_out) as usize,
            data_type: self.strm.data_type,
        };
        // Leave no pointers to buffers that are about to be released.
        self.strm.next_in = ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = ptr::null_mut();
        self.strm.avail_out = 0;
        step
    }

    /// zlib's message for the last error, if it gave one.
    fn message(&self) -> Option<String> {
        if self.strm.msg.is_null() {
            return None;
        }
        // SAFETY: a non-null `msg` points at one of zlib-rs's static NUL-terminated messages.
        let msg = unsafe { CStr::from_ptr(self.strm.msg) };
        Some(msg.to_string_lossy().into_owned())
    }

    fn check(&self, ret: c_int, what: &str) -> io::Result<()> {
        if ret == Z_OK {
            return Ok(());
        }
        let msg = self.message().unwrap_or_else(|| format!("error {ret}"));
        Err(io::Error::other(format!("{what}: {msg}")))
    }
}

// SAFETY: the stream and the state it points to are owned by this value alone and used through
// `&mut self` only; between calls `next_in`/`next_out` are null, the state holds no pointer to
// anything thread-bound, and zlib-rs allocates with Rust's global (thread-safe) allocator.
unsafe impl Send for Inflate {}

impl Drop for Inflate {
    fn drop(&mut self) {
        // SAFETY: the stream is either initialised, or its state is still null, which
        // `inflateEnd` refuses without touching anything.
        unsafe { inflateEnd(&mut *self.strm) };
    }
}

/// Where a [`GzipReader`] is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a member. `raw` when entered at a checkpoint: zlib then reads raw deflate and
    /// the member's trailer is left for us to skip.
    Member { raw: bool },
    /// A member ended; another one may follow.
    Between,
    /// The input ended after a member.
    Done,
    /// An error was returned; the decompressor's state is undefined.
    Failed,
}

struct Recorder {
    span: u64,
    next: u64,
    points: Vec<Checkpoint>,
    /// While in the first member: the block size its header says no back-reference crosses.
    independent: Option<u64>,
}

/// Subfield id, in a gzip header's extra field, of flatfs's note that the member's deflate
/// stream holds no back-reference across multiples of a block size (a little-endian `u32`, the
/// subfield's data), as export's parallel gzip writes it: checkpoints at those offsets need no
/// window. Readers skip extra subfields they do not know (RFC 1952, 2.3.1.1). A header that
/// lies can only make a read from such a checkpoint fail ("invalid distance too far back"):
/// raw inflate with no dictionary refuses a reference before its start.
pub const INDEPENDENT_BLOCKS_ID: [u8; 2] = *b"Fb";

/// The block size of an [`INDEPENDENT_BLOCKS_ID`] subfield in the gzip header at the start of
/// `header`, if there is one (and all of the header's extra field is in `header`).
fn independent_blocks(header: &[u8]) -> Option<u64> {
    if header.get(..3)? != [0x1f, 0x8b, 8] || header.get(3)? & 4 == 0 {
        return None;
    }
    let xlen = u16::from_le_bytes([*header.get(10)?, *header.get(11)?]) as usize;
    let mut extra = header.get(12..12 + xlen)?;
    while extra.len() >= 4 {
        let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
        let data = extra.get(4..4 + len)?;
        if extra[..2] == INDEPENDENT_BLOCKS_ID && len == 4 {
            let block = u32::from_le_bytes(data.try_into().ok()?);
            return Some(u64::from(block)).filter(|&b| b > 0);
        }
        extra = &extra[4 + len..];
    }
    None
}

/// A `Read` decompressing a stream of gzip members from a [`BufRead`], from its start or from a
/// [`Checkpoint`], optionally recording checkpoints as it goes. Corrupt input is an error
/// (`InvalidData`), a stream cut short `UnexpectedEof`; CRC and length are checked for every
/// member read from its start.
pub struct GzipReader<R> {
    inflate: Inflate,
    input: R,
    /// Compressed bytes consumed, counted from the start of the stream.
    input_pos: u64,
    /// Decompressed bytes produced, counted from the start of the stream.
    output_pos: u64,
    state: State,
    recorder: Option<Recorder>,
    /// Output decompressed but not yet read: `out[out_start..out_end]`.
    out: Box<[u8]>,
    out_start: usize,
    out_end: usize,
    /// Where members ended, with the trailers zlib could not check (see [`MemberEnd`]).
    ends: Vec<MemberEnd>,
}

/// The end of a gzip member, as a reader passed it: `output` is the decompressed offset. A
/// member entered at a checkpoint was read as raw deflate, so its CRC-32 and length were not
/// checked; they are in `trailer` (CRC, ISIZE) for whoever saw the whole member's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberEnd {
    /// Decompressed offset of the member's end.
    pub output: u64,
    /// The unchecked trailer, when the member was entered mid-way.
    pub trailer: Option<(u32, u32)>,
}

impl<R: BufRead> GzipReader<R> {
    /// Decompresses `input` from the start of a gzip stream.
    pub fn new(input: R) -> io::Result<Self> {
        Ok(GzipReader {
            inflate: Inflate::new(GZIP_BITS)?,
            input,
            input_pos: 0,
            output_pos: 0,
            state: State::Member { raw: false },
            recorder: None,
            out: Box::default(),
            out_start: 0,
            out_end: 0,
            ends: Vec::new(),
        })
    }

    /// Like [`GzipReader::new`], recording a checkpoint at the first block boundary after
    /// every `span` bytes of output ([`GzipReader::take_checkpoints`]).
    pub fn recording(input: R, span: u64) -> io::Result<Self> {
        let mut reader = Self::new(input)?;
        let span = span.max(1);
        let independent = independent_blocks(reader.input.fill_buf()?);
        reader.recorder = Some(Recorder {
            span,
            next: span,
            points: Vec::new(),
            independent,
        });
        Ok(reader)
    }

    /// Decompresses from `checkpoint`, with `input` positioned at its
    /// [`Checkpoint::read_from`] offset of the stream it was recorded in.
    pub fn resume(mut input: R, checkpoint: &Checkpoint) -> io::Result<Self> {
        let mut inflate = Inflate::new(RAW_BITS)?;
        if checkpoint.bits > 0 {
            let byte = match input.fill_buf()?.first() {
                Some(&b) => b,
                None => return Err(truncated()),
            };
            input.consume(1);
            inflate.prime(checkpoint.bits, byte >> (8 - checkpoint.bits))?;
        }
        inflate.set_dictionary(&checkpoint.window)?;
        Ok(GzipReader {
            inflate,
            input,
            input_pos: checkpoint.input,
            output_pos: checkpoint.output,
            state: State::Member { raw: true },
            recorder: None,
            out: Box::default(),
            out_start: 0,
            out_end: 0,
            ends: Vec::new(),
        })
    }

    /// Offset in the decompressed stream of the next byte `read` returns.
    pub fn position(&self) -> u64 {
        self.output_pos - (self.out_end - self.out_start) as u64
    }

    /// The checkpoints recorded so far (none unless made by [`GzipReader::recording`]).
    pub fn take_checkpoints(&mut self) -> Vec<Checkpoint> {
        self.recorder
            .as_mut()
            .map(|r| std::mem::take(&mut r.points))
            .unwrap_or_default()
    }

    /// The compressed input, positioned after the last byte consumed.
    pub fn into_inner(self) -> R {
        self.input
    }

    /// The member ends passed so far (possibly ahead of [`GzipReader::position`]).
    pub fn take_member_ends(&mut self) -> Vec<MemberEnd> {
        std::mem::take(&mut self.ends)
    }

    /// One step inside a member: returns the bytes produced (possibly 0).
    fn inflate_some(&mut self, buf: &mut [u8], raw: bool, stalls: &mut u32) -> io::Result<usize> {
        let input = self.input.fill_buf()?;
        if input.is_empty() {
            return Err(truncated());
        }
        // Stopping at every block boundary costs a call per block: only ask once a
        // checkpoint is due, and stop right there so the next boundary is taken.
        // With independent blocks, ask one byte early: zlib, once its output is full, goes on
        // through a block's end (and a sync flush's empty block) that make no output, so the
        // boundary at the block's end would be passed by.
        let (due, limit) = match &self.recorder {
            Some(r) => {
                let at = r.next - u64::from(r.independent.is_some());
                match at.checked_sub(self.output_pos) {
                    Some(left) if left > 0 => (false, buf.len().min(clamp(left))),
                    _ => (true, buf.len()),
                }
            }
            None => (false, buf.len()),
        };
        let flush = if due { Z_BLOCK } else { Z_NO_FLUSH };
        let step = self.inflate.inflate(input, &mut buf[..limit], flush);
        self.input.consume(step.consumed);
        self.input_pos += step.consumed as u64;
        self.output_pos += step.produced as u64;
        match step.ret {
            Z_OK | Z_BUF_ERROR => {
                if due {
                    self.checkpoint(step.data_type);
                }
                if step.consumed == 0 && step.produced == 0 {
                    *stalls += 1;
                    if *stalls > MAX_STALLS {
                        return Err(invalid("gzip stream makes no progress"));
                    }
                } else {
                    *stalls = 0;
                }
            }
            Z_STREAM_END => {
                // zlib read raw deflate: the CRC-32 and length are still ahead. They cannot be
                // checked from mid-member (the indexing pass checked them); a reader that saw
                // the member's earlier output can (`par.rs`).
                let trailer = if raw { Some(self.trailer()?) } else { None };
                self.ends.push(MemberEnd {
                    output: self.output_pos,
                    trailer,
                });
                self.state = State::Between;
            }
            ret => {
                let msg = self
                    .inflate
                    .message()
                    .unwrap_or_else(|| format!("error {ret}"));
                return Err(invalid(&format!("corrupt gzip stream: {msg}")));
            }
        }
        Ok(step.produced)
    }

    /// Records a checkpoint if zlib stopped at a block boundary that starts another block.
    fn checkpoint(&mut self, data_type: c_int) {
        if data_type & AT_BOUNDARY == 0 || data_type & AFTER_FINAL != 0 {
            return;
        }
        let held = (data_type & HELD_BITS) as u64;
        let Some(bit) = (self.input_pos * 8).checked_sub(held) else {
            return;
        };
        let input = bit.div_ceil(8);
        let Some(recorder) = &mut self.recorder else {
            return;
        };
        let window = match recorder.independent {
            Some(block) if self.output_pos.is_multiple_of(block) => Box::default(),
            _ => self.inflate.window(),
        };
        recorder.points.push(Checkpoint {
            input,
            bits: (input * 8 - bit) as u8,
            output: self.output_pos,
            window,
        });
        if recorder.points.len() > MAX_POINTS {
            // A huge layer (or a gzip bomb) must not hold unbounded windows: keep every other
            // checkpoint and space later ones twice as far apart.
            let mut i = 0;
            recorder.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            recorder.span = recorder.span.saturating_mul(2);
        }
        recorder.next = self.output_pos.saturating_add(recorder.span);
        if let Some(block) = recorder.independent {
            // Back on a block start even if this one landed beside it (a deflate block of the
            // encoder's own that ended a byte early).
            recorder.next = recorder
                .next
                .checked_next_multiple_of(block)
                .unwrap_or(u64::MAX);
        }
    }

    /// Consumes a member trailer: its CRC-32 and ISIZE.
    fn trailer(&mut self) -> io::Result<(u32, u32)> {
        let mut bytes = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            let input = self.input.fill_buf()?;
            let avail = input.len().min(8 - got);
            if avail == 0 {
                return Err(truncated());
            }
            bytes[got..got + avail].copy_from_slice(&input[..avail]);
            self.input.consume(avail);
            self.input_pos += avail as u64;
            got += avail;
        }
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        Ok((word(0), word(4)))
    }

    fn step(&mut self, buf: &mut [u8], stalls: &mut u32) -> io::Result<usize> {
        match self.state {
            State::Member { raw } => self.inflate_some(buf, raw, stalls),
            State::Between => {
                if self.input.fill_buf()?.is_empty() {
                    self.state = State::Done;
                } else {
                    // Another member: zlib reads its header and checks its trailer. The first
                    // member's note on independent blocks says nothing about this one.
                    if let Some(r) = &mut self.recorder {
                        r.independent = None;
                    }
                    self.inflate.reset(GZIP_BITS)?;
                    self.state = State::Member { raw: false };
                }
                Ok(0)
            }
            State::Done => Ok(0),
            State::Failed => Err(invalid("gzip stream failed earlier")),
        }
    }
}

impl<R: BufRead> Read for GzipReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.out_start == self.out_end {
            if buf.len() >= OUT_BUF {
                return self.decompress(buf);
            }
            if self.out.is_empty() {
                self.out = vec![0; OUT_BUF].into_boxed_slice();
            }
            let mut out = std::mem::take(&mut self.out);
            let n = self.decompress(&mut out);
            self.out = out;
            (self.out_start, self.out_end) = (0, n?);
        }
        let n = buf.len().min(self.out_end - self.out_start);
        buf[..n].copy_from_slice(&self.out[self.out_start..self.out_start + n]);
        self.out_start += n;
        Ok(n)
    }
}

impl<R: BufRead> GzipReader<R> {
    /// Decompresses into `buf`: at least one byte, or 0 at the end of the stream.
    fn decompress(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut stalls = 0;
        loop {
            match self.step(buf, &mut stalls) {
                Ok(0) if self.state != State::Done => continue,
                Ok(n) => return Ok(n),
                Err(e) => {
                    self.state = State::Failed;
                    return Err(e);
                }
            }
        }
    }
}

fn clamp(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "gzip stream ends inside a member",
    )
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use flate2::{Compress, Compression, FlushCompress};
    use std::io::Write;

    /// Text-like bytes with plenty of back-references, deterministic for a seed.
    pub(crate) fn sample(seed: u64, len: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "usr", "lib", "share", "doc", "the", "of", "and", "config", "x86_64", "linux", "gnu",
            "python3", "perl", "\n", "/", " ", "0", "1", "2", "debian",
        ];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(97) {
                // Now and then a run of noise, so some blocks are stored or literal-heavy.
                out.extend((0..(x % 3000)).map(|i| (x >> (i % 56)) as u8));
            } else {
                out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn a_header_that_lies_about_independent_blocks_gives_errors_not_wrong_bytes() {
        let plain = sample(34, 2_000_000);
        let mut extra = INDEPENDENT_BLOCKS_ID.to_vec();
        extra.extend([4, 0, 1, 0, 0, 0]); // "no reference crosses any byte": a lie
        let mut enc = flate2::GzBuilder::new()
            .extra(extra)
            .write(Vec::new(), Compression::new(6));
        enc.write_all(&plain).expect("gzip");
        let gz = enc.finish().expect("gzip");
        // Level 6 ends a block every few hundred KB here: a checkpoint at each.
        let mut reader = GzipReader::recording(&gz[..], 10_000).expect("reader");
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("decode");
        assert_eq!(out, plain);
        let points = reader.take_checkpoints();
        assert!(points.len() >= 5 && points.iter().all(|p| p.window.is_empty()));
        let mut failed = 0;
        for p in &points {
            let mut rest = Vec::new();
            let read = GzipReader::resume(&gz[p.read_from() as usize..], p)
                .and_then(|mut r| r.read_to_end(&mut rest));
            match read {
                Ok(_) => assert!(rest == plain[p.output as usize..], "wrong bytes from {p:?}"),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                    failed += 1;
                }
            }
        }
        assert!(failed > 0, "text has references across every checkpoint");
    }

    #[test]
    fn independent_blocks_note_is_found_among_other_subfields_only_when_whole() {
        let mut h = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 14, 0];
        h.extend(b"AP\x02\x00xy"); // another subfield first
        h.extend(INDEPENDENT_BLOCKS_ID);
        h.extend([4, 0, 0, 0, 16, 0]);
        assert_eq!(independent_blocks(&h), Some(1 << 20));
        assert_eq!(independent_blocks(&h[..h.len() - 1]), None);
        let mut no_flag = h.clone();
        no_flag[3] = 0;
        assert_eq!(independent_blocks(&no_flag), None);
        assert_eq!(independent_blocks(&gzip(b"plain", 6)), None);
    }

    pub(crate) fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::new(level));
        enc.write_all(data).expect("gzip");
        enc.finish().expect("gzip")
    }

    /// One gzip member whose deflate stream is cut into small blocks by flushes of every kind
    /// (sync and full flushes end in empty stored blocks, partial ones in empty fixed blocks).
    pub(crate) fn gzip_flushed(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut c = Compress::new(Compression::new(6), false);
        let mut body = Vec::with_capacity(data.len());
        let flushes = [
            FlushCompress::Sync,
            FlushCompress::Partial,
            FlushCompress::None,
            FlushCompress::Full,
        ];
        let mut chunks = data.chunks(chunk).peekable();
        let mut i = 0;
        loop {
            let (input, flush) = match chunks.next() {
                Some(input) if chunks.peek().is_some() => (input, flushes[i % flushes.len()]),
                Some(input) => (input, FlushCompress::Finish),
                None => (&[][..], FlushCompress::Finish),
            };
            i += 1;
            let mut pos = 0;
            loop {
                body.reserve(input.len() + 1024);
                let before = c.total_in();
                let status = c
                    .compress_vec(&input[pos..], &mut body, flush)
                    .expect("deflate");
                pos += (c.total_in() - before) as usize;
                if pos == input.len()
                    && (flush != FlushCompress::Finish || status == flate2::Status::StreamEnd)
                    && body.capacity() > body.len()
                {
                    break;
                }
            }
            if flush == FlushCompress::Finish {
                break;
            }
        }
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    fn decompress(gz: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        GzipReader::new(gz)?.read_to_end(&mut out)?;
        Ok(out)
    }

    pub(crate) fn record(gz: &[u8], span: u64) -> (Vec<u8>, Vec<Checkpoint>) {
        let mut r = GzipReader::recording(gz, span).expect("init");
        let mut out = Vec::new();
        // Small reads, as the tar reader makes, so boundaries fall at every kind of place.
        let mut buf = [0u8; 700];
        loop {
            let n = r.read(&mut buf).expect("decompress");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (out, r.take_checkpoints())
    }

    fn resume<'a>(gz: &'a [u8], cp: &Checkpoint) -> GzipReader<&'a [u8]> {
        GzipReader::resume(&gz[cp.read_from() as usize..], cp).expect("resume")
    }

    /// Checks every checkpoint: a read of `len` bytes there, and one byte either side.
    fn check_all(gz: &[u8], plain: &[u8], points: &[Checkpoint]) {
        for cp in points {
            let at = cp.output as usize;
            assert_eq!(&cp.window[..], &plain[at - cp.window.len()..at], "{cp:?}");
            let mut r = resume(gz, cp);
            assert_eq!(r.position(), cp.output);
            let mut got = vec![0; 1000.min(plain.len() - at)];
            r.read_exact(&mut got).expect("read at checkpoint");
            assert_eq!(got, &plain[at..at + got.len()], "{cp:?}");
        }
        // The last checkpoint reads on to the end, through later members' headers and trailers.
        if let Some(cp) = points.last() {
            let mut rest = Vec::new();
            resume(gz, cp).read_to_end(&mut rest).expect("read to end");
            assert_eq!(rest, &plain[cp.output as usize..]);
        }
    }

    #[test]
    fn decompresses_like_flate2() {
        let plain = sample(1, 300_000);
        for level in [0, 1, 6, 9] {
            assert_eq!(decompress(&gzip(&plain, level)).expect("gzip"), plain);
        }
        assert_eq!(decompress(&gzip(b"", 6)).expect("empty"), b"");
        // Reads smaller and larger than the output buffer take different paths.
        let gz = gzip(&plain, 6);
        for size in [1, 511, OUT_BUF - 1, OUT_BUF, 3 * OUT_BUF + 7] {
            let mut r = GzipReader::new(&gz[..]).expect("init");
            let mut out = Vec::new();
            let mut buf = vec![0; size];
            loop {
                let n = r.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                assert_eq!(r.position(), out.len() as u64);
            }
            assert_eq!(out, plain, "reads of {size}");
        }
    }

    #[test]
    fn checkpoints_resume_exactly() {
        let plain = sample(2, 2_000_000);
        for level in [0, 1, 6, 9] {
            let gz = gzip(&plain, level);
            let (out, points) = record(&gz, 100_000);
            assert_eq!(out, plain, "level {level}");
            // Blocks of this repetitive text are long (zlib-rs's level 1 writes few, huge ones):
            // checkpoints can only be that sparse.
            let enough = match level {
                0 => 10,
                1 => 1,
                _ => 4,
            };
            assert!(
                points.len() >= enough,
                "level {level}: {} points",
                points.len()
            );
            check_all(&gz, &plain, &points);
        }
    }

    #[test]
    fn checkpoints_after_flushes_and_empty_blocks() {
        let plain = sample(3, 600_000);
        let gz = gzip_flushed(&plain, 3_001);
        assert_eq!(decompress(&gz).expect("valid"), plain);
        let (out, points) = record(&gz, 1);
        assert_eq!(out, plain);
        assert!(points.len() > 100, "{} points", points.len());
        assert!(
            points.iter().any(|p| p.bits != 0),
            "no checkpoint inside a byte"
        );
        check_all(&gz, &plain, &points);
    }

    #[test]
    fn multi_member_checkpoints_in_later_members() {
        let plain = sample(4, 1_500_000);
        // Odd cuts, an empty member, and members of several levels.
        let mut gz = Vec::new();
        let cuts = [0, 1, 333_333, 333_333, 700_001, 1_200_000, plain.len()];
        for (i, w) in cuts.windows(2).enumerate() {
            gz.extend(gzip(&plain[w[0]..w[1]], [1, 6, 9][i % 3]));
        }
        let (out, points) = record(&gz, 64 * 1024);
        assert_eq!(out, plain);
        assert!(points.iter().any(|p| p.output >= 1_200_000), "{points:?}");
        // Checkpoints inside later members, and on a member's first block (empty window).
        assert!(
            points
                .iter()
                .any(|p| p.output > 333_333 && !p.window.is_empty()),
            "{points:?}"
        );
        assert!(points.iter().any(|p| p.window.is_empty()), "{points:?}");
        check_all(&gz, &plain, &points);
        let checkpoints = Checkpoints::new(points.clone(), plain.len() as u64).expect("valid");
        assert_eq!(checkpoints.at_or_before(0), None);
        for p in &points {
            assert_eq!(checkpoints.at_or_before(p.output), Some(p));
            assert_eq!(checkpoints.at_or_before(p.output + 1), Some(p));
            let before = checkpoints.at_or_before(p.output - 1);
            assert!(before.is_none_or(|b| b.output < p.output));
        }
    }

    #[test]
    fn corruption_is_an_error_never_wrong_data() {
        let plain = sample(5, 200_000);
        let mut gz = gzip_flushed(&plain[..120_000], 5_000);
        let second = gz.len();
        gz.extend(gzip(&plain[120_000..], 1));
        let (_, points) = record(&gz, 30_000);
        let first_member: Vec<_> = points.iter().filter(|p| p.input < second as u64).collect();
        assert!(!first_member.is_empty());
        for i in (10..gz.len()).step_by(131) {
            let mut bad = gz.clone();
            bad[i] ^= 0x10;
            // Header bytes such as MTIME are not checked and change nothing.
            if let Ok(out) = decompress(&bad) {
                assert_eq!(out, plain, "flipped byte {i}: wrong data");
            }
            // From a checkpoint the CRC of its own member is out of reach (the indexing pass
            // checked it), but every later member is read whole and checked.
            if i >= second {
                for cp in &first_member {
                    let mut out = Vec::new();
                    if resume(&bad, cp).read_to_end(&mut out).is_ok() {
                        assert_eq!(out, &plain[cp.output as usize..], "flipped byte {i}");
                    }
                }
            }
        }
    }

    /// Regression: ordering a checkpoint read from a file multiplied its offset unchecked.
    #[test]
    fn checkpoints_at_absurd_offsets_are_refused_without_overflow() {
        let point = |input| Checkpoint {
            input,
            bits: 3,
            output: 10,
            window: Box::new([]),
        };
        assert!(Checkpoints::new(vec![point(u64::MAX), point(1)], 100).is_none());
    }

    #[test]
    fn truncated_or_trailing_garbage_is_an_error() {
        let plain = sample(6, 100_000);
        let gz = gzip(&plain, 6);
        for n in (1..gz.len())
            .step_by(97)
            .chain([gz.len() - 1, gz.len() - 8])
        {
            let err = decompress(&gz[..n]).expect_err("truncated stream accepted");
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "cut at {n}: {err}"
            );
        }
        let mut garbage = gz.clone();
        garbage.extend_from_slice(b"\0\0\0\0");
        let err = decompress(&garbage).expect_err("trailing garbage accepted");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let mut r = GzipReader::new(&garbage[..]).expect("init");
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        assert!(
            r.read(&mut [0; 10]).is_err(),
            "reads after an error must fail too"
        );
    }

    #[test]
    fn checkpoints_reject_what_no_stream_has() {
        let cp = |input, bits, output, window: usize| Checkpoint {
            input,
            bits,
            output,
            window: vec![0; window].into_boxed_slice(),
        };
        assert!(Checkpoints::new(vec![cp(10, 3, 100, 100), cp(20, 0, 200, 100)], 200).is_some());
        for bad in [
            vec![cp(10, 8, 100, 0)],
            vec![cp(0, 1, 100, 0)],
            vec![cp(10, 0, 100, 101)],
            vec![cp(10, 0, 100_000, WINDOW + 1)],
            vec![cp(10, 0, 300, 0)],
            vec![cp(10, 0, 100, 0), cp(10, 0, 150, 0)],
            vec![cp(10, 0, 100, 0), cp(20, 0, 100, 0)],
            vec![cp(20, 0, 100, 0), cp(10, 0, 150, 0)],
        ] {
            assert!(Checkpoints::new(bad.clone(), 200).is_none(), "{bad:?}");
        }
    }
}
