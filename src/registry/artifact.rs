//! Index artifacts: the layer indexes of an image, pushed next to it as an OCI 1.1 artifact
//! whose `subject` is the image manifest (`flatfs index push`), and fetched by a lazy mount on
//! a host whose index cache lacks them (`source/registry.rs`), so that no host but the first
//! makes a pass over the layers. Found through the referrers API, or on registries without it
//! (distribution 2.8) through the `sha256-HEX` tag the OCI 1.1 fallback defines.
//! See: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers>

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::client::{Client, pull_scope, push_scope};
use crate::cache::{Cache, Need, Portable};
use crate::error::{Error, Result};

/// The artifact's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.flatfs.index.v1";
/// Media type of one layer's index: a flatfs index cache file (`HEX.idx`: head and entries,
/// no checkpoint windows), zstd-compressed.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.flatfs.index.layer.v2+zstd";
/// Media type of one layer's gzip checkpoints: a flatfs checkpoints file (`HEX.cpt`: each
/// window a zstd frame, which its index's head names by offset and sha256), as it is, so that
/// one window can be fetched by a range request. A mount is live without them; they are
/// fetched behind it, and a read that needs one before they are here fetches its frame.
pub const CHECKPOINTS_MEDIA_TYPE: &str = "application/vnd.flatfs.index.checkpoints.v2";
/// Annotation of an index or checkpoints blob: the digest of the layer it belongs to.
pub const LAYER_ANNOTATION: &str = "dev.flatfs.layer.digest";
/// Index blobs fetched at once.
const PARALLEL: usize = 8;
/// Annotation of the artifact: the cache-file format its blobs hold. An artifact of another
/// format is skipped, not fetched: this flatfs could not read it.
pub const FORMAT_ANNOTATION: &str = "dev.flatfs.index.format";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI 1.1's empty descriptor, the config of an artifact that needs none.
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_JSON: &[u8] = b"{}";
/// A compressed index blob bigger than this is refused before it is fetched.
const MAX_BLOB: u64 = 1 << 30;
/// An index inflating past this is refused: a small blob must not take all memory.
const MAX_INDEX: u64 = 4 << 30;
/// A layer's index may inflate to this many times the layer's (compressed) size, or to
/// [`MIN_INDEX_LIMIT`] for a small layer; honest ones are a fraction of that (entries of a
/// tar of empty files come closest).
const INDEX_PER_LAYER_BYTE: u64 = 16;
/// The least an index may inflate to, whatever the layer's size.
const MIN_INDEX_LIMIT: u64 = 64 << 20;

/// The most the index of a layer of `layer_size` bytes may take, packed or inflated.
fn index_limit(layer_size: u64) -> u64 {
    layer_size
        .saturating_mul(INDEX_PER_LAYER_BYTE)
        .clamp(MIN_INDEX_LIMIT, MAX_INDEX)
}
/// zstd level for index blobs: the same bytes give the same blob, so a re-push is a no-op.
const LEVEL: i32 = 9;

/// The image manifest an artifact is attached to.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Its media type, as the registry serves it.
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
}

/// How an artifact was made findable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// The registry lists it by itself (referrers API).
    Referrers,
    /// In the `sha256-HEX` tag's index (added now).
    TagAdded,
    /// In the `sha256-HEX` tag's index already (a re-push).
    TagPresent,
}

/// What [`push`] did.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The artifact manifest's digest.
    pub digest: String,
    /// Bytes of index blobs (compressed).
    pub bytes: u64,
    /// How it can be found.
    pub listed: Listed,
}

/// The fallback tag of a subject: `sha256-HEX`.
pub fn fallback_tag(subject: &str) -> String {
    subject.replacen(':', "-", 1)
}

/// Pushes the indexes `layers` (layer digest, portable cache files, see [`Cache::portable`])
/// of the image `subject` in `repo` as one artifact, by digest, then makes it findable.
pub fn push(
    client: &Client,
    repo: &str,
    subject: &Subject,
    layers: &[(String, Portable)],
) -> Result<Pushed> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("temp dir", e))?;
    let put_blob = |name: &str, bytes: &[u8]| -> Result<(String, u64)> {
        let digest = crate::blob::sha256_of(bytes);
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(path.display(), e))?;
        client.push_blob(repo, &digest, &path, bytes.len() as u64, None)?;
        Ok((digest, bytes.len() as u64))
    };
    let (empty, _) = put_blob("empty", EMPTY_JSON)?;
    let mut descs = Vec::new();
    let mut total = 0;
    for (i, (layer, files)) in layers.iter().enumerate() {
        let packed = zstd::bulk::compress(&files.index, LEVEL)
            .map_err(|e| Error::io(format!("compressing the index of {layer}"), e))?;
        let blobs = [
            (LAYER_MEDIA_TYPE, Some(&packed)),
            // Its frames are compressed already, and must stay reachable by range.
            (CHECKPOINTS_MEDIA_TYPE, files.checkpoints.as_ref()),
        ];
        for (j, (media_type, bytes)) in blobs.into_iter().enumerate() {
            let Some(bytes) = bytes else { continue };
            let (digest, size) = put_blob(&format!("{i}.{j}"), bytes)?;
            total += size;
            descs.push(json!({
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {LAYER_ANNOTATION: layer},
            }));
        }
    }
    let annotations = json!({FORMAT_ANNOTATION: crate::cache::VERSION.to_string()});
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": empty,
            "size": EMPTY_JSON.len(),
            "data": "e30=",
        },
        "layers": descs,
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        },
        "annotations": annotations,
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Json {
        what: "index artifact".into(),
        source: e,
    })?;
    let digest = crate::blob::sha256_of(&bytes);
    let (_, said) = client.put_referrer(repo, &digest, &bytes, OCI_MANIFEST)?;
    if said.as_deref() == Some(subject.digest.as_str()) {
        return Ok(Pushed {
            digest,
            bytes: total,
            listed: Listed::Referrers,
        });
    }
    let entry = json!({
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": bytes.len(),
        "artifactType": ARTIFACT_TYPE,
        "annotations": annotations,
    });
    let listed = add_to_fallback_tag(client, repo, &subject.digest, entry)?;
    Ok(Pushed {
        digest,
        bytes: total,
        listed,
    })
}

/// Adds `entry` to the index under the subject's fallback tag (made if missing), replacing
/// flatfs index artifacts of the same format, which index the same layers. Another writer
/// racing this one may lose its entry: the fallback has no compare-and-swap.
fn add_to_fallback_tag(client: &Client, repo: &str, subject: &str, entry: Value) -> Result<Listed> {
    let tag = fallback_tag(subject);
    let scopes = [push_scope(repo)];
    let what = format!("{repo}:{tag}");
    let mut index =
        match client.get_document(repo, &format!("manifests/{tag}"), OCI_INDEX, &scopes)? {
            None => json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
            Some((bytes, _)) => {
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
                    what: what.clone(),
                    source: e,
                })?;
                if v["mediaType"].as_str() != Some(OCI_INDEX) || !v["manifests"].is_array() {
                    return Err(Error::invalid(
                        &what,
                        "the referrers tag holds something other than an OCI image index; not \
                     overwriting it",
                    ));
                }
                v
            }
        };
    let list = index["manifests"].as_array_mut().expect("checked above");
    if list.contains(&entry) {
        return Ok(Listed::TagPresent);
    }
    list.retain(|e| !ours(e));
    list.push(entry);
    let bytes = serde_json::to_vec(&index).map_err(|e| Error::Json { what, source: e })?;
    client.put_manifest(repo, &tag, &bytes, OCI_INDEX)?;
    Ok(Listed::TagAdded)
}

/// True for a referrers-list entry that is a flatfs index artifact this flatfs can read.
fn ours(entry: &Value) -> bool {
    entry["artifactType"].as_str() == Some(ARTIFACT_TYPE)
        && entry["annotations"][FORMAT_ANNOTATION].as_str()
            == Some(crate::cache::VERSION.to_string().as_str())
        && entry["mediaType"].as_str() == Some(OCI_MANIFEST)
}

/// A layer whose index is wanted: digest, blob size.
pub type Wanted = (String, u64);

/// Says, for a layer (digest, size) whose index is about to be fetched, how many of its
/// first bytes to fetch beside it (the first span a lazy open checks), if any.
pub type FirstSpan<'a> = &'a (dyn Fn(&str, u64) -> Option<u64> + Sync);

/// What a lazy open takes from an index artifact ([`fill_cache`]).
#[derive(Debug, Default)]
pub struct Filled {
    /// The layers whose index was imported.
    pub imported: Vec<String>,
    /// The first bytes of some of them, fetched beside their indexes: unverified (the lazy
    /// blob checks them against the span digests, as any fetched span).
    pub starts: HashMap<String, Vec<u8>>,
}

/// Looks for an index artifact of image `subject` in `repo` (referrers API, then the
/// fallback tag) and imports into `cache` what `wanted` layers need from it: the index blobs,
/// fetched in parallel, each checked against its digest and decoded with every check of a
/// cache file (its diff_id against `diff_ids()`, the config's, asked for only then), and for
/// each the fetch of its checkpoints blob, set up for when they are first loaded
/// ([`Cache::expect_checkpoints`]). Returns the layers whose index was imported; a layer it
/// cannot import is an error naming it (the others stay: each was checked on its own).
#[allow(clippy::too_many_arguments)]
fn import(
    client: &Arc<Client>,
    repo: &str,
    subject: &str,
    wanted: &[(Wanted, Need)],
    cache: &Cache,
    diff_ids: &mut dyn FnMut() -> Vec<(String, String)>,
    first_span: FirstSpan,
    filled: &mut Filled,
) -> Result<()> {
    let imported = &mut filled.imported;
    let Some(entry) = find(client, repo, subject)? else {
        return Ok(());
    };
    let digest = entry["digest"]
        .as_str()
        .ok_or_else(|| Error::invalid(repo, "referrers list entry without a digest"))?;
    let what = format!("index artifact {repo}@{digest}");
    let m = client.manifest(repo, digest)?;
    let manifest: Value = serde_json::from_slice(&m.bytes).map_err(|e| Error::Json {
        what: what.clone(),
        source: e,
    })?;
    if manifest["artifactType"].as_str() != Some(ARTIFACT_TYPE)
        || manifest["subject"]["digest"].as_str() != Some(subject)
    {
        return Err(Error::invalid(
            &what,
            format!("not a flatfs index artifact of {subject}"),
        ));
    }
    let blobs = manifest["layers"].as_array().map_or(&[][..], Vec::as_slice);
    let blob_of = |layer: &str, media_type: &str| -> Result<Option<(String, u64)>> {
        let Some(desc) = blobs.iter().find(|d| {
            d["annotations"][LAYER_ANNOTATION].as_str() == Some(layer)
                && d["mediaType"].as_str() == Some(media_type)
        }) else {
            return Ok(None);
        };
        match (desc["digest"].as_str(), desc["size"].as_u64()) {
            (Some(d), Some(s)) => Ok(Some((d.to_string(), s))),
            _ => Err(Error::invalid(
                &what,
                format!("bad descriptor for layer {layer}"),
            )),
        }
    };
    // The index blobs, all at once: each costs a round trip, and they are small.
    let mut jobs = Vec::new();
    for ((layer, size), need) in wanted {
        if *need != Need::Index {
            continue;
        }
        match blob_of(layer, LAYER_MEDIA_TYPE)? {
            Some((blob, blob_size)) => jobs.push((layer.clone(), *size, blob, blob_size)),
            None => log::info!("{what}: no index of layer {layer}"),
        }
    }
    // Beside them, the first span of each of those layers, which the open checks next.
    let starts: Vec<(String, u64)> = jobs
        .iter()
        .filter_map(|(layer, size, _, _)| Some((layer.clone(), first_span(layer, *size)?)))
        .collect();
    let mut work: Vec<Job> = Vec::new();
    for (_, size, blob, blob_size) in &jobs {
        work.push(Box::new(move || {
            fetch_blob(client, repo, blob, *blob_size, index_limit(*size))
        }));
    }
    for (layer, end) in &starts {
        work.push(Box::new(move || {
            client
                .fetch_range(repo, layer, 0, *end)
                .map_err(|e| e.to_string())
        }));
    }
    let mut fetched = run_all(work);
    for ((layer, _), bytes) in starts.iter().zip(fetched.split_off(jobs.len())) {
        if let Ok(b) = bytes {
            filled.starts.insert(layer.clone(), b);
        }
    }
    let diff_ids = if jobs.is_empty() {
        Vec::new()
    } else {
        diff_ids()
    };
    let mut first_error = None;
    for ((layer, size, _, _), index) in jobs.iter().zip(fetched) {
        let diff_id = diff_ids
            .iter()
            .find(|(d, _)| d == layer)
            .map(|(_, i)| i.as_str());
        let r = index.and_then(|index| cache.import(layer, *size, diff_id, &index));
        match r {
            Ok(()) => imported.push(layer.clone()),
            Err(e) => {
                first_error.get_or_insert_with(|| {
                    Error::invalid(&what, format!("index of layer {layer}: {e}"))
                });
            }
        }
    }
    for ((layer, _), need) in wanted {
        if *need == Need::Index && !imported.contains(layer) {
            continue;
        }
        let Some((blob, blob_size)) = blob_of(layer, CHECKPOINTS_MEDIA_TYPE)? else {
            continue;
        };
        expect_checkpoints(client, repo, cache, layer, blob, blob_size);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Sets up the fetch of the checkpoints of layer `layer` from blob `blob` (`blob_size` bytes)
/// of `repo`, for when they are first needed ([`Cache::expect_checkpoints`]).
fn expect_checkpoints(
    client: &Arc<Client>,
    repo: &str,
    cache: &Cache,
    layer: &str,
    blob: String,
    blob_size: u64,
) -> bool {
    {
        let (c, r, b) = (client.clone(), repo.to_string(), blob.clone());
        let fetch = Box::new(move |len: u64| {
            if len != blob_size {
                return Err(format!(
                    "blob {b} has {blob_size} bytes, the index names {len}"
                ));
            }
            let bytes = c.fetch_range(&r, &b, 0, len).map_err(|e| e.to_string())?;
            let found = crate::blob::sha256_of(&bytes);
            if found != b {
                return Err(format!("blob {b}: digest mismatch (found {found})"));
            }
            Ok(bytes)
        });
        let (c, r) = (client.clone(), repo.to_string());
        let range = Arc::new(move |start: u64, end: u64| {
            if end > blob_size || start >= end {
                return Err(format!("blob {blob}: no bytes {start}..{end}"));
            }
            c.fetch_range(&r, &blob, start, end)
                .map_err(|e| e.to_string())
        });
        cache.expect_checkpoints(layer, fetch, range)
    }
}

/// A fetch [`run_all`] runs.
type Job<'a> = Box<dyn FnOnce() -> Result<Vec<u8>, String> + Send + 'a>;

/// Runs `jobs` on a few threads; their results in the order of `jobs`.
fn run_all(jobs: Vec<Job>) -> Vec<Result<Vec<u8>, String>> {
    let n = jobs.len();
    let queue = Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>());
    let results = Mutex::new((0..n).map(|_| None).collect::<Vec<_>>());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(n) {
            s.spawn(|| {
                loop {
                    // Taken from the end: the first spans, then the index blobs, largest
                    // last; they all go out at once anyway.
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some((i, job)) = job else { break };
                    let r = job();
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not fetched".into())))
        .collect()
}

/// The newest readable flatfs index artifact listed for `subject`, if any.
fn find(client: &Client, repo: &str, subject: &str) -> Result<Option<Value>> {
    let scopes = [pull_scope(repo)];
    let api = format!("referrers/{subject}?artifactType={ARTIFACT_TYPE}");
    // A registry without the API answers 404 (or, for some, another error): then the tag.
    let listed = match client.get_document(repo, &api, OCI_INDEX, &scopes) {
        Ok(Some((bytes, ct))) if ct.starts_with(OCI_INDEX) => Some(bytes),
        Ok(_) => None,
        Err(e) => {
            log::debug!("referrers API: {e}");
            None
        }
    };
    let bytes = match listed {
        Some(b) => b,
        None => {
            let tag = format!("manifests/{}", fallback_tag(subject));
            match client.get_document(repo, &tag, OCI_INDEX, &scopes)? {
                Some((b, _)) => b,
                None => return Ok(None),
            }
        }
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        what: format!("referrers of {repo}@{subject}"),
        source: e,
    })?;
    let list = v["manifests"].as_array().map_or(&[][..], Vec::as_slice);
    Ok(list.iter().rev().find(|e| ours(e)).cloned())
}

/// Blob `digest` (`size` bytes, compressed) checked against its digest, inflated to at most
/// `limit` bytes.
fn fetch_blob(
    client: &Client,
    repo: &str,
    digest: &str,
    size: u64,
    limit: u64,
) -> Result<Vec<u8>, String> {
    // zstd may make incompressible bytes (windows of a layer of random data) a little longer.
    if size == 0 || size > MAX_BLOB.min(limit.saturating_add(limit / 64 + 4096)) {
        return Err(format!(
            "blob {digest}: {size} bytes is too big for an index"
        ));
    }
    let bytes = client
        .fetch_range(repo, digest, 0, size)
        .map_err(|e| e.to_string())?;
    let found = crate::blob::sha256_of(&bytes);
    if bytes.len() as u64 != size || found != digest {
        return Err(format!(
            "blob {digest}: digest mismatch (found {found}, {} bytes)",
            bytes.len()
        ));
    }
    inflate(&bytes, limit).map_err(|e| format!("blob {digest}: {e}"))
}

/// A zstd index blob inflated, refused past `limit` bytes.
fn inflate(bytes: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(bytes)
        .and_then(|d| d.take(limit + 1).read_to_end(&mut out))
        .map_err(|e| e.to_string())?;
    if out.len() as u64 > limit {
        return Err(format!("inflates past {limit} bytes"));
    }
    Ok(out)
}

/// For a lazy open: imports from the image's index artifact what the cache in `dir` lacks of
/// the layers `wanted` (indexes, and the fetch of their checkpoints, see `import`).
/// `diff_ids` gives the config's (layer, diff_id) pairs, once an index needs them;
/// `first_span` says how much of a layer to fetch beside its index. Best effort: a missing or
/// bad artifact is a warning, and those layers are then read as without one.
pub fn fill_cache(
    client: &Arc<Client>,
    repo: &str,
    subject: &str,
    wanted: &[Wanted],
    dir: &Path,
    diff_ids: &mut dyn FnMut() -> Vec<(String, String)>,
    first_span: FirstSpan,
) -> Filled {
    let cache = Cache::new(dir);
    let mut missing: Vec<(Wanted, Need)> = Vec::new();
    for w in wanted {
        let need = cache.needs(&w.0, w.1);
        if need == Need::Checkpoints
            && let Some((blob, size)) = cache.checkpoints_blob(&w.0)
        {
            // Cached index, checkpoints file gone (a mount that ended before they came):
            // the index names their blob, which is then fetched as the artifact's would be.
            expect_checkpoints(client, repo, &cache, &w.0, blob, size);
            continue;
        }
        if need != Need::Nothing && !missing.iter().any(|(m, _)| m.0 == w.0) {
            missing.push((w.clone(), need));
        }
    }
    let mut filled = Filled::default();
    if missing.is_empty() {
        return filled;
    }
    let r = import(
        client,
        repo,
        subject,
        &missing,
        &cache,
        diff_ids,
        first_span,
        &mut filled,
    );
    match r {
        Ok(()) if filled.imported.is_empty() => log::info!(
            "{}: no flatfs index artifact for {repo}@{subject}",
            client.host()
        ),
        Ok(()) => log::info!(
            "{}: {} of {} missing layer indexes from the index artifact",
            client.host(),
            filled.imported.len(),
            missing.len()
        ),
        Err(e) => log::warn!(
            "{}: {e}; not using the index artifact (the layers are read as without one)",
            client.host()
        ),
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_blob_inflates_only_so_far_for_its_layer() {
        assert_eq!(index_limit(1000), MIN_INDEX_LIMIT);
        assert_eq!(index_limit(1 << 30), MAX_INDEX);
        assert_eq!(index_limit(u64::MAX), MAX_INDEX);
        let limit = index_limit(10 << 20);
        let bomb = zstd::bulk::compress(&vec![0u8; limit as usize + 1], 3).unwrap();
        assert!(bomb.len() < 1 << 20);
        let e = inflate(&bomb, limit).unwrap_err();
        assert!(e.contains("inflates past"), "{e}");
        let fits = zstd::bulk::compress(&vec![0u8; limit as usize], 3).unwrap();
        assert_eq!(inflate(&fits, limit).unwrap().len() as u64, limit);
    }
}
