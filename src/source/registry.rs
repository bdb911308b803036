//! The `docker://` source: fetches an image's manifest (through its indexes, for the wanted
//! platform), config and layers from a registry into the blob store, every blob checked
//! against its digest, then opens them as an OCI layout, so the rest of flatfs reads a pulled
//! image exactly like a local one.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::{Image, Platform, Store, oci};
use crate::blob::{Arrival, Compression, Lazy, SpanDigests};
use crate::error::{Error, Result};
use crate::reference::{DEFAULT_TAG, Reference};
use crate::registry::store::BlobWriter;
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
    let Top {
        client,
        blobs,
        temp_store,
        top,
        top_desc,
        documents,
        layout,
    } = open_top(reference, opts)?;
    let repo = reference.path();
    let put = |digest: &str, bytes: &[u8]| {
        blobs
            .put_bytes(digest, bytes)
            .map(drop)
            .map_err(|e| Error::io(blobs.root().display(), e))
    };
    let link = |digest: &str, from: &Path| -> Result<()> {
        let to = layout_path(layout.path(), digest)?;
        std::fs::hard_link(from, &to).map_err(|e| Error::io(to.display(), e))
    };
    let stored = |digest: &str| {
        blobs
            .path(digest)
            .ok_or_else(|| client.error(format!("unsupported digest {digest:?}")))
    };
    let store = Store::Dir(layout.path().to_path_buf());
    let desc = oci::pick_manifest(&store, spec, vec![top_desc.clone()], platform, 0)?;
    let manifest_bytes = if desc.digest() == top_desc.digest() {
        top.bytes
    } else {
        let m = client.manifest(repo, desc.digest().as_ref())?;
        put(&m.digest, &m.bytes)?;
        link(&m.digest, &stored(&m.digest)?)?;
        m.bytes
    };
    let what = format!("manifest {}", desc.digest());
    let manifest: ImageManifest = oci::parse_doc(&manifest_bytes, spec, &what)?;
    for (i, layer) in manifest.layers().iter().enumerate() {
        oci::check_layer_media_type(layer, i + 1)?;
    }
    let config = manifest.config();
    let config_digest = config.digest().to_string();
    // The config and the index artifact are fetched side by side: the artifact needs the
    // config only to check the indexes' diff_ids, once they are here.
    let (path, filled) = std::thread::scope(|s| {
        let fetch_config =
            s.spawn(|| client.fetch_blob(repo, &config_digest, config.size(), &blobs, &|_| {}));
        let mut fetch_config = Some(fetch_config);
        let mut fetched = None;
        let mut diff_ids = || {
            let r = join(fetch_config.take().expect("asked for once"));
            let ids = r.as_ref().ok().map(|p| diff_ids(&manifest, p));
            fetched = Some(r);
            ids.unwrap_or_default()
        };
        let first_span =
            |d: &str, size: u64| (!blobs.has(d, size)).then(|| crate::blob::SPAN_BYTES.min(size));
        let filled = index_artifact(
            &client,
            repo,
            desc.digest().as_ref(),
            &manifest,
            opts,
            &mut diff_ids,
            &first_span,
        );
        let path = match (fetched, fetch_config) {
            (Some(r), _) => r,
            (None, Some(h)) => join(h),
            (None, None) => unreachable!("the config is fetched or being fetched"),
        };
        (path, filled)
    });
    let path = path?;
    link(&config_digest, &path)?;
    // The first span of each layer whose index came from the artifact is checked now (most
    // were fetched beside the indexes), all at once: a lie is found while the layer can
    // still be pulled whole (below).
    let crate::registry::artifact::Filled {
        imported,
        mut starts,
    } = filled;
    let mut checked = check_starts(
        &client,
        repo,
        &manifest,
        (&imported, &mut starts),
        &layout,
        &blobs,
        opts,
    );

    // Layers: those in the store are linked; the others start downloading now, and the
    // image opens on their growing files, so indexing reads each layer as it arrives
    // (download | hash | inflate | index in one pass).
    let mut jobs = Vec::new();
    let mut arriving: HashMap<String, Arc<Arrival>> = HashMap::new();
    let mut lazy: HashMap<String, Arc<Lazy>> = HashMap::new();
    let mut tocs: HashMap<String, Arc<crate::toc::Toc>> = HashMap::new();
    for layer in manifest.layers() {
        let digest = layer.digest().to_string();
        if arriving.contains_key(&digest)
            || lazy.contains_key(&digest)
            || tocs.contains_key(&digest)
        {
            continue;
        }
        if blobs.has(&digest, layer.size()) {
            if !layout_path(layout.path(), &digest)?.exists() {
                link(&digest, &stored(&digest)?)?;
            }
            continue;
        }
        if let Some(spans) = lazy_spans(opts, &digest, layer.size()) {
            let path = layout_path(layout.path(), &digest)?;
            let check = imported.contains(&digest);
            let opened = match checked.remove(&digest) {
                Some(r) => r,
                None => open_lazy(&client, repo, &digest, &path, spans, &blobs, check, None),
            };
            match opened {
                Ok(Some(l)) => {
                    lazy.insert(digest.clone(), l);
                    continue;
                }
                Ok(None) => {
                    link(&digest, &stored(&digest)?)?;
                    continue;
                }
                // The first span does not check against an index artifact's digests: the
                // artifact lies. Forget its index and pull the layer as without one; its
                // partial file holds nothing worth keeping.
                Err(e) if imported.contains(&digest) => {
                    log::warn!("{e}; not using the index artifact for layer {digest}");
                    forget_index(opts, &digest);
                    let _ = std::fs::remove_file(&path);
                    if let Err(e) = blobs.remove_partial(&digest) {
                        log::warn!("cannot remove the partial {digest}: {e}");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(toc) = opts
            .lazy
            .then(|| open_toc(&client, repo, layer, opts.cache_dir.as_deref()))
            .flatten()
        {
            // An empty file of the blob's size: the layout opens it, the TOC reads the bytes.
            let path = layout_path(layout.path(), &digest)?;
            let file =
                std::fs::File::create_new(&path).map_err(|e| Error::io(path.display(), e))?;
            file.set_len(layer.size())
                .map_err(|e| Error::io(path.display(), e))?;
            // Verified chunks are kept in the blob store: a re-read, or a later mount's, is
            // local.
            match blobs.open_partial_ranges(&digest, layer.size()) {
                Ok(kept) => toc.keep_chunks_in(Box::new(kept)),
                Err(e) => log::warn!("blob store: cannot keep the chunks of {digest}: {e}"),
            }
            let toc = Arc::new(toc);
            toc.read_ahead_in_background();
            tocs.insert(digest, toc);
            continue;
        }
        let mut w = blobs
            .writer(&digest)
            .map_err(|e| Error::io(blobs.root().display(), e))?;
        w.preallocate(layer.size())
            .map_err(|e| Error::io(w.temp_path().display(), e))?;
        link(&digest, w.temp_path())?;
        let arrival = Arc::new(Arrival::default());
        arriving.insert(digest.clone(), arrival.clone());
        jobs.push((digest, layer.size(), w, arrival));
    }
    let total: u64 = jobs.iter().map(|j| j.1).sum();
    if !jobs.is_empty() {
        log::info!(
            "{}: downloading {} layers ({total} bytes) while indexing",
            client.host(),
            jobs.len()
        );
    }
    // A temp store lives until both this function and the downloads are done with it.
    let temp_store = Arc::new(temp_store);
    download(
        client.clone(),
        repo,
        jobs,
        blobs.clone(),
        temp_store.clone(),
    );
    // Compression is sniffed from a layer's first bytes when it is opened.
    for a in arriving.values() {
        a.wait(4).map_err(|e| client.error(e))?;
    }

    let mut image = oci::open(&store, spec, None, platform)?;
    for layer in &mut image.layers {
        if let Some(a) = layer.digest.as_ref().and_then(|d| arriving.get(d)) {
            layer.blob = layer.blob.clone().arriving(a.clone());
        }
        if let Some(l) = layer.digest.as_ref().and_then(|d| lazy.get(d)) {
            // Its first bytes may not be fetched yet: the manifest says how it is compressed,
            // and the first span, when it comes, must agree.
            let media_type = layer
                .descriptor
                .as_ref()
                .and_then(|d| d["mediaType"].as_str());
            if let Some(c) = media_type.and_then(compression_of) {
                layer.compression = c;
                l.expect_compression(c);
            }
            layer.blob = layer.blob.clone().lazy(l.clone());
        }
        if let Some(t) = layer.digest.as_ref().and_then(|d| tocs.get(d)) {
            layer.blob = layer.blob.clone().with_toc(t.clone());
        }
    }
    if !lazy.is_empty() {
        log::info!(
            "{}: {} layers read by ranges as they are read (indexes from the cache)",
            client.host(),
            lazy.len()
        );
    }
    image.tags = vec![reference.familiar()];
    if opts.cache_dir.is_some() {
        let mut keep: Vec<String> = manifest
            .layers()
            .iter()
            .map(|d| d.digest().to_string())
            .collect();
        keep.push(config_digest);
        keep.extend(documents);
        keep.push(desc.digest().to_string());
        match blobs.evict(&keep, store::max_size()) {
            Ok(0) => {}
            Ok(n) => log::info!("blob store: evicted {n} bytes"),
            Err(e) => log::warn!("cannot evict from {}: {e}", blobs.root().display()),
        }
    }
    Ok(image)
}

/// The span digests to read blob `digest` lazily with: only for a mount, and only where the
/// index cache has the layer's index with them (the index then needs no pass over the layer).
fn lazy_spans(opts: &Options, digest: &str, size: u64) -> Option<SpanDigests> {
    let dir = opts.cache_dir.as_ref().filter(|_| opts.lazy)?;
    let spans = crate::cache::Cache::new(dir).span_digests(digest, size)?;
    Some(Arc::unwrap_or_clone(spans))
}

/// The verified TOC of a layer that carries one (eStargz, zstd:chunked): from the bytes an
/// earlier mount kept in the cache dir (`toc::kept`), else fetched by range (and then kept);
/// either way checked against the digest the layer's annotations give. `None` (with a
/// warning when the layer has a TOC that cannot be used) means a pass over the layer.
fn open_toc(
    client: &Arc<Client>,
    repo: &str,
    layer: &Descriptor,
    cache_dir: Option<&Path>,
) -> Option<crate::toc::Toc> {
    use crate::toc::kept;
    use std::sync::atomic::{AtomicBool, Ordering};
    let annotations = serde_json::to_value(layer.annotations().as_ref()?).ok()?;
    let digest = layer.digest().to_string();
    let name = format!("{repo}@{digest}");
    let (c, r, d) = (client.clone(), repo.to_string(), digest.clone());
    let remote: Arc<crate::blob::FetchRange> = Arc::new(move |start, end| {
        c.fetch_range(&r, &d, start, end)
            .map_err(|e| std::io::Error::other(e.to_string()))
    });
    let estargz = crate::toc::estargz::locate(&annotations);
    let zstd = || crate::toc::zstd_chunked::locate(&annotations);
    if estargz.is_none() && zstd().is_none() {
        return None;
    }
    let open = |fetch: Box<crate::blob::FetchRange>| match &estargz {
        Some(at) => at
            .clone()
            .and_then(|d| crate::toc::estargz::open(d, layer.size(), &name, fetch))
            .map_err(|e| format!("its eStargz TOC: {e}")),
        None => zstd()
            .unwrap_or_else(|| Err("no TOC".into()))
            .and_then(|at| crate::toc::zstd_chunked::open(at, layer.size(), &name, fetch))
            .map_err(|e| format!("its zstd:chunked TOC: {e}")),
    };
    // The parsed TOC an earlier mount kept: no TOC to read, inflate, hash or parse.
    let (format, toc_digest) = match &estargz {
        Some(at) => ("eStargz", at.clone().ok()),
        None => ("zstd:chunked", zstd().and_then(|r| r.ok()).map(|p| p.3)),
    };
    let parsed_file = cache_dir
        .zip(toc_digest)
        .map(|(dir, d)| crate::toc::parsed::path(dir, &d));
    if let Some((file, d)) = parsed_file.as_ref().zip(toc_digest) {
        let fetch: Box<crate::blob::FetchRange> = {
            let remote = remote.clone();
            Box::new(move |start, end| remote(start, end))
        };
        if let Some(toc) = crate::toc::parsed::load(file, format, d, layer.size(), &name, fetch) {
            log::info!("{name}: parsed {format} TOC kept on this host");
            return Some(toc);
        }
    }
    let keep_parsed = |toc: &crate::toc::Toc| {
        if let Some(file) = &parsed_file {
            crate::toc::parsed::save(file, toc, layer.size());
        }
    };
    let file = cache_dir.and_then(|dir| kept::path(dir, &digest));
    if let Some(file) = &file {
        let opened = Arc::new(AtomicBool::new(false));
        let r = match kept::Kept::load(file, &digest, layer.size()) {
            Ok(Some(k)) => Some(open(k.fetch(remote.clone(), opened.clone()))),
            Ok(None) => None,
            Err(e) => Some(Err(e.to_string())),
        };
        match r {
            Some(Ok(toc)) => {
                opened.store(true, Ordering::Relaxed);
                toc.opened_from_kept();
                log::info!("{name}: {} TOC kept on this host", toc.format);
                keep_parsed(&toc);
                return Some(toc);
            }
            Some(Err(e)) => {
                log::warn!(
                    "{name}: the TOC kept in {} does not hold ({e}); fetching it again",
                    file.display()
                );
                kept::remove(file);
            }
            None => {}
        }
    }
    let opened = Arc::new(AtomicBool::new(false));
    let fetched = kept::record();
    let fetch = kept::recording(remote, opened.clone(), fetched.clone());
    match open(fetch) {
        Ok(toc) => {
            opened.store(true, Ordering::Relaxed);
            if let Some(file) = &file {
                kept::save(file, &digest, layer.size(), &fetched);
            }
            keep_parsed(&toc);
            Some(toc)
        }
        Err(e) => {
            log::warn!("{name}: not using {e}");
            None
        }
    }
}

/// For a lazy open: layer indexes the cache lacks, from the image's flatfs index artifact in
/// the registry, if it has one (`registry/artifact.rs`), so those layers are read by ranges
/// with no pass over them. Each is checked as a cache file is, then is one. `diff_ids` gives
/// the config's, which the indexes must agree with.
fn index_artifact(
    client: &Arc<Client>,
    repo: &str,
    subject: &str,
    manifest: &ImageManifest,
    opts: &Options,
    diff_ids: &mut dyn FnMut() -> Vec<(String, String)>,
    first_span: crate::registry::artifact::FirstSpan,
) -> crate::registry::artifact::Filled {
    let Some(dir) = opts
        .cache_dir
        .as_ref()
        .filter(|_| opts.lazy && !opts.no_index_artifact)
    else {
        return Default::default();
    };
    let wanted: Vec<_> = manifest
        .layers()
        .iter()
        .map(|l| (l.digest().to_string(), l.size()))
        // A layer whose TOC this host keeps needs no index.
        .filter(|(d, _)| !crate::toc::kept::has(dir, d))
        .collect();
    crate::registry::artifact::fill_cache(client, repo, subject, &wanted, dir, diff_ids, first_span)
}

/// The (layer digest, diff_id) pairs of a manifest's layers by the config at `config` (a
/// config that does not parse fails later, when the image opens).
fn diff_ids(manifest: &ImageManifest, config: &Path) -> Vec<(String, String)> {
    let config: serde_json::Value = std::fs::read(config)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    manifest
        .layers()
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let diff_id = config["rootfs"]["diff_ids"][i].as_str()?;
            Some((l.digest().to_string(), diff_id.to_string()))
        })
        .collect()
}

/// A scoped thread's result, its panic passed on.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Opens for reads by ranges each layer of `manifest` whose index was `imported` from an
/// artifact (and is not whole in the store), fetching their first spans in parallel (unless
/// in `starts`, fetched already): what [`open_lazy`] with `check_start` gives, by layer
/// digest.
fn check_starts(
    client: &Arc<Client>,
    repo: &str,
    manifest: &ImageManifest,
    (imported, starts): (&[String], &mut HashMap<String, Vec<u8>>),
    layout: &tempfile::TempDir,
    blobs: &BlobStore,
    opts: &Options,
) -> HashMap<String, Result<Option<Arc<Lazy>>>> {
    let mut todo: Vec<(String, PathBuf, SpanDigests, Option<Vec<u8>>)> = Vec::new();
    for layer in manifest.layers() {
        let digest = layer.digest().to_string();
        if !imported.contains(&digest)
            || todo.iter().any(|(d, ..)| *d == digest)
            || blobs.has(&digest, layer.size())
        {
            continue;
        }
        let (Some(spans), Ok(path)) = (
            lazy_spans(opts, &digest, layer.size()),
            layout_path(layout.path(), &digest),
        ) else {
            continue;
        };
        let start = starts.remove(&digest);
        todo.push((digest, path, spans, start));
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = todo
            .into_iter()
            .map(|(digest, path, spans, start)| {
                s.spawn(move || {
                    let r = open_lazy(client, repo, &digest, &path, spans, blobs, true, start);
                    (digest, r)
                })
            })
            .collect();
        handles.into_iter().map(join).collect()
    })
}

/// Drops the cached index of layer `digest`, imported from an artifact that proved wrong.
fn forget_index(opts: &Options, digest: &str) {
    if let Some(dir) = &opts.cache_dir
        && let Err(e) = crate::cache::Cache::new(dir).forget(digest)
    {
        log::warn!(
            "cannot remove the index of {digest} from {}: {e}",
            dir.display()
        );
    }
}

/// The blob's partial file in the store (`partial/HEX`, what earlier mounts fetched), linked
/// at `path` in the layout and filled by range requests as it is read, each span checked
/// against `spans` and recorded in its span map. Once every span is there, it is checked
/// whole and becomes a stored blob. Its first span is fetched now: the layer's compression is
/// sniffed from its first bytes when the image opens. `None` if another mount completed the
/// blob meanwhile: it is whole in the store.
/// The compression a layer media type names (those `oci::check_layer_media_type` accepts).
fn compression_of(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// Opens layer `digest` for reads by ranges. With `check_start` (an index imported from an
/// artifact, which may lie) its first span is fetched now (or taken from `first`, its first
/// bytes fetched already, checked as fetched ones), so a lie is found while the layer can
/// still be pulled whole; with an index this host made, nothing is fetched until read.
#[allow(clippy::too_many_arguments)]
fn open_lazy(
    client: &Arc<Client>,
    repo: &str,
    digest: &str,
    path: &Path,
    spans: SpanDigests,
    blobs: &BlobStore,
    check_start: bool,
    first: Option<Vec<u8>>,
) -> Result<Option<Arc<Lazy>>> {
    let Some((file, map, partial)) = link_partial(blobs, digest, &spans, path, &|| {})? else {
        return Ok(None);
    };
    let (c, r, d) = (client.clone(), repo.to_string(), digest.to_string());
    let first = Mutex::new(first);
    let fetch = Box::new(move |start, end| {
        // Taken once, by the request it answers.
        let mut got = first.lock().unwrap_or_else(|e| e.into_inner());
        if start == 0 && got.as_ref().is_some_and(|b| b.len() as u64 >= end) {
            let mut b = got.take().unwrap_or_default();
            b.truncate(end as usize);
            return Ok(b);
        }
        drop(got);
        c.fetch_range(&r, &d, start, end)
            .map_err(|e| std::io::Error::other(e.to_string()))
    });
    let name = format!("{repo}@{digest}");
    let (store, d) = (blobs.clone(), digest.to_string());
    let keep_whole = Arc::new(move || match store.promote_partial(&d) {
        Ok(_) => log::info!("blob store: {d} is complete and checked; kept whole"),
        Err(e) => log::warn!("blob store: cannot keep {d} whole: {e}"),
    });
    let lazy = Lazy::new(file, spans, &name, fetch)
        .with_map(map)
        .map_err(|e| Error::io(partial.display(), e))?;
    if lazy.all_in_file() {
        // An earlier mount fetched the last span but did not live to keep the blob whole.
        keep_whole();
    }
    let lazy = Arc::new(lazy.on_complete(keep_whole));
    lazy.read_ahead_in_background();
    if check_start {
        lazy.fetch_start().map_err(|e| client.error(e))?;
    }
    Ok(Some(lazy))
}

/// Opens the blob's partial file and links it at `path`. Another mount may promote the
/// partial file (or eviction remove it) between the open and the link: then the blob is
/// whole (`None`) or the partial file is opened afresh. `between` runs between the two (a
/// test's way into that window).
fn link_partial(
    blobs: &BlobStore,
    digest: &str,
    spans: &SpanDigests,
    path: &Path,
    between: &dyn Fn(),
) -> Result<Option<(std::fs::File, std::fs::File, PathBuf)>> {
    let mut tries = 0;
    loop {
        if blobs.has(digest, spans.blob_len) {
            return Ok(None);
        }
        let (file, map, partial) = blobs
            .open_partial(digest, spans.blob_len, spans.digests.len() as u64)
            .map_err(|e| Error::io(blobs.root().display(), e))?;
        between();
        match std::fs::hard_link(&partial, path) {
            Ok(()) => return Ok(Some((file, map, partial))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
            Err(e) => {
                return Err(Error::io(
                    format!("{} (linked from {})", path.display(), partial.display()),
                    e,
                ));
            }
        }
    }
}

/// A layer download: digest, size, where it goes, who waits for it.
type Job = (String, u64, BlobWriter, Arc<Arrival>);

/// Downloads `jobs` on a few threads of their own, in order, and returns at once: readers
/// of the layers wait on each [`Arrival`]. The last byte of a blob is only announced once
/// its digest is checked and it is in the store, so no reader ever finishes a layer whose
/// blob is wrong; a failure is handed to the readers as the error. `keep` (a temp store)
/// lives until the downloads end.
fn download(
    client: Arc<Client>,
    repo: &str,
    jobs: Vec<Job>,
    blobs: BlobStore,
    keep: Arc<Option<tempfile::TempDir>>,
) {
    if jobs.is_empty() {
        return;
    }
    let threads = PARALLEL.min(jobs.len());
    let queue = Arc::new(Mutex::new(jobs.into_iter().collect::<VecDeque<Job>>()));
    for _ in 0..threads {
        let (client, queue, blobs, keep, repo) = (
            client.clone(),
            queue.clone(),
            blobs.clone(),
            keep.clone(),
            repo.to_string(),
        );
        std::thread::spawn(move || {
            let _keep = keep;
            loop {
                let job = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some((digest, size, mut w, arrival)) = job else {
                    break;
                };
                let r = client
                    .fetch_into(&repo, &digest, size, &mut w, &|n| {
                        arrival.advance(n.min(size.saturating_sub(1)));
                    })
                    .and_then(|()| {
                        w.commit_unflushed().map_err(|e| match e.kind() {
                            std::io::ErrorKind::InvalidData => {
                                client.error(format!("GET blob {repo}@{digest}: {e}"))
                            }
                            _ => Error::io(blobs.root().display(), e),
                        })
                    });
                // The blob is in the store (renamed) before readers finish with it, so a short
                // command leaves it there; the flush to disk happens behind them.
                match r {
                    Ok((_, file)) => {
                        arrival.finish(Ok(()));
                        if let Some(Err(e)) = file.map(|f| f.sync_data()) {
                            log::warn!("blob store: cannot flush {digest}: {e}");
                        }
                    }
                    Err(e) => arrival.finish(Err(e.to_string())),
                }
            }
        });
    }
}

/// `blobs/sha256/HEX` of the layout, for a digest that names no other path.
fn layout_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(layout.join("blobs/sha256").join(hex))
        }
        _ => Err(Error::invalid(digest, "unsupported digest")),
    }
}

/// The platforms `reference` offers (empty for a single image without a platform).
pub(super) fn platforms(
    reference: &Reference,
    spec: &str,
    opts: &Options,
) -> Result<Vec<Platform>> {
    let top = open_top(reference, opts)?;
    oci::platforms(&Store::Dir(top.layout.path().to_path_buf()), spec, None)
}

/// What every pull starts with: the connection, the store, the top document and its nested
/// indexes in the store, and a layout naming it with those documents linked in.
struct Top {
    client: Arc<Client>,
    blobs: BlobStore,
    /// The temp store under `--no-cache`.
    temp_store: Option<tempfile::TempDir>,
    top: crate::registry::client::Manifest,
    top_desc: Descriptor,
    /// Digests of the top document and its nested indexes.
    documents: Vec<String>,
    /// Inside the store (a temp store's removal takes it along; removing it twice is harmless).
    layout: tempfile::TempDir,
}

fn open_top(reference: &Reference, opts: &Options) -> Result<Top> {
    let client = Arc::new(Client::connect(reference.domain(), opts)?);
    let repo = reference.path();
    let wanted = reference
        .digest()
        .or(reference.tag())
        .unwrap_or(DEFAULT_TAG);
    // Without a cache, blobs go to a temp store that is gone (unlinked) once the image's files
    // are open: the open files keep the bytes as long as the image lives.
    let mut temp_store = None;
    let blobs = match &opts.cache_dir {
        Some(dir) => BlobStore::in_cache(dir),
        None => {
            let dir = tempfile::tempdir().map_err(|e| Error::io("temp blob store", e))?;
            let store = BlobStore::temporary(dir.path());
            temp_store = Some(dir);
            store
        }
    };
    // With something to fall back on, a silent registry must not hold the mount up for
    // minutes: the manifest request is bounded as a span read is.
    let fallback = opts.lazy && resolved::lookup(&client, opts, reference, wanted).is_some();
    let got = if fallback {
        client.manifest_or_give_up(repo, wanted)
    } else {
        client.manifest(repo, wanted)
    };
    let top = match got {
        Ok(m) => {
            resolved::record(opts, reference, wanted, &m);
            m
        }
        // A mount on a host that resolved this tag before goes on from that while the
        // registry cannot be reached; reads of what is not here fail until it is back.
        Err(e) if opts.lazy && client.unreachable() => {
            let Some((m, age)) = resolved::lookup(&client, opts, reference, wanted) else {
                return Err(e);
            };
            log::warn!(
                "{e}; mounting {repo}:{wanted} as this host resolved it {} ago ({}): \
                 reads of what is not cached here fail until the registry is back",
                resolved::human_age(age),
                m.digest
            );
            m
        }
        Err(e) => return Err(e),
    };
    blobs
        .put_bytes(&top.digest, &top.bytes)
        .map_err(|e| Error::io(blobs.root().display(), e))?;
    log::info!(
        "{}: {repo}:{wanted} is {} ({})",
        client.host(),
        top.digest,
        top.media_type
    );
    let top_desc = descriptor(&top.media_type, &top.digest, top.bytes.len() as u64)?;
    let mut documents = vec![top.digest.clone()];
    fetch_nested_indexes(
        &client,
        repo,
        &top_desc,
        &top.bytes,
        &blobs,
        0,
        &mut documents,
    )?;

    // A layout of one index entry whose blobs are hard links to the store's (or to blobs
    // still downloading): the OCI source then picks the platform, checks digests and media
    // types and opens the blobs, as for a local image. Inside the store, so links work.
    std::fs::create_dir_all(blobs.root()).map_err(|e| Error::io(blobs.root().display(), e))?;
    let layout = tempfile::Builder::new()
        .prefix(".layout-")
        .tempdir_in(blobs.root())
        .map_err(|e| Error::io(blobs.root().display(), e))?;
    write_layout(layout.path(), &top_desc)?;
    for d in &documents {
        let from = blobs
            .path(d)
            .ok_or_else(|| client.error(format!("unsupported digest {d:?}")))?;
        let to = layout_path(layout.path(), d)?;
        std::fs::hard_link(&from, &to).map_err(|e| Error::io(to.display(), e))?;
    }
    Ok(Top {
        client,
        blobs,
        temp_store,
        top,
        top_desc,
        documents,
        layout,
    })
}

/// What this cache dir last resolved each tag to (`registries/refs/HEX`, HEX the sha256 of
/// `HOST/REPO:TAG`; the file's time is when): a mount while the registry is unreachable goes
/// on from that, if the manifest is still in the blob store.
mod resolved {
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::reference::Reference;
    use crate::registry::client::Manifest;
    use crate::registry::{Client, Options};

    fn path(opts: &Options, reference: &Reference, tag: &str) -> Option<(PathBuf, String)> {
        let dir = opts.cache_dir.as_ref()?;
        let name = format!("{}/{}:{tag}", reference.domain(), reference.path());
        let hex = crate::blob::sha256_of(name.as_bytes())[7..].to_string();
        Some((dir.join("registries/refs").join(hex), name))
    }

    /// Records that `tag` resolved to `m` (mounts only, and only for tags: a digest is its
    /// own record). Best effort.
    pub(super) fn record(opts: &Options, reference: &Reference, tag: &str, m: &Manifest) {
        if !opts.lazy || tag.starts_with("sha256:") {
            return;
        }
        let Some((file, name)) = path(opts, reference, tag) else {
            return;
        };
        let line = format!("{name} {}\n", m.digest);
        let write = || -> std::io::Result<()> {
            let dir = file
                .parent()
                .ok_or_else(|| std::io::Error::other("no parent"))?;
            crate::cache::write_atomically(dir, &file, line.as_bytes())
        };
        if let Err(e) = write() {
            log::debug!("cannot record {name} in {}: {e}", file.display());
        }
    }

    /// The manifest `tag` last resolved to on this host, from the blob store, and how long
    /// ago that was.
    pub(super) fn lookup(
        client: &Client,
        opts: &Options,
        reference: &Reference,
        tag: &str,
    ) -> Option<(Manifest, Duration)> {
        let (file, name) = path(opts, reference, tag)?;
        let text = std::fs::read_to_string(&file).ok()?;
        let digest = text.strip_prefix(&name)?.strip_prefix(' ')?.trim_end();
        let m = client.stored_manifest(digest)?;
        let when = std::fs::metadata(&file).and_then(|m| m.modified()).ok()?;
        Some((m, when.elapsed().unwrap_or_default()))
    }

    /// "3 min", "2 h", "5 days".
    pub(super) fn human_age(age: Duration) -> String {
        let s = age.as_secs();
        match s {
            0..120 => format!("{s} s"),
            120..7200 => format!("{} min", s / 60),
            7200..172_800 => format!("{} h", s / 3600),
            _ => format!("{} days", s / 86_400),
        }
    }
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
    depth: usize,
    documents: &mut Vec<String>,
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
        // Fetched already (indexes may share children): once is enough, and a hostile stack
        // of indexes each naming the next many times must not take exponential time.
        if documents.contains(&digest) {
            continue;
        }
        let m = if blobs.has(&digest, child.size()) {
            let path = blobs.path(&digest).expect("has() checked the digest");
            std::fs::read(&path).map_err(|e| Error::io(path.display(), e))?
        } else {
            let m = client.manifest(repo, &digest)?;
            blobs
                .put_bytes(&m.digest, &m.bytes)
                .map_err(|e| Error::io(blobs.root().display(), e))?;
            m.bytes
        };
        documents.push(digest);
        fetch_nested_indexes(client, repo, child, &m, blobs, depth + 1, documents)?;
    }
    Ok(())
}

/// `oci-layout`, an `index.json` naming `top`, and an empty `blobs/sha256`.
fn write_layout(dir: &Path, top: &Descriptor) -> Result<()> {
    let io = |e| Error::io(dir.display(), e);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), index.to_string()).map_err(io)?;
    std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn a_partial_blob_promoted_or_evicted_while_being_linked_is_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::in_cache(dir.path());
        let layout = dir.path().join("layout");
        std::fs::create_dir(&layout).unwrap();
        let bytes = vec![7u8; 1000];
        let digest = crate::blob::sha256_of(&bytes);
        let spans = SpanDigests {
            blob_len: 1000,
            digests: vec![[0; 32]],
        };
        // Another mount fetches the last span and keeps the blob whole in the window.
        let complete = || {
            let (data, _, _) = blobs.open_partial(&digest, 1000, 1).unwrap();
            data.write_all_at(&bytes, 0).unwrap();
            blobs.promote_partial(&digest).unwrap();
        };
        let got = link_partial(&blobs, &digest, &spans, &layout.join("a"), &complete).unwrap();
        assert!(got.is_none(), "the whole blob is to be linked");
        assert!(blobs.has(&digest, 1000));

        // Evicted in the window, once: the partial file is made again and linked.
        let other = crate::blob::sha256_of(b"other");
        let evicted = std::cell::Cell::new(false);
        let evict = || {
            if !evicted.replace(true) {
                blobs.remove_partial(&other).unwrap();
            }
        };
        let to = layout.join("b");
        let (file, _, partial) = link_partial(&blobs, &other, &spans, &to, &evict)
            .unwrap()
            .expect("a partial file");
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&to), ino(&partial));
        assert_eq!(file.metadata().unwrap().ino(), ino(&partial));
    }
}
