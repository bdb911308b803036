//! `docker save` archives: `manifest.json` lists the config and layer members, both in the
//! classic layout (`<id>/layer.tar`) and the Docker ≥ 25 one (`blobs/sha256/<hex>`).

use serde::Deserialize;

use super::{Family, Image, Store, diff_ids, is_schema1, make_layer, parse_config};
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The digest a member name implies: `blobs/sha256/<hex>` or `<hex>.json`.
fn digest_from_name(name: &str) -> Option<String> {
    let name = name.trim_start_matches("./");
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| format!("sha256:{hex}"))
}

/// A skopeo `dir:` (or podman `docker-dir`) copy: manifest.json is a schema-2 or OCI image
/// manifest object rather than docker save's array.
fn is_dir_copy(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .is_ok_and(|v| v.get("schemaVersion").is_some() && v.get("layers").is_some())
}

pub(super) fn open(store: &Store, name: &str, reference: Option<&str>) -> Result<Image> {
    let entries: Vec<Entry> = match store.json(name, "manifest.json") {
        Ok(entries) => entries,
        // `skopeo copy … dir:DIR` of a schema-1 image: say what it is, not what JSON we wanted.
        Err(e @ Error::Json { .. }) => {
            let bytes = store
                .need(name, "manifest.json")?
                .read_all(super::MAX_JSON)
                .map_err(|e| Error::io("manifest.json", e))?;
            return Err(if is_schema1(&bytes) {
                Error::Schema1 {
                    image: name.to_string(),
                    what: "manifest.json".to_string(),
                }
            } else if is_dir_copy(&bytes) {
                Error::invalid(
                    name,
                    format!(
                        "looks like a skopeo `dir:` copy (manifest.json is one image manifest, \
                         not docker save's list), which flatfs does not read; convert it with \
                         `skopeo copy dir:{name} oci:NEWDIR:latest`"
                    ),
                )
            } else {
                e
            });
        }
        Err(e) => return Err(e),
    };
    let entry = match (reference, entries.len()) {
        (_, 0) => return Err(Error::invalid("manifest.json", "lists no image")),
        (None, 1) => &entries[0],
        (None, _) => {
            let tags: Vec<String> = entries
                .iter()
                .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
                .collect();
            return Err(Error::invalid(
                name,
                format!(
                    "holds {} images; pick one with IMAGE:TAG ({})",
                    entries.len(),
                    tags.join(", ")
                ),
            ));
        }
        (Some(r), _) => entries
            .iter()
            .find(|e| {
                e.repo_tags
                    .iter()
                    .flatten()
                    .any(|t| t == r || t.rsplit_once(':').is_some_and(|(_, tag)| tag == r))
            })
            .ok_or_else(|| Error::invalid(name, format!("no image tagged {r}")))?,
    };

    // The config's name is only a name: `docker load`, skopeo and podman read the file that
    // manifest.json names and take the image ID from its content, and tools that edit a config
    // in place (go-containerregistry's `mutate`) leave the old name on it.
    let config_blob = store.need(name, &entry.config)?;
    let bytes = config_blob
        .read_all(super::MAX_JSON)
        .map_err(|e| Error::io(&entry.config, e))?;
    let config_digest = crate::blob::sha256_of(&bytes);
    if let Some(named) = digest_from_name(&entry.config)
        && named != config_digest
    {
        log::warn!(
            "{name}: config {} is named for {named} but its content is {config_digest}; \
             the image ID is the content's digest",
            entry.config
        );
    }
    let config = parse_config(&bytes, &entry.config)?;
    let ids = diff_ids(&config, &entry.config)?;
    if ids.len() != entry.layers.len() {
        return Err(Error::invalid(
            name,
            format!(
                "manifest.json lists {} layers but the config has {} diff_ids",
                entry.layers.len(),
                ids.len()
            ),
        ));
    }
    let mut layers = Vec::with_capacity(ids.len());
    for (i, (member, diff_id)) in entry.layers.iter().zip(ids).enumerate() {
        let blob = store.need(name, member)?;
        layers.push(make_layer(
            i + 1,
            blob,
            digest_from_name(member),
            Some(diff_id),
        )?);
    }
    Ok(Image {
        name: name.to_string(),
        family: Family::Docker,
        archive: true,
        manifest_digest: config_digest.clone(),
        config_digest,
        config,
        layers,
        tags: entry.repo_tags.clone().unwrap_or_default(),
        platform_from_index: false,
        _spool: None,
    })
}
