//! Random access into zstd layers that have several frames (zstd:chunked, `zstd` of
//! concatenated files, seekable-format writers): a frame depends on nothing before it, so the
//! start of every frame is a place where decompression can begin. The indexing pass notes one
//! such frame start after every [`crate::zran::SPAN`] of output, as a [`Checkpoint`] with no
//! window and no bit offset, and a later read starts a fresh decoder there. A layer of one
//! frame (what `zstd -T0` and most tools write) gets no checkpoints: its reads start at the
//! beginning of the layer, as documented in `content.rs`.

use std::io::{self, BufRead, Read};

use zstd::stream::raw::{Decoder as RawDecoder, InBuffer, Operation, OutBuffer};

use crate::zran::Checkpoint;

/// A zstd decoder over all the frames of a stream that knows where each frame starts.
pub struct ZstdReader<R> {
    input: R,
    decoder: RawDecoder<'static>,
    /// Compressed bytes consumed, counted from the start of the stream.
    input_pos: u64,
    /// Decompressed bytes produced, counted from the start of the stream.
    output_pos: u64,
    /// True between frames: before the first one, and once a frame is decoded and flushed.
    between_frames: bool,
    /// With `Some`, the span between recorded frame starts and the points so far.
    recording: Option<(u64, Vec<Checkpoint>)>,
}

impl<R: BufRead> ZstdReader<R> {
    /// Decodes `input` from the start of the stream.
    pub fn new(input: R) -> io::Result<Self> {
        Ok(ZstdReader {
            input,
            decoder: RawDecoder::new()?,
            input_pos: 0,
            output_pos: 0,
            between_frames: true,
            recording: None,
        })
    }

    /// Decodes `input` from the start, noting the first frame start after every `span` bytes of
    /// output ([`ZstdReader::take_checkpoints`]).
    pub fn recording(input: R, span: u64) -> io::Result<Self> {
        let mut reader = Self::new(input)?;
        reader.recording = Some((span.max(1), Vec::new()));
        Ok(reader)
    }

    /// Decodes from a frame start that an earlier recording noted; `input` must be positioned at
    /// `checkpoint.input` in the compressed stream.
    pub fn resume(input: R, checkpoint: &Checkpoint) -> io::Result<Self> {
        let mut reader = Self::new(input)?;
        reader.input_pos = checkpoint.input;
        reader.output_pos = checkpoint.output;
        Ok(reader)
    }

    /// Offset in the decompressed stream of the next byte read.
    pub fn position(&self) -> u64 {
        self.output_pos
    }

    /// The frame starts recorded so far.
    pub fn take_checkpoints(&mut self) -> Vec<Checkpoint> {
        self.recording
            .as_mut()
            .map(|(_, points)| std::mem::take(points))
            .unwrap_or_default()
    }

    /// The compressed input, positioned after what was consumed.
    pub fn into_inner(self) -> R {
        self.input
    }

    fn note_frame_start(&mut self) {
        if let Some((span, points)) = &mut self.recording {
            let last = points.last().map_or(0, |p| p.output);
            if self.output_pos >= last + *span {
                points.push(Checkpoint {
                    input: self.input_pos,
                    bits: 0,
                    output: self.output_pos,
                    window: Box::new([]),
                });
            }
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.input.fill_buf()?.is_empty() {
                if self.between_frames {
                    return Ok(0);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "zstd stream ends inside a frame",
                ));
            }
            if self.between_frames {
                self.note_frame_start();
            }
            // Already buffered: no second read.
            let data = self.input.fill_buf()?;
            let mut input = InBuffer::around(data);
            let mut output = OutBuffer::around(&mut *buf);
            // 0 means a frame is complete and all its output flushed; the next call starts
            // the next frame (or skips a skippable one).
            let hint = self.decoder.run(&mut input, &mut output)?;
            let (consumed, produced) = (input.pos(), output.pos());
            self.input.consume(consumed);
            self.input_pos += consumed as u64;
            self.output_pos += produced as u64;
            self.between_frames = hint == 0;
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use crate::zran::tests::sample;

    /// `plain` as one zstd frame per `frame` bytes.
    pub(crate) fn zstd_frames(plain: &[u8], frame: usize) -> Vec<u8> {
        plain
            .chunks(frame)
            .flat_map(|c| zstd::encode_all(c, 3).expect("zstd"))
            .collect()
    }

    fn read_all(mut r: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn records_a_frame_start_after_each_span_and_resumes_there() {
        let plain = sample(21, 500_000);
        let z = zstd_frames(&plain, 30_000);
        let mut reader = ZstdReader::recording(&z[..], 100_000).expect("reader");
        assert_eq!(read_all(&mut reader).expect("decode"), plain);
        let points = reader.take_checkpoints();
        // Frames end every 30,000 bytes: the first frame start at or after each 100,000.
        let outputs: Vec<u64> = points.iter().map(|p| p.output).collect();
        assert_eq!(outputs, [120_000, 240_000, 360_000, 480_000]);
        for p in &points {
            assert!(p.window.is_empty() && p.bits == 0, "{p:?}");
            let resumed = ZstdReader::resume(&z[p.input as usize..], p).expect("resume");
            assert_eq!(resumed.position(), p.output);
            assert_eq!(
                read_all(resumed).expect("decode"),
                &plain[p.output as usize..]
            );
        }
    }

    #[test]
    fn one_frame_gives_no_checkpoints_and_skippable_frames_are_skipped() {
        let plain = sample(22, 300_000);
        let mut z = zstd::encode_all(&plain[..], 3).expect("zstd");
        let mut reader = ZstdReader::recording(&z[..], 10_000).expect("reader");
        assert_eq!(read_all(&mut reader).expect("decode"), plain);
        assert!(reader.take_checkpoints().is_empty());
        // A skippable frame (magic 0x184D2A50, little-endian length, payload), as zstd:chunked
        // appends its table of contents.
        z.extend([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        z.extend(zstd::encode_all(&b"tail"[..], 3).expect("zstd"));
        let mut expected = plain.clone();
        expected.extend(b"tail");
        assert_eq!(
            read_all(ZstdReader::new(&z[..]).expect("reader")).unwrap(),
            expected
        );
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_an_error() {
        let plain = sample(23, 200_000);
        let z = zstd_frames(&plain, 50_000);
        for cut in [z.len() - 1, z.len() / 2, 5] {
            let err = read_all(ZstdReader::new(&z[..cut]).expect("reader")).unwrap_err();
            assert!(
                err.kind() == io::ErrorKind::UnexpectedEof || err.kind() == io::ErrorKind::Other,
                "cut at {cut}: {err}"
            );
        }
        // The second frame's magic number broken.
        let first = zstd::encode_all(&plain[..50_000], 3).expect("zstd").len();
        let mut garbage = z.clone();
        garbage[first] ^= 0xff;
        assert!(read_all(ZstdReader::new(&garbage[..]).expect("reader")).is_err());
    }
}
