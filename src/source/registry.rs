//! The `docker://` source: fetches an image's manifest (through its indexes, for the wanted
//! platform), config and layers from a registry into the blob store, every blob checked
//! against its digest, then opens them as an OCI layout, so the rest of flatfs reads a pulled
//! image exactly like a local one.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::{Image, Platform, Store, oci};
use crate::error::{Error, Result};
use crate::reference::{DEFAULT_TAG, Reference};
use crate::registry::{BlobStore, Client, Options, store};

/// How deep nested indexes may go before we call it a loop (as for local layouts).
const MAX_NESTING: usize = 8;
/// Blobs downloaded at once.
const PARALLEL: usize = 4;

/// Pulls `reference` (what the user wrote as `spec`) for `platform` and opens it.
pub(super) fn open(
    reference: &Reference,
    spec: &str,
    platform: &Platform,
    opts: &Options,
) -> Result<Image> {
    let client = Client::connect(reference.domain(), opts)?;
    let repo = reference.path();
    let wanted = reference
        .digest()
        .or(reference.tag())
        .unwrap_or(DEFAULT_TAG);
    // Without a cache, blobs go to a temp store that is gone (unlinked) once the image's files
    // are open: the open files keep the bytes as long as the image lives.
    let temp_store;
    let blobs = match &opts.cache_dir {
        Some(dir) => BlobStore::in_cache(dir),
        None => {
            temp_store = tempfile::tempdir().map_err(|e| Error::io("temp blob store", e))?;
            BlobStore::in_cache(temp_store.path())
        }
    };
    let put = |digest: &str, bytes: &[u8]| {
        blobs
            .put_bytes(digest, bytes)
            .map(drop)
            .map_err(|e| Error::io(blobs.root().display(), e))
    };

    let top = client.manifest(repo, wanted)?;
    put(&top.digest, &top.bytes)?;
    log::info!(
        "{}: {repo}:{wanted} is {} ({})",
        client.host(),
        top.digest,
        top.media_type
    );
    let top_desc = descriptor(&top.media_type, &top.digest, top.bytes.len() as u64)?;
    fetch_nested_indexes(&client, repo, &top_desc, &top.bytes, &blobs, &put, 0)?;

    // A layout of one index entry whose blobs are the store: the OCI source then picks the
    // platform, checks digests and media types, and finds the blobs, as for a local image.
    let layout = tempfile::tempdir().map_err(|e| Error::io("temp layout", e))?;
    write_layout(layout.path(), &top_desc, &blobs)?;
    let store = Store::Dir(layout.path().to_path_buf());
    let desc = oci::pick_manifest(&store, spec, vec![top_desc.clone()], platform, 0)?;
    let manifest_bytes = if desc.digest() == top_desc.digest() {
        top.bytes
    } else {
        let m = client.manifest(repo, desc.digest().as_ref())?;
        put(&m.digest, &m.bytes)?;
        m.bytes
    };
    let what = format!("manifest {}", desc.digest());
    let manifest: ImageManifest = oci::parse_doc(&manifest_bytes, spec, &what)?;
    for (i, layer) in manifest.layers().iter().enumerate() {
        oci::check_layer_media_type(layer, i + 1)?;
    }

    let mut wanted_blobs: Vec<&Descriptor> = vec![manifest.config()];
    wanted_blobs.extend(manifest.layers());
    fetch_blobs(&client, repo, &wanted_blobs, &blobs)?;

    let mut image = oci::open(&store, spec, None, platform)?;
    image.tags = vec![reference.familiar()];
    if opts.cache_dir.is_some() {
        let mut keep: Vec<String> = wanted_blobs
            .iter()
            .map(|d| d.digest().to_string())
            .collect();
        keep.push(top_desc.digest().to_string());
        keep.push(desc.digest().to_string());
        match blobs.evict(&keep, store::max_size()) {
            Ok(0) => {}
            Ok(n) => log::info!("blob store: evicted {n} bytes"),
            Err(e) => log::warn!("cannot evict from {}: {e}", blobs.root().display()),
        }
    }
    Ok(image)
}

/// A descriptor for a document fetched by reference.
fn descriptor(media_type: &str, digest: &str, size: u64) -> Result<Descriptor> {
    let json = serde_json::json!({"mediaType": media_type, "digest": digest, "size": size});
    serde_json::from_value(json).map_err(|e| Error::Json {
        what: format!("descriptor of {digest}"),
        source: e,
    })
}

/// Index entries that are themselves indexes are fetched now, so that the platform choice
/// (which reads them from the store) finds them; image manifests wait until one is chosen.
fn fetch_nested_indexes(
    client: &Client,
    repo: &str,
    desc: &Descriptor,
    bytes: &[u8],
    blobs: &BlobStore,
    put: &dyn Fn(&str, &[u8]) -> Result<()>,
    depth: usize,
) -> Result<()> {
    if !oci::is_index(desc.media_type()) {
        return Ok(());
    }
    if depth > MAX_NESTING {
        return Err(client.error(format!("{repo}: image indexes nest too deeply")));
    }
    let index: ImageIndex = oci::parse_doc(bytes, repo, &format!("index {}", desc.digest()))?;
    for child in index.manifests() {
        if !oci::is_index(child.media_type()) {
            continue;
        }
        let digest = child.digest().to_string();
        let m = if blobs.has(&digest, child.size()) {
            let path = blobs.path(&digest).expect("has() checked the digest");
            std::fs::read(&path).map_err(|e| Error::io(path.display(), e))?
        } else {
            let m = client.manifest(repo, &digest)?;
            put(&m.digest, &m.bytes)?;
            m.bytes
        };
        fetch_nested_indexes(client, repo, child, &m, blobs, put, depth + 1)?;
    }
    Ok(())
}

/// `oci-layout`, an `index.json` naming `top`, and `blobs` pointing at the store.
fn write_layout(dir: &std::path::Path, top: &Descriptor, blobs: &BlobStore) -> Result<()> {
    let io = |e| Error::io(dir.display(), e);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), index.to_string()).map_err(io)?;
    std::fs::create_dir_all(blobs.root()).map_err(|e| Error::io(blobs.root().display(), e))?;
    std::os::unix::fs::symlink(blobs.root(), dir.join("blobs")).map_err(io)?;
    Ok(())
}

/// Downloads the blobs missing from the store, a few at a time; the first error (in
/// descriptor order) is the one reported.
fn fetch_blobs(
    client: &Client,
    repo: &str,
    descs: &[&Descriptor],
    blobs: &BlobStore,
) -> Result<()> {
    let total: u64 = descs.iter().map(|d| d.size()).sum();
    let fetched = std::sync::atomic::AtomicU64::new(0);
    let progress = |n: u64| {
        fetched.fetch_add(n, Ordering::Relaxed);
    };
    let next = AtomicUsize::new(0);
    let errors: Mutex<Vec<(usize, Error)>> = Mutex::new(Vec::new());
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(descs.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(d) = descs.get(i) else { break };
                    let digest = d.digest().to_string();
                    if let Err(e) = client.fetch_blob(repo, &digest, d.size(), blobs, &progress) {
                        errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((i, e));
                        next.store(descs.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut errors = errors.into_inner().unwrap_or_else(|e| e.into_inner());
    errors.sort_by_key(|(i, _)| *i);
    if let Some((_, e)) = errors.into_iter().next() {
        return Err(e);
    }
    log::info!(
        "{}: {} blobs ({total} bytes) in the store in {:.2?}",
        client.host(),
        descs.len(),
        started.elapsed()
    );
    Ok(())
}
