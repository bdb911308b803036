//! OCI image layouts, as directories or archives: `index.json` → (nested indexes) → the
//! manifest for the wanted platform → config and layers.
//! See: <https://github.com/opencontainers/image-spec/blob/main/image-layout.md>

use std::collections::HashSet;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};

use super::{
    Family, Image, Platform, SCHEMA1, Store, config_platform, diff_ids, is_schema1, make_layer,
    platform_text, read_config,
};
use crate::blob::sha256_of;
use crate::error::{Error, Result};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// How deep nested indexes may go before we call it a loop.
const MAX_NESTING: usize = 8;

fn blob_path(desc: &Descriptor) -> String {
    let d = desc.digest();
    format!("blobs/{}/{}", d.algorithm(), d.digest())
}

/// Reads a blob named by a descriptor, checking its size and (sha256) digest.
fn read_checked(store: &Store, image: &str, desc: &Descriptor, what: &str) -> Result<Vec<u8>> {
    let path = blob_path(desc);
    let blob = store.need(image, &path)?;
    if blob.len() != desc.size() {
        return Err(Error::invalid(
            what,
            format!(
                "blob {path} is {} bytes, the descriptor says {}",
                blob.len(),
                desc.size()
            ),
        ));
    }
    let bytes = blob
        .read_all(super::MAX_JSON)
        .map_err(|e| Error::io(&path, e))?;
    check_digest(desc, &bytes, what)?;
    Ok(bytes)
}

fn check_digest(desc: &Descriptor, bytes: &[u8], what: &str) -> Result<()> {
    let expected = desc.digest().to_string();
    if desc.digest().algorithm().as_ref() != "sha256" {
        return Err(Error::invalid(
            what,
            format!("unsupported digest algorithm in {expected}"),
        ));
    }
    let found = sha256_of(bytes);
    if found != expected {
        return Err(Error::DigestMismatch {
            what: what.to_string(),
            expected,
            found,
        });
    }
    Ok(())
}

/// Parses an index or manifest. Straight through serde_json rather than oci-spec's
/// `from_reader`, whose error says only "serde failed" and drops what and where.
pub(super) fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Json {
        what: what.to_string(),
        source: e,
    })
}

/// Parses an index or manifest, refusing a schema-1 manifest by name.
pub(super) fn parse_doc<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    image: &str,
    what: &str,
) -> Result<T> {
    if is_schema1(bytes) {
        return Err(Error::Schema1 {
            image: image.to_string(),
            what: what.to_string(),
        });
    }
    parse(bytes, what)
}

pub(super) fn is_index(mt: &MediaType) -> bool {
    matches!(mt, MediaType::ImageIndex)
        || mt.to_string() == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn is_manifest(mt: &MediaType) -> bool {
    matches!(mt, MediaType::ImageManifest)
        || mt.to_string() == "application/vnd.docker.distribution.manifest.v2+json"
}

fn platform_string(desc: &Descriptor) -> String {
    match desc.platform() {
        Some(p) => {
            let mut s = format!("{}/{}", p.os(), p.architecture());
            if let Some(v) = p.variant() {
                s = format!("{s}/{v}");
            }
            s
        }
        None => "unspecified".to_string(),
    }
}

/// Attestation manifests (BuildKit provenance/SBOM) say `unknown/unknown`: never an image.
fn is_attestation(desc: &Descriptor) -> bool {
    desc.platform().as_ref().is_some_and(|p| {
        p.os().to_string() == "unknown" && p.architecture().to_string() == "unknown"
    })
}

fn platform_matches(desc: &Descriptor, want: &Platform) -> bool {
    match desc.platform() {
        // A single-image layout often has no platform on its descriptor: take it.
        None => true,
        Some(p) => {
            p.os().to_string() == want.os
                && p.architecture().to_string() == want.arch
                && want
                    .variant
                    .as_ref()
                    .is_none_or(|v| p.variant().as_deref() == Some(v.as_str()))
        }
    }
}

/// Walks indexes down to one image manifest descriptor for `platform`.
pub(super) fn pick_manifest(
    store: &Store,
    image: &str,
    candidates: Vec<Descriptor>,
    platform: &Platform,
    depth: usize,
) -> Result<Descriptor> {
    pick_in(
        store,
        image,
        candidates,
        platform,
        depth,
        &mut HashSet::new(),
    )
}

/// [`pick_manifest`], skipping indexes already `tried`: indexes may share children, and a
/// hostile stack of them, each naming the next many times, must not take exponential time.
fn pick_in(
    store: &Store,
    image: &str,
    candidates: Vec<Descriptor>,
    platform: &Platform,
    depth: usize,
    tried: &mut HashSet<String>,
) -> Result<Descriptor> {
    if depth > MAX_NESTING {
        return Err(Error::invalid(image, "image indexes nest too deeply"));
    }
    let mut seen = Vec::new();
    // A schema-1 manifest for the platform: the error if nothing else matches.
    let mut schema1: Option<Error> = None;
    for desc in &candidates {
        if is_attestation(desc) {
            continue;
        }
        seen.push(platform_string(desc));
        if !platform_matches(desc, platform) {
            continue;
        }
        if is_manifest(desc.media_type()) {
            return Ok(desc.clone());
        }
        if SCHEMA1.contains(&desc.media_type().to_string().as_str()) {
            schema1.get_or_insert(Error::Schema1 {
                image: image.to_string(),
                what: format!("manifest {}", desc.digest()),
            });
            continue;
        }
        if !is_index(desc.media_type()) {
            // Say why a matching entry was passed over, or the error blames the platform.
            let last = seen.last_mut().expect("pushed above");
            *last = format!(
                "{last} ({} has unsupported media type {})",
                desc.digest(),
                desc.media_type()
            );
            continue;
        }
        if !tried.insert(desc.digest().to_string()) {
            // Tried already: it matched nothing, and its platforms are in `seen`.
            seen.pop();
            continue;
        }
        let what = format!("index {}", desc.digest());
        let bytes = read_checked(store, image, desc, &what)?;
        let index: ImageIndex = parse_doc(&bytes, image, &what)?;
        match pick_in(
            store,
            image,
            index.manifests().clone(),
            platform,
            depth + 1,
            tried,
        ) {
            Ok(d) => return Ok(d),
            // On offer are the nested index's platforms, not its descriptor's "unspecified".
            Err(Error::NoPlatform { available, .. }) => {
                seen.pop();
                if available != "none" {
                    seen.extend(available.split(", ").map(str::to_string));
                }
            }
            Err(e @ Error::Schema1 { .. }) => {
                schema1.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(e) = schema1 {
        return Err(e);
    }
    seen.sort();
    seen.dedup();
    Err(Error::NoPlatform {
        image: image.to_string(),
        wanted: platform.to_string(),
        available: if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        },
    })
}

pub(super) fn open(
    store: &Store,
    name: &str,
    reference: Option<&str>,
    platform: &Platform,
) -> Result<Image> {
    if !store.has("oci-layout") {
        return Err(Error::invalid(
            name,
            "OCI layout without an oci-layout file",
        ));
    }
    let index_blob = store.need(name, "index.json")?;
    let bytes = index_blob
        .read_all(super::MAX_JSON)
        .map_err(|e| Error::io("index.json", e))?;
    let index: ImageIndex = parse_doc(&bytes, name, "index.json")?;

    let annotation = |d: &Descriptor, key: &str| -> Option<String> {
        d.annotations().as_ref().and_then(|a| a.get(key)).cloned()
    };
    let mut top: Vec<Descriptor> = index.manifests().clone();
    if let Some(r) = reference {
        top.retain(|d| {
            annotation(d, REF_NAME).as_deref() == Some(r)
                || annotation(d, CONTAINERD_NAME).as_deref() == Some(r)
        });
        if top.is_empty() {
            return Err(Error::invalid(
                name,
                format!("index.json has no manifest named {r:?}"),
            ));
        }
    } else {
        let mut refs: Vec<String> = top.iter().filter_map(|d| annotation(d, REF_NAME)).collect();
        refs.sort();
        refs.dedup();
        if refs.len() > 1 {
            return Err(Error::invalid(
                name,
                format!(
                    "holds several images; pick one with {name}:REF ({})",
                    refs.join(", ")
                ),
            ));
        }
    }
    // `DIR:REF` names the layout DIR: the image's name comes from DIR, not from `DIR:REF`.
    let path = reference
        .and_then(|r| name.strip_suffix(r)?.strip_suffix(':'))
        .unwrap_or(name);
    let tags = top
        .iter()
        .find_map(|d| {
            annotation(d, CONTAINERD_NAME)
                .or_else(|| annotation(d, REF_NAME).and_then(|r| full_name(path, &r)))
        })
        .into_iter()
        .collect();

    let desc = pick_manifest(store, name, top, platform, 0)?;
    let what = format!("manifest {}", desc.digest());
    let bytes = read_checked(store, name, &desc, &what)?;
    let manifest: ImageManifest = parse_doc(&bytes, name, &what)?;

    let config_desc = manifest.config();
    let config_path = blob_path(config_desc);
    let config_blob = store.need(name, &config_path)?;
    let config = read_config(&config_blob, Some(config_desc.digest().as_ref()), "config")?;
    let platform_from_index = desc.platform().is_some();
    if platform_from_index {
        let (os, arch, variant) = config_platform(&config);
        let p = desc.platform().as_ref().expect("checked above");
        let index_variant = p.variant().as_deref().unwrap_or("");
        if os != p.os().to_string()
            || arch != p.architecture().to_string()
            || !(variant.is_empty() || index_variant.is_empty() || variant == index_variant)
        {
            log::warn!(
                "{name}: the index lists manifest {} as {} but its config says {}; going by \
                 the index, as containerd and skopeo do",
                desc.digest(),
                platform_string(&desc),
                platform_text(&config)
            );
        }
    }
    let ids = diff_ids(&config, "config")?;
    if ids.len() != manifest.layers().len() {
        return Err(Error::invalid(
            &what,
            format!(
                "lists {} layers but the config has {} diff_ids",
                manifest.layers().len(),
                ids.len()
            ),
        ));
    }
    let mut layers = Vec::with_capacity(ids.len());
    for (i, (layer, diff_id)) in manifest.layers().iter().zip(ids).enumerate() {
        check_layer_media_type(layer, i + 1)?;
        if layer.digest().algorithm().as_ref() != "sha256" {
            return Err(Error::invalid(
                format!("layer {}", i + 1),
                format!("unsupported digest algorithm in {}", layer.digest()),
            ));
        }
        let path = blob_path(layer);
        let blob = store.need(name, &path)?;
        if blob.len() != layer.size() {
            return Err(Error::invalid(
                format!("layer {} ({})", i + 1, layer.digest()),
                format!(
                    "blob is {} bytes, the manifest says {}",
                    blob.len(),
                    layer.size()
                ),
            ));
        }
        let mut made = make_layer(i + 1, blob, Some(layer.digest().to_string()), Some(diff_id))?;
        made.descriptor = serde_json::to_value(layer).ok();
        layers.push(made);
    }
    Ok(Image {
        name: name.to_string(),
        family: Family::Oci,
        archive: false,
        manifest_digest: desc.digest().to_string(),
        config_digest: config_desc.digest().to_string(),
        config,
        layers,
        tags,
        platform_from_index,
        _spool: None,
    })
}

/// A ref name like `latest` becomes `<image file stem>:latest`; a full name stays as it is.
/// `None`, with a warning, when that is no valid image name (`My Image.oci.tar`).
fn full_name(image: &str, reference: &str) -> Option<String> {
    let name = if reference.contains(':') || reference.contains('/') {
        reference.to_string()
    } else {
        let base = std::path::Path::new(image.trim_end_matches('/'))
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("image");
        let stem = base
            .split('.')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("image");
        format!("{}:{reference}", stem.to_ascii_lowercase())
    };
    match name.parse::<crate::reference::Reference>() {
        Ok(_) => Some(name),
        Err(e) => {
            log::warn!(
                "{image}: not named after its file: {name:?} is no valid image name ({})",
                e.reason
            );
            None
        }
    }
}

/// Accepts the tar layer types of OCI and Docker; refuses the rest by name.
pub(super) fn check_layer_media_type(desc: &Descriptor, number: usize) -> Result<()> {
    let mt = desc.media_type().to_string();
    let ok = matches!(
        mt.as_str(),
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd"
    );
    if ok {
        return Ok(());
    }
    Err(Error::UnsupportedMediaType {
        layer: format!("{} ({})", number, desc.digest()),
        media_type: mt,
    })
}

/// The platforms an image offers (`DIR:REF` picks the image), nested indexes walked,
/// attestations left out; empty for a single image whose index entry names no platform.
pub(super) fn platforms(
    store: &Store,
    name: &str,
    reference: Option<&str>,
) -> Result<Vec<Platform>> {
    let bytes = store
        .need(name, "index.json")?
        .read_all(super::MAX_JSON)
        .map_err(|e| Error::io("index.json", e))?;
    let index: ImageIndex = parse_doc(&bytes, name, "index.json")?;
    let named = |d: &Descriptor| {
        let a = d.annotations().as_ref();
        reference.is_none_or(|r| {
            a.and_then(|a| a.get(REF_NAME)).map(String::as_str) == Some(r)
                || a.and_then(|a| a.get(CONTAINERD_NAME)).map(String::as_str) == Some(r)
        })
    };
    let mut out = Vec::new();
    let top: Vec<Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| named(d))
        .cloned()
        .collect();
    collect_platforms(store, name, &top, 0, &mut HashSet::new(), &mut out)?;
    Ok(out)
}

/// Adds the platforms under `descs` to `out`, reading each index once (`read`).
fn collect_platforms(
    store: &Store,
    image: &str,
    descs: &[Descriptor],
    depth: usize,
    read: &mut HashSet<String>,
    out: &mut Vec<Platform>,
) -> Result<()> {
    if depth > MAX_NESTING {
        return Err(Error::invalid(image, "image indexes nest too deeply"));
    }
    for desc in descs {
        if is_attestation(desc) {
            continue;
        }
        if is_index(desc.media_type()) {
            if !read.insert(desc.digest().to_string()) {
                continue;
            }
            let what = format!("index {}", desc.digest());
            let bytes = read_checked(store, image, desc, &what)?;
            let index: ImageIndex = parse_doc(&bytes, image, &what)?;
            collect_platforms(store, image, index.manifests(), depth + 1, read, out)?;
        } else if let (true, Some(p)) = (is_manifest(desc.media_type()), desc.platform()) {
            let platform = Platform {
                os: p.os().to_string(),
                arch: p.architecture().to_string(),
                variant: p.variant().clone(),
            };
            if !out.contains(&platform) {
                out.push(platform);
            }
        }
    }
    Ok(())
}
