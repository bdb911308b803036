//! File contents on demand: `read_at(extent, offset, buf)` over the layer blobs, for the FUSE
//! mount and `flatfs cat` (export streams layers in one pass instead, see `export.rs`).
//!
//! Uncompressed layers are read in place with positioned reads. Compressed layers are read a
//! block at a time: each layer keeps a few decompression cursors, and a block is decompressed
//! from the nearest cursor at or before its start. Gzip layers also have the checkpoints their
//! indexing pass recorded (`zran.rs`): when no cursor is closer, decompression starts at the
//! last checkpoint before the block, so a read costs about one span (1 MiB of output, more only
//! where deflate blocks are longer) plus one block wherever it lands. A zstd layer of several
//! frames has checkpoints at frame starts (`zstd_frames.rs`), used the same way; one of a
//! single frame (the usual case) has none, and a block with no cursor behind it is
//! decompressed from the start of the layer.
//!
//! Decompressed bytes are kept in a small cache of aligned blocks ([`BLOCK`] bytes, at most
//! [`CACHED_BLOCKS`] of them for the whole image plus one per compressed layer, least recently
//! used out first), so that neighbouring reads — the small files of one directory, read in any
//! order, or a file read again after the kernel dropped its pages — cost a copy instead of a
//! decompression.
//!
//! No lock is held while decompressing: a cursor is taken out of its layer's pool for the read
//! and put back after, so readers of other layers, or of the same layer elsewhere, go on. Only
//! a reader that needs the very block another is decompressing waits for it, rather than
//! decompressing it a second time.
//!
//! With a cache directory ([`Content::with_disk_cache`]), a layer whose reads waste more than
//! about half a pass of decompression (or any read out of order, for a layer that can only be
//! decompressed from its start) is decompressed once into a file there (`content_cache.rs`),
//! and its reads are then served from that file: any read order costs about one pass.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader, Read};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::blob::{Blob, BlobReader, Compression, Decoder, open_decoded};
use crate::content_cache::{LayerCache, Plan};
use crate::source::Layer;
use crate::tree::Extent;
use crate::zran::{Checkpoint, Checkpoints, GzipReader};
use crate::zstd_frames::ZstdReader;

/// Size of a cached block of decompressed layer bytes, aligned on multiples of itself.
pub const BLOCK: u64 = 256 * 1024;

/// Blocks kept for the whole image, 16 MiB, plus one per compressed layer (below).
pub const CACHED_BLOCKS: usize = 64;

/// Cursors kept per compressed layer.
const CURSORS_PER_LAYER: usize = 4;

/// Compressed bytes read ahead by a cursor: about a quarter of a span, so a read from a
/// checkpoint costs a few positioned reads and sequential reads few system calls.
const INPUT_BUF: usize = 128 * 1024;

struct Cursor {
    decoder: Decoder<BufReader<BlobReader>>,
    pos: u64,
}

struct LayerData {
    blob: Blob,
    compression: Compression,
    checkpoints: Option<Arc<Checkpoints>>,
    cursors: Mutex<Vec<Cursor>>,
    /// The decompressed copy on disk, when there is a cache directory.
    disk: Option<LayerCache>,
    /// Decompressed bytes spent by the block path (skipped ones included).
    spent: AtomicU64,
}

/// (layer index, block number).
type BlockKey = (u32, u64);

#[derive(Default)]
struct Blocks {
    /// Cached blocks and when each was last used.
    cached: HashMap<BlockKey, (Arc<[u8]>, u64)>,
    /// Blocks being decompressed right now, by some reader.
    loading: HashSet<BlockKey>,
    clock: u64,
}

/// Recently decompressed blocks, shared by all readers.
struct BlockCache {
    capacity: usize,
    blocks: Mutex<Blocks>,
    loaded: Condvar,
}

/// Reads file contents from the layers of one image.
pub struct Content {
    layers: Vec<LayerData>,
    cache: BlockCache,
    /// For `flatfs stats`: bytes read, blocks found cached, blocks decompressed (and their bytes).
    counters: ContentStats,
}

/// What reads through a [`Content`] cost so far (cheap atomic counters).
#[derive(Debug, Default)]
pub struct ContentStats {
    /// File bytes handed to readers.
    pub read_bytes: std::sync::atomic::AtomicU64,
    /// Compressed-layer blocks found in the block cache.
    pub block_hits: std::sync::atomic::AtomicU64,
    /// Blocks decompressed.
    pub blocks_decompressed: std::sync::atomic::AtomicU64,
    /// Bytes decompressed into those blocks.
    pub decompressed_bytes: std::sync::atomic::AtomicU64,
}

impl Content {
    /// Prepares readers for these layers (nothing is read yet). `checkpoints[i]`, when there,
    /// are those recorded for gzip layer `i` ([`crate::layer::LayerIndex::checkpoints`]).
    pub fn new(layers: &[Layer], checkpoints: &[Option<Arc<Checkpoints>>]) -> Self {
        Content {
            layers: layers
                .iter()
                .enumerate()
                .map(|(i, l)| LayerData {
                    blob: l.blob.clone(),
                    compression: l.compression,
                    // Checkpoints index a compressed stream: a layer read from a decompressed
                    // copy (export's spool) has none.
                    checkpoints: match l.compression {
                        Compression::Gzip | Compression::Zstd => {
                            checkpoints.get(i).cloned().flatten()
                        }
                        Compression::None => None,
                    },
                    cursors: Mutex::new(Vec::new()),
                    disk: None,
                    spent: AtomicU64::new(0),
                })
                .collect(),
            cache: BlockCache {
                // A walk in name order takes a file from each layer that touches a directory
                // in turn: every layer keeps room for the block it is reading, or with 100
                // layers each is evicted before the walk comes back to it, and its cursor has
                // moved past it (a read of every file of the 100-layer bench image read 959 MB
                // of 56 MB of blobs; with this, 60 MB). Issue 15, item 4.
                capacity: CACHED_BLOCKS
                    + layers
                        .iter()
                        .filter(|l| l.compression != Compression::None)
                        .count(),
                blocks: Mutex::default(),
                loaded: Condvar::new(),
            },
            counters: ContentStats::default(),
        }
    }

    /// The counters of reads so far.
    pub fn counters(&self) -> &ContentStats {
        &self.counters
    }

    /// The layer blobs, bottom layer first.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.layers.iter().map(|l| &l.blob)
    }

    /// Lets compressed layers (`layers`, as given to [`Content::new`]) be cached decompressed
    /// in cache directory `dir` (`content_cache.rs`), within `$FLATFS_CONTENT_CACHE_MAX`.
    pub fn with_disk_cache(self, layers: &[Layer], dir: Option<&Path>) -> Self {
        self.with_disk_cache_max(layers, dir, crate::content_cache::max_size())
    }

    /// [`Content::with_disk_cache`] with a bound of `max` bytes.
    pub fn with_disk_cache_max(mut self, layers: &[Layer], dir: Option<&Path>, max: u64) -> Self {
        for (data, layer) in self.layers.iter_mut().zip(layers) {
            data.disk = LayerCache::new(layer, dir, max, data.checkpoints.clone());
        }
        self
    }

    /// The content cache of layer `index` (tests).
    #[cfg(test)]
    pub(crate) fn layers_disk(&self, index: usize) -> &LayerCache {
        self.layers[index].disk.as_ref().expect("a content cache")
    }

    /// Per layer: decompressed bytes spent by block reads and by the content cache's pass.
    pub fn decompressed(&self) -> Vec<(u64, u64)> {
        self.layers
            .iter()
            .map(|l| {
                let pass = l.disk.as_ref().map_or(0, |d| d.pass_bytes());
                (l.spent.load(Ordering::Relaxed), pass)
            })
            .collect()
    }

    /// Reads up to `buf.len()` bytes of a file at `offset`; short only at the end of the file.
    pub fn read_at(&self, extent: &Extent, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= extent.size {
            return Ok(0);
        }
        let n = buf.len().min((extent.size - offset) as usize);
        let buf = &mut buf[..n];
        self.counters.read_bytes.fetch_add(n as u64, Relaxed);
        let Some(map) = extent.sparse else {
            let pos = extent.offset.checked_add(offset).ok_or_else(out_of_range)?;
            self.read_stored(extent.layer, pos, buf)?;
            return Ok(n);
        };
        // A sparse file: its runs read like any file's bytes, holes are zeros.
        let mut done = 0;
        // The first run that ends after `offset`.
        let mut i = map.partition_point(|s| s.logical + s.len <= offset);
        while done < n {
            let at = offset + done as u64;
            let left = n - done;
            match map.get(i) {
                Some(s) if s.logical <= at => {
                    let within = at - s.logical;
                    let len = left.min((s.len - within) as usize);
                    let pos = s.tar.checked_add(within).ok_or_else(out_of_range)?;
                    self.read_stored(extent.layer, pos, &mut buf[done..done + len])?;
                    done += len;
                    i += 1;
                }
                next => {
                    let hole = next.map_or(u64::MAX, |s| s.logical - at);
                    let len = left.min(usize::try_from(hole).unwrap_or(usize::MAX));
                    buf[done..done + len].fill(0);
                    done += len;
                }
            }
        }
        Ok(n)
    }

    /// Logs what each layer fetched from a registry by ranges (lazy mounts).
    pub fn log_fetched(&self) {
        for (i, l) in self.layers.iter().enumerate() {
            l.blob.log_fetched();
            if l.compression != Compression::None {
                let pass = l.disk.as_ref().map_or(0, |d| d.pass_bytes());
                log::info!(
                    "layer {}: decompressed {} bytes by block reads, {pass} by the content cache",
                    i + 1,
                    l.spent.load(Ordering::Relaxed)
                );
            }
        }
    }

    /// Where the data run or hole holding `offset` ends (`SEEK_HOLE`/`SEEK_DATA` answers):
    /// `Some((true, end))` inside data, `Some((false, end))` inside a hole, `None` at or past
    /// the end of the file. Every file ends in a hole, the virtual one at its end.
    pub fn region(extent: &Extent, offset: u64) -> Option<(bool, u64)> {
        if offset >= extent.size {
            return None;
        }
        let Some(map) = extent.sparse else {
            return Some((true, extent.size));
        };
        let i = map.partition_point(|s| s.logical + s.len <= offset);
        Some(match map.get(i) {
            Some(s) if s.logical <= offset => (true, s.logical + s.len),
            Some(s) => (false, s.logical),
            None => (false, extent.size),
        })
    }

    /// Fills `buf` with the bytes at `pos` of layer `index`'s decompressed tar.
    fn read_stored(&self, index: u32, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = buf.len();
        let layer = self
            .layers
            .get(index as usize)
            .ok_or_else(|| io::Error::other("file refers to a missing layer"))?;
        if pos.checked_add(n as u64).is_none() {
            return Err(out_of_range());
        }
        if let Some(toc) = layer.blob.toc() {
            return toc.read(pos, buf);
        }
        if layer.compression == Compression::None {
            return layer.blob.read_exact_at(buf, pos);
        }
        if let Some(read) = layer.disk.as_ref().and_then(|d| d.read(pos, buf)) {
            return read;
        }
        let mut done = 0;
        while done < n {
            let at = pos + done as u64;
            let block = self.block(index, layer, at / BLOCK)?;
            let within = (at % BLOCK) as usize;
            if within >= block.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "layer ends before the file",
                ));
            }
            let len = (n - done).min(block.len() - within);
            buf[done..done + len].copy_from_slice(&block[within..within + len]);
            done += len;
        }
        Ok(())
    }

    /// Block `number` of a compressed layer: from the cache, or decompressed (and cached).
    fn block(&self, index: u32, layer: &LayerData, number: u64) -> io::Result<Arc<[u8]>> {
        let key = (index, number);
        let cache = &self.cache;
        {
            let mut blocks = cache.blocks.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                blocks.clock += 1;
                let now = blocks.clock;
                if let Some((block, used)) = blocks.cached.get_mut(&key) {
                    *used = now;
                    self.counters.block_hits.fetch_add(1, Relaxed);
                    return Ok(block.clone());
                }
                if !blocks.loading.contains(&key) {
                    break;
                }
                blocks = cache.loaded.wait(blocks).unwrap_or_else(|e| e.into_inner());
            }
            blocks.loading.insert(key);
        }
        // Whatever happens to this load, even a panic, the key is released and waiters woken.
        let loading = Loading { cache, key };
        let result = layer.read_block(number * BLOCK);
        if let Ok(block) = &result {
            self.counters.blocks_decompressed.fetch_add(1, Relaxed);
            (self.counters.decompressed_bytes).fetch_add(block.len() as u64, Relaxed);
        }
        let mut blocks = cache.blocks.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(block) = &result {
            if blocks.cached.len() >= cache.capacity
                && let Some(oldest) = blocks
                    .cached
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| *k)
            {
                blocks.cached.remove(&oldest);
            }
            let now = blocks.clock;
            blocks.cached.insert(key, (block.clone(), now));
        }
        drop(blocks);
        drop(loading);
        result
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "file extent out of range")
}

/// A block being loaded; dropping it (after the load, or while unwinding) ends the load.
struct Loading<'a> {
    cache: &'a BlockCache,
    key: BlockKey,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut blocks = self.cache.blocks.lock().unwrap_or_else(|e| e.into_inner());
        blocks.loading.remove(&self.key);
        drop(blocks);
        // Waiters retry: they find the block, or, after an error, try (and report) it themselves.
        self.cache.loaded.notify_all();
    }
}

impl LayerData {
    /// Up to [`BLOCK`] decompressed bytes from `pos`: fewer only at the end of the layer.
    fn read_block(&self, pos: u64) -> io::Result<Arc<[u8]>> {
        if let Some(disk) = &self.disk
            && disk.plan(pos, BLOCK, pos - self.start_for(pos)) == Plan::Wait
            && let Some(block) = disk.wait_read(pos, BLOCK as usize)
        {
            return Ok(block?.into());
        }
        let mut cursor = self.take_cursor(pos)?;
        let from = cursor.pos;
        let mut block = vec![0; BLOCK as usize];
        let n = cursor.read_at(&mut block, pos);
        // Whatever the outcome, the bytes were decompressed.
        let spent = cursor.pos - from;
        self.spent.fetch_add(spent, Ordering::Relaxed);
        let n = n?;
        self.return_cursor(cursor);
        block.truncate(n);
        Ok(block.into())
    }

    /// Where decompressing for `pos` would start: the furthest cursor not past it, or the
    /// checkpoint before it, whichever is nearer (what [`LayerData::take_cursor`] picks).
    fn start_for(&self, pos: u64) -> u64 {
        let checkpoint = self.checkpoints.as_ref().and_then(|c| c.at_or_before(pos));
        let start = checkpoint.map_or(0, |c| c.output);
        let cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        cursors
            .iter()
            .map(|c| c.pos)
            .filter(|&p| p <= pos)
            .max()
            .map_or(start, |p| p.max(start))
    }

    /// The cursor furthest along that is not past `pos`, unless a checkpoint is closer: then a
    /// fresh cursor there (or at the start of the layer when neither is behind `pos`).
    fn take_cursor(&self, pos: u64) -> io::Result<Cursor> {
        let checkpoint = self.checkpoints.as_ref().and_then(|c| c.at_or_before(pos));
        let start = checkpoint.map_or(0, |c| c.output);
        {
            let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            let best = cursors
                .iter()
                .enumerate()
                .filter(|(_, c)| c.pos <= pos)
                .max_by_key(|(_, c)| c.pos)
                .map(|(i, _)| i);
            if let Some(i) = best
                && cursors[i].pos >= start
            {
                return Ok(cursors.swap_remove(i));
            }
        }
        self.open_cursor(checkpoint)
    }

    /// A new cursor at `checkpoint`, or at the start of the layer.
    fn open_cursor(&self, checkpoint: Option<&Checkpoint>) -> io::Result<Cursor> {
        let decoder = match (self.compression, checkpoint) {
            (Compression::Gzip, _) => {
                let from = checkpoint.map_or(0, |c| c.read_from());
                let input = BufReader::with_capacity(INPUT_BUF, self.blob.reader_from(from));
                Decoder::GzipIndexed(match checkpoint {
                    Some(c) => GzipReader::resume(input, c)?,
                    None => GzipReader::new(input)?,
                })
            }
            (Compression::Zstd, Some(c)) => {
                let input = BufReader::with_capacity(INPUT_BUF, self.blob.reader_from(c.input));
                Decoder::ZstdIndexed(ZstdReader::resume(input, c)?)
            }
            _ => open_decoded(&self.blob, self.compression)?,
        };
        Ok(Cursor {
            pos: checkpoint.map_or(0, |c| c.output),
            decoder,
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
    /// Fills `buf` from layer offset `pos` (at or after the cursor); short only at the end of
    /// the layer.
    fn read_at(&mut self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let skip = pos - self.pos;
        let skipped = io::copy(&mut (&mut self.decoder).take(skip), &mut io::sink())?;
        self.pos += skipped;
        if skipped < skip {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "layer ends before the file",
            ));
        }
        let mut n = 0;
        while n < buf.len() {
            match self.decoder.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::File;
    use std::io::{Seek, Write};
    use std::os::unix::fs::FileExt;
    use std::thread;

    use crate::zran::tests::{gzip, gzip_flushed, record, sample};

    /// A one-layer image whose layer is `blob` (compressed as `compression`).
    fn layer_of(blob: &[u8], compression: Compression) -> (Layer, File) {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(blob).expect("write blob");
        file.rewind().expect("rewind");
        let copy = file.try_clone().expect("dup");
        let layer = Layer {
            number: 1,
            blob: Blob::new(Arc::new(file), 0, blob.len() as u64, "layer"),
            compression,
            digest: None,
            diff_id: None,
            descriptor: None,
        };
        (layer, copy)
    }

    /// A gzip layer of `plain` in several members, with checkpoints every ~`span` bytes.
    fn gzip_layer(plain: &[u8], span: u64) -> (Content, Checkpoints, File) {
        let mut gz = gzip_flushed(&plain[..plain.len() / 2], 4_999);
        gz.extend(gzip_flushed(&plain[plain.len() / 2..], 7_001));
        let (out, points) = record(&gz, span);
        assert_eq!(out, plain);
        let checkpoints = Checkpoints::new(points, plain.len() as u64).expect("valid");
        let (layer, file) = layer_of(&gz, Compression::Gzip);
        let content = Content::new(&[layer], &[Some(Arc::new(checkpoints.clone()))]);
        (content, checkpoints, file)
    }

    /// The whole of layer 0 as one file.
    fn whole(plain: &[u8]) -> Extent<'static> {
        Extent {
            layer: 0,
            offset: 0,
            size: plain.len() as u64,
            sparse: None,
        }
    }

    fn read(content: &Content, plain: &[u8], offset: u64, len: usize) -> Vec<u8> {
        let extent = whole(plain);
        let mut buf = vec![0; len];
        let n = content
            .read_at(&extent, offset, &mut buf)
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
        buf.truncate(n);
        buf
    }

    fn expect(plain: &[u8], offset: u64, len: usize) -> &[u8] {
        let start = (offset as usize).min(plain.len());
        &plain[start..(start + len).min(plain.len())]
    }

    #[test]
    fn reads_around_every_checkpoint() {
        let plain = sample(7, 900_000);
        let (content, checkpoints, _) = gzip_layer(&plain, 40_000);
        assert!(checkpoints.len() >= 15, "{checkpoints:?}");
        assert!(checkpoints.points().iter().any(|p| p.output > 450_000));
        // Backwards, so the cursors that earlier reads leave behind are never the way in.
        for p in checkpoints.points().iter().rev() {
            for offset in [p.output - 1, p.output, p.output + 1] {
                for len in [1, 2, 4096] {
                    assert_eq!(
                        read(&content, &plain, offset, len),
                        expect(&plain, offset, len),
                        "{len} at {offset} ({p:?})"
                    );
                }
            }
        }
        let last = plain.len() as u64 - 1;
        assert_eq!(read(&content, &plain, last, 10), &plain[plain.len() - 1..]);
        assert_eq!(read(&content, &plain, 0, 1), &plain[..1]);
        assert_eq!(read(&content, &plain, 0, plain.len()), plain);
    }

    impl Content {
        fn cached_blocks(&self) -> Vec<BlockKey> {
            let blocks = self.cache.blocks.lock().expect("lock");
            let mut keys: Vec<_> = blocks.cached.keys().copied().collect();
            keys.sort();
            keys
        }
    }

    #[test]
    fn every_compressed_layer_keeps_room_for_a_block() {
        let plains: Vec<Vec<u8>> = (0..100).map(|i| sample(100 + i, 20_000)).collect();
        let layers: Vec<Layer> = plains
            .iter()
            .map(|p| layer_of(&gzip(p, 6), Compression::Gzip).0)
            .collect();
        let content = Content::new(&layers, &[]);
        // A file from each layer in turn, twice, as a walk through a directory every layer
        // touches: the second round finds every block still cached.
        for round in 0..2 {
            for (i, plain) in plains.iter().enumerate() {
                let extent = Extent {
                    layer: i as u32,
                    ..whole(plain)
                };
                let mut buf = vec![0; 100];
                let at = 1000 + round * 5000;
                content.read_at(&extent, at, &mut buf).expect("read");
                assert!(buf == plain[at as usize..at as usize + 100], "layer {i}");
            }
            assert_eq!(content.cached_blocks().len(), 100, "round {round}");
        }
    }

    #[test]
    fn reads_across_block_boundaries() {
        let plain = sample(11, 3 * BLOCK as usize + 12_345);
        let (content, _, _) = gzip_layer(&plain, 100_000);
        for b in [3, 1, 2, 0] {
            let edge = b * BLOCK;
            for (offset, len) in [
                (edge.saturating_sub(1), 2),
                (edge.saturating_sub(5000), 10_000),
                (edge, 1),
            ] {
                assert_eq!(
                    read(&content, &plain, offset, len),
                    expect(&plain, offset, len),
                    "{len} at {offset}"
                );
            }
        }
        // One read over every block, and the layer's last byte.
        assert_eq!(read(&content, &plain, 1, plain.len()), &plain[1..]);
        let last = plain.len() as u64 - 1;
        assert_eq!(read(&content, &plain, last, 1), &plain[plain.len() - 1..]);
    }

    #[test]
    fn neighbouring_reads_come_from_the_block_cache() {
        let plain = sample(12, 2 * BLOCK as usize + 1000);
        let (content, _, file) = gzip_layer(&plain, 60_000);
        let at = BLOCK + 100;
        assert_eq!(read(&content, &plain, at, 10), expect(&plain, at, 10));
        assert_eq!(content.cached_blocks(), [(0, 1)]);
        // With the blob wrecked, only the cached block can still be read.
        file.write_all_at(&vec![0xff; plain.len()], 0)
            .expect("overwrite");
        for offset in [BLOCK, at + 5000, 2 * BLOCK - 10] {
            assert_eq!(
                read(&content, &plain, offset, 10),
                expect(&plain, offset, 10)
            );
        }
        assert!(content.read_at(&whole(&plain), 10, &mut [0; 10]).is_err());
        assert_eq!(
            content.cached_blocks(),
            [(0, 1)],
            "failed loads are not cached"
        );
    }

    #[test]
    fn the_least_recently_used_block_goes_first() {
        let plain = sample(13, 4 * BLOCK as usize);
        let (mut content, _, _) = gzip_layer(&plain, 100_000);
        content.cache.capacity = 2;
        for b in [0, 1, 0, 2] {
            read(&content, &plain, b * BLOCK, 1);
        }
        assert_eq!(content.cached_blocks(), [(0, 0), (0, 2)]);
        read(&content, &plain, 3 * BLOCK, 1);
        assert_eq!(content.cached_blocks(), [(0, 2), (0, 3)]);
    }

    #[test]
    fn a_read_starts_at_the_checkpoint_before_its_block() {
        let plain = sample(8, 600_000);
        let (content, checkpoints, file) = gzip_layer(&plain, 50_000);
        let at = plain.len() as u64 - 100;
        let block_start = at / BLOCK * BLOCK;
        let used = checkpoints
            .at_or_before(block_start)
            .expect("a checkpoint before the last block")
            .clone();
        assert!(used.output > 0, "{used:?}");
        // Wreck everything before that checkpoint: a read after it must not need it.
        file.write_all_at(&vec![0xff; used.read_from() as usize], 0)
            .expect("overwrite");
        assert_eq!(read(&content, &plain, at, 100), &plain[at as usize..]);
        assert_eq!(
            read(&content, &plain, block_start, 10),
            expect(&plain, block_start, 10)
        );
        // Before that checkpoint the stream is broken: an error, never wrong bytes.
        assert!(content.read_at(&whole(&plain), 5, &mut [0; 10]).is_err());
    }

    #[test]
    fn concurrent_readers_of_one_span() {
        let plain = sample(9, 700_000);
        let (content, checkpoints, _) = gzip_layer(&plain, 100_000);
        let p = &checkpoints.points()[checkpoints.len() / 2];
        let (start, end) = (p.output - 30_000, p.output + 60_000);
        thread::scope(|s| {
            for t in 0..8u64 {
                let (content, plain) = (&content, &plain);
                s.spawn(move || {
                    let mut x = t * 7919 + 1;
                    for _ in 0..40 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let offset = start + (x >> 33) % (end - start);
                        let len = 1 + ((x >> 13) % 20_000) as usize;
                        assert_eq!(
                            read(content, plain, offset, len),
                            expect(plain, offset, len),
                            "thread {t}: {len} at {offset}"
                        );
                    }
                });
            }
        });
    }

    #[test]
    fn gzip_without_checkpoints_and_zstd_read_from_the_start() {
        let plain = sample(10, 300_000);
        let (gz, _) = layer_of(&gzip(&plain, 6), Compression::Gzip);
        let zst = zstd::encode_all(&plain[..], 3).expect("zstd");
        let (zst, _) = layer_of(&zst, Compression::Zstd);
        let (raw, _) = layer_of(&plain, Compression::None);
        for layer in [gz, zst, raw] {
            let content = Content::new(&[layer], &[]);
            for offset in [250_000, 10, 299_999, 0, 150_000] {
                assert_eq!(
                    read(&content, &plain, offset, 5000),
                    expect(&plain, offset, 5000)
                );
            }
        }
    }

    #[test]
    fn sparse_files_read_runs_from_the_layer_and_zeros_in_holes() {
        use crate::layer::Segment;
        // The stored runs lie back to back in the layer from 1000 on; the file is 1 MiB.
        let plain = sample(3, 300_000);
        let runs = [
            Segment {
                logical: 0,
                len: 10,
                tar: 1000,
            },
            Segment {
                logical: 10,
                len: 5,
                tar: 1010,
            },
            Segment {
                logical: 200_000,
                len: 100_000,
                tar: 1015,
            },
            Segment {
                logical: (1 << 20) - 7,
                len: 7,
                tar: 101_015,
            },
        ];
        let mut file = vec![0u8; 1 << 20];
        for r in &runs {
            let (l, t, n) = (r.logical as usize, r.tar as usize, r.len as usize);
            file[l..l + n].copy_from_slice(&plain[t..t + n]);
        }
        let extent = Extent {
            layer: 0,
            offset: 1000,
            size: 1 << 20,
            sparse: Some(&runs),
        };
        assert_eq!(extent.stored(), 100_022);
        let (gz, _, _) = gzip_layer(&plain, 40_000);
        let (plain_layer, _) = layer_of(&plain, Compression::None);
        let flat = Content::new(&[plain_layer], &[None]);
        for content in [&gz, &flat] {
            for (at, len) in [
                (0, 1 << 20),
                (0, 3),
                (8, 4),
                (14, 10),
                (100, 1000),
                (199_990, 20),
                (250_000, 100_000),
                ((1 << 20) - 10, 100),
                (1 << 20, 5),
            ] {
                let mut buf = vec![7u8; len];
                let n = content.read_at(&extent, at, &mut buf).expect("read");
                let want = &file[(at as usize).min(file.len())..][..n];
                assert_eq!(n, len.min((1 << 20) - at as usize), "{len} at {at}");
                assert!(buf[..n] == *want, "{len} at {at}");
            }
        }
        // Where data and holes end, as SEEK_DATA and SEEK_HOLE see them.
        assert_eq!(Content::region(&extent, 0), Some((true, 10)));
        assert_eq!(Content::region(&extent, 12), Some((true, 15)));
        assert_eq!(Content::region(&extent, 15), Some((false, 200_000)));
        assert_eq!(
            Content::region(&extent, 300_000),
            Some((false, (1 << 20) - 7))
        );
        assert_eq!(
            Content::region(&extent, (1 << 20) - 1),
            Some((true, 1 << 20))
        );
        assert_eq!(Content::region(&extent, 1 << 20), None);
        let dense = whole(&plain);
        assert_eq!(Content::region(&dense, 5), Some((true, plain.len() as u64)));
    }
}
