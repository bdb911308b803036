//! flatfs makes a multi-layer container image behave like one filesystem.
//!
//! ```text
//! image source  ->  manifest + config  ->  layer index (per layer)  ->  merged tree  ->  consumers
//! (docker-archive,   (source/)             (layer/: headers, offsets,   (tree.rs: overlay   fs.rs: FUSE, lazy reads
//!  OCI layout,                              whiteouts, xattrs; never     rules, hardlinks,  export.rs: single-layer
//!  OCI archive)                             file data)                   frozen arena)      image or rootfs tar
//! ```
//! File bytes are never held in memory: a tree node points at a range of one layer's
//! decompressed tar, read on demand by `content.rs` (FUSE) or streamed by `export.rs`.

pub mod blob;
pub mod cli;
pub mod compress;
pub mod content;
pub mod error;
pub mod export;
pub mod inspect;
pub mod layer;
pub mod source;
pub mod tree;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use error::{Error, Result};

use layer::LayerIndex;
use source::Image;

/// Indexes the first `limit` layers (all if `None`), in parallel, bottom layer first;
/// `progress` hears of every blob byte read.
pub fn index_layers(
    image: &Image,
    limit: Option<usize>,
    progress: &(dyn Fn(u64) + Sync),
    spool_dir: Option<&std::path::Path>,
) -> Result<Vec<LayerIndex>> {
    let layers = &image.layers[..limit.unwrap_or(image.layers.len()).min(image.layers.len())];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(layers.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<LayerIndex>>>> =
        Mutex::new(layers.iter().map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(layer) = layers.get(i) else { break };
                    let r = layer::index_layer(layer, progress, spool_dir);
                    let failed = r.is_err();
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                    if failed {
                        // Stop handing out work: the first error (by layer order) is reported.
                        next.store(layers.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut out = Vec::with_capacity(layers.len());
    for r in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match r {
            Some(r) => out.push(r?),
            // Skipped after an earlier failure, reported below.
            None => continue,
        }
    }
    if out.len() != layers.len() {
        return Err(Error::invalid(&image.name, "layer indexing stopped early"));
    }
    Ok(out)
}

/// Opens an image and builds its merged tree from the first `layers` layers (all if `None`).
pub fn open_merged(
    spec: &str,
    platform: Option<&source::Platform>,
    layers: Option<usize>,
) -> Result<(Image, tree::Tree)> {
    open_merged_with(spec, platform, layers, None, &|_| {})
}

/// [`open_merged`] with a progress hook (blob bytes read) and, for export, a directory in which
/// compressed layers are kept decompressed as they are indexed: the returned image then reads
/// those layers from the copies, so no layer is decompressed twice.
pub fn open_merged_with(
    spec: &str,
    platform: Option<&source::Platform>,
    layers: Option<usize>,
    spool_dir: Option<&std::path::Path>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Image, tree::Tree)> {
    let mut image = source::open(spec, platform)?;
    if let Some(n) = layers
        && (n == 0 || n > image.layers.len())
    {
        return Err(Error::invalid(
            spec,
            format!(
                "has {} layers; --layers must be 1..={}",
                image.layers.len(),
                image.layers.len()
            ),
        ));
    }
    let mut indexes = index_layers(&image, layers, progress, spool_dir)?;
    for (layer, index) in image.layers.iter_mut().zip(&mut indexes) {
        if let Some(copy) = index.decompressed.take() {
            layer.blob = copy;
            layer.compression = blob::Compression::None;
        }
    }
    let tree = tree::merge(&indexes)?;
    Ok((image, tree))
}
