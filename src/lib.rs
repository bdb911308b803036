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
pub mod cache;
pub mod changes;
pub mod cli;
pub mod compress;
pub mod content;
pub mod content_cache;
pub mod error;
pub mod export;
pub mod fs;
pub mod inspect;
pub mod layer;
pub mod mount;
pub mod par;
pub mod pipe;
pub mod reference;
pub mod registry;
pub mod source;
pub mod squash;
pub mod stats;
pub mod toc;
pub mod tree;
pub mod zran;
pub mod zstd_frames;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use error::{Error, Result};

use layer::LayerIndex;
use source::Image;

/// How to index an image's layers.
#[derive(Default, Clone, Copy)]
pub struct IndexOptions<'a> {
    /// Only the first N layers (all if `None`).
    pub layers: Option<usize>,
    /// Keep decompressed copies of compressed layers here (for export; see
    /// [`layer::index_layer`]).
    pub spool_dir: Option<&'a std::path::Path>,
    /// The first this many layers get no spooled copy: `export --keep` copies their blobs
    /// as they are and reads their contents (if ever) in place.
    pub unspooled: usize,
    /// Load and save layer indexes here.
    pub cache: Option<&'a cache::Cache>,
    /// Told of every blob byte read (or skipped thanks to the cache).
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
}

/// Indexes layers in parallel, bottom layer first, using and filling the cache.
pub fn index_layers(image: &Image, opts: &IndexOptions) -> Result<Vec<LayerIndex>> {
    let limit = opts
        .layers
        .unwrap_or(image.layers.len())
        .min(image.layers.len());
    let layers = &image.layers[..limit];
    let progress = opts.progress.unwrap_or(&|_| {});
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(layers.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<LayerIndex>>>> =
        Mutex::new(layers.iter().map(|_| None).collect());
    let index_raw = |layer: &source::Layer| -> Result<LayerIndex> {
        // Its own verified TOC: no pass over the layer, and nothing to cache (the offsets
        // are the TOC's virtual ones, see `toc`).
        if let Some(toc) = layer.blob.toc() {
            return Ok(toc.layer_index(layer.label()));
        }
        if let Some(cache) = opts.cache {
            let expected = layer.digest.as_ref().or(layer.diff_id.as_ref());
            let verify =
                || Ok(expected.is_some_and(|d| cache::blob_digest(layer).is_ok_and(|f| f == *d)));
            if let Some(index) = cache.load(layer, verify) {
                log::info!("layer {}: index from cache", layer.label());
                progress(layer.blob.len());
                return Ok(index);
            }
        }
        let spool_dir = opts.spool_dir.filter(|_| layer.number > opts.unspooled);
        let index = layer::index_layer(layer, progress, spool_dir)?;
        log::info!(
            "layer {}: indexed {} entries",
            layer.label(),
            index.entries.len()
        );
        // A compressed layer indexed for export has no checkpoints (it is read from its spooled
        // copy); cached like that, it would leave later mounts without random access.
        let complete = spool_dir.is_none() || layer.compression == blob::Compression::None;
        if let Some(cache) = opts.cache.filter(|_| complete)
            && let Err(e) = cache.store(layer, &index)
        {
            // The cache only saves time: failing to fill it is not the user's problem.
            log::warn!(
                "cannot save the index of layer {} in {}: {e}",
                layer.label(),
                cache.dir().display()
            );
        }
        Ok(index)
    };
    let index_one = |layer: &source::Layer| -> Result<LayerIndex> {
        let mut index = index_raw(layer)?;
        // An eStargz layer read as the tar it also is: its TOC entry and prefetch landmarks
        // are the format's, not the image's (the lazy mount's TOC never lists them).
        if layer.blob.toc().is_none() && toc::estargz::is_estargz_layer(layer) {
            index
                .entries
                .retain(|e| e.path.contains(&b'/') || !toc::estargz::is_special(&e.path));
        }
        Ok(index)
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(layer) = layers.get(i) else { break };
                    let r = index_one(layer);
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

/// An opened image: its layers, their merged tree, and what reading file contents needs.
pub struct Opened {
    /// The image; compressed layers replaced by their decompressed copies when spooled.
    pub image: Image,
    /// The merged tree.
    pub tree: tree::Tree,
    /// Per layer, by position: where decompression can start inside a gzip layer.
    pub checkpoints: Vec<Option<Arc<zran::Checkpoints>>>,
}

impl Opened {
    /// A reader of file contents for this image's tree.
    pub fn content(&self) -> content::Content {
        content::Content::new(&self.image.layers, &self.checkpoints)
    }
}

/// Opens an image and builds its merged tree from the first `layers` layers (all if `None`).
pub fn open_merged(
    spec: &str,
    platform: Option<&source::Platform>,
    layers: Option<usize>,
) -> Result<Opened> {
    open_merged_with(
        spec,
        platform,
        &IndexOptions {
            layers,
            ..IndexOptions::default()
        },
    )
}

/// [`open_merged`] with options. With a spool directory, the returned image reads compressed
/// layers from their decompressed copies, so export decompresses no layer twice.
pub fn open_merged_with(
    spec: &str,
    platform: Option<&source::Platform>,
    opts: &IndexOptions,
) -> Result<Opened> {
    let image = source::open(spec, platform)?;
    check_layer_count(&image, opts.layers)?;
    open_tree(image, opts, |image| index_layers(image, opts))
}

/// The merged tree of an image's first `opts.layers` layers: from the merged-tree cache when it
/// holds this exact stack, else from `index` and a merge, which then fill that cache. A spool
/// directory (export) bypasses the merged-tree cache: the layers must be decompressed anyway.
/// (`index`'s error type is the caller's, so the CLI can keep its own context.)
pub fn open_tree<E: From<Error>>(
    image: Image,
    opts: &IndexOptions,
    index: impl FnOnce(&Image) -> std::result::Result<Vec<LayerIndex>, E>,
) -> std::result::Result<Opened, E> {
    let limit = opts
        .layers
        .unwrap_or(image.layers.len())
        .min(image.layers.len());
    // A layer read through its TOC is in the key by its TOC's digest (the tree's offsets in
    // it are virtual), not by an index file.
    let cache = opts.cache.filter(|_| opts.spool_dir.is_none());
    if let Some((tree, checkpoints)) = cache.and_then(|c| c.load_tree(&image.layers[..limit])) {
        log::info!("merged tree of {limit} layers from cache");
        return Ok(Opened {
            image,
            tree,
            checkpoints,
        });
    }
    let indexes = index(&image)?;
    let opened = merge_image(image, indexes)?;
    if let Some(cache) = cache
        && let Err(e) = cache.store_tree(&opened.image.layers[..limit], &opened.tree)
    {
        // Like the layer indexes: the cache only saves time.
        log::warn!(
            "cannot save the merged tree in {}: {e}",
            cache.dir().display()
        );
    }
    Ok(opened)
}

/// An image opened for `export --keep N`: its merged tree, and the merged tree of its first
/// `keep` layers (the base the squashed layer applies to). `index` should leave those layers
/// unspooled ([`IndexOptions::unspooled`]): they are copied as they are, not read.
pub fn open_keeping<E: From<Error>>(
    image: Image,
    keep: usize,
    index: impl FnOnce(&Image) -> std::result::Result<Vec<LayerIndex>, E>,
) -> std::result::Result<(Opened, tree::Tree), E> {
    if keep > image.layers.len() {
        return Err(Error::invalid(
            &image.name,
            format!(
                "has {} layers; --keep must be 0..={}",
                image.layers.len(),
                image.layers.len()
            ),
        )
        .into());
    }
    let indexes = index(&image)?;
    if indexes[..keep.min(indexes.len())]
        .iter()
        .any(|i| i.decompressed.is_some())
    {
        // A spooled copy would replace the blob that the output must copy as it is.
        return Err(
            Error::invalid(&image.name, "a kept layer was indexed with a spooled copy").into(),
        );
    }
    let base = tree::merge(&indexes[..keep.min(indexes.len())])?;
    Ok((merge_image(image, indexes)?, base))
}

/// Refuses a `--layers N` the image cannot satisfy.
pub fn check_layer_count(image: &Image, layers: Option<usize>) -> Result<()> {
    match layers {
        Some(n) if n == 0 || n > image.layers.len() => Err(Error::invalid(
            &image.name,
            format!(
                "has {} layers; --layers takes 1 to {}",
                image.layers.len(),
                image.layers.len()
            ),
        )),
        _ => Ok(()),
    }
}

/// Merges an image's layer indexes (from [`index_layers`]) into its tree, keeping aside what
/// reading file contents needs.
pub fn merge_image(mut image: Image, mut indexes: Vec<LayerIndex>) -> Result<Opened> {
    let checkpoints = take_read_aids(&mut image, &mut indexes);
    let tree = tree::merge_owned(indexes)?;
    // The indexes and the merge's scaffolding are freed by now, but glibc keeps most of those
    // small blocks in its heap: hand them back, so a mount server holds the arena and no more
    // (on a million-entry directory, ~170 -> ~90 bytes per entry for its life).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; no live allocation moves.
    unsafe {
        libc::malloc_trim(0);
    }
    Ok(Opened {
        image,
        tree,
        checkpoints,
    })
}

/// Takes out of the indexes what reading file contents needs, before the merge consumes them:
/// a spooled decompressed copy replaces its layer's blob, and each layer's checkpoints are
/// returned by layer position (none for a layer now read from its copy).
fn take_read_aids(
    image: &mut Image,
    indexes: &mut [LayerIndex],
) -> Vec<Option<Arc<zran::Checkpoints>>> {
    image
        .layers
        .iter_mut()
        .zip(indexes)
        .map(|(layer, index)| {
            let checkpoints = index.checkpoints.take();
            match index.decompressed.take() {
                Some(copy) => {
                    layer.blob = copy.blob;
                    layer.compression = blob::Compression::None;
                    // The copy holds only contents: entries now point into it. (The cache, filled
                    // before this, keeps the offsets in the layer's tar.)
                    for (entry, offset) in index.entries.iter_mut().zip(copy.offsets) {
                        // A sparse file's runs stay back to back, now from its new offset.
                        for s in entry.sparse.iter_mut().flat_map(|m| m.iter_mut()) {
                            s.tar = s.tar - entry.offset + offset;
                        }
                        entry.offset = offset;
                    }
                    None
                }
                None => checkpoints,
            }
        })
        .collect()
}
