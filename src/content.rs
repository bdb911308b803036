//! File contents on demand: `read_at(extent, offset, buf)` over the layer blobs, for the FUSE
//! mount (export streams layers in one pass instead, see `export.rs`).
//!
//! Uncompressed layers are read in place with positioned reads. Compressed layers keep a few
//! decompression cursors per layer: a read continues from the nearest cursor at or before its
//! offset, else decompresses from the start of the layer. No lock is held while decompressing.

use std::io::{self, BufReader, Read};
use std::sync::Mutex;

use crate::blob::{Blob, BlobReader, Compression, Decoder, open_decoded};
use crate::source::Layer;
use crate::tree::Extent;

/// Cursors kept per compressed layer.
const CURSORS_PER_LAYER: usize = 4;

struct Cursor {
    decoder: Decoder<BufReader<BlobReader>>,
    pos: u64,
}

struct LayerData {
    blob: Blob,
    compression: Compression,
    cursors: Mutex<Vec<Cursor>>,
}

/// Reads file contents from the layers of one image.
pub struct Content {
    layers: Vec<LayerData>,
}

impl Content {
    /// Prepares readers for these layers (nothing is read yet).
    pub fn new(layers: &[Layer]) -> Self {
        Content {
            layers: layers
                .iter()
                .map(|l| LayerData {
                    blob: l.blob.clone(),
                    compression: l.compression,
                    cursors: Mutex::new(Vec::new()),
                })
                .collect(),
        }
    }

    /// Reads up to `buf.len()` bytes of a file at `offset`; short only at the end of the file.
    pub fn read_at(&self, extent: &Extent, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= extent.size {
            return Ok(0);
        }
        let n = buf.len().min((extent.size - offset) as usize);
        let buf = &mut buf[..n];
        let layer = self
            .layers
            .get(extent.layer as usize)
            .ok_or_else(|| io::Error::other("file refers to a missing layer"))?;
        let pos = extent.offset + offset;
        if layer.compression == Compression::None {
            layer.blob.read_exact_at(buf, pos)?;
            return Ok(n);
        }
        let mut cursor = layer.take_cursor(pos)?;
        let result = cursor.read_exact_at(buf, pos);
        if result.is_ok() {
            layer.return_cursor(cursor);
        }
        result.map(|()| n)
    }
}

impl LayerData {
    /// The cursor furthest along that is not past `pos`, or a fresh one.
    fn take_cursor(&self, pos: u64) -> io::Result<Cursor> {
        {
            let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            let best = cursors
                .iter()
                .enumerate()
                .filter(|(_, c)| c.pos <= pos)
                .max_by_key(|(_, c)| c.pos)
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Ok(cursors.swap_remove(i));
            }
        }
        Ok(Cursor {
            decoder: open_decoded(&self.blob, self.compression)?,
            pos: 0,
        })
    }

    fn return_cursor(&self, cursor: Cursor) {
        let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        cursors.push(cursor);
        if cursors.len() > CURSORS_PER_LAYER {
            // Drop the one least likely to serve a later read: the one furthest behind.
            if let Some(i) = cursors
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.pos)
                .map(|(i, _)| i)
            {
                cursors.swap_remove(i);
            }
        }
    }
}

impl Cursor {
    fn read_exact_at(&mut self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let skip = pos - self.pos;
        let skipped = io::copy(&mut (&mut self.decoder).take(skip), &mut io::sink())?;
        self.pos += skipped;
        if skipped < skip {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "layer ends before the file",
            ));
        }
        self.decoder.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }
}
