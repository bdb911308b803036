//! Push: an image that export wrote as an OCI layout goes to a registry. Blobs first (each
//! skipped when the registry has it, mounted from the source repository when that is on the
//! same registry, else uploaded), manifests of an index before the index, and the tag last,
//! so a push that fails half-way never leaves a tag pointing at a partial image.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Options;
use super::client::{Client, Pushed};
use crate::error::{Error, Result};
use crate::reference::{DEFAULT_TAG, Reference};

/// What a push did, for the summary line.
#[derive(Debug, Default, Clone)]
pub struct PushReport {
    /// Digest of the manifest (or index) the tag now names.
    pub digest: String,
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Blobs mounted from the source repository.
    pub mounted: usize,
    /// Blobs the registry already had.
    pub present: usize,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// Pushes the image of OCI layout `layout` (its `index.json`'s one entry) to `target`.
/// `mount_from` is the source image's repository when it is on the target's registry.
pub fn push_layout(
    layout: &Path,
    target: &Reference,
    mount_from: Option<&str>,
    opts: &Options,
) -> Result<PushReport> {
    if target.digest().is_some() {
        return Err(Error::invalid(
            target,
            "a push needs a tag, not a digest (the digest is of what is pushed)",
        ));
    }
    let tag = target.tag().unwrap_or(DEFAULT_TAG);
    let client = Client::connect(target.domain(), opts)?;
    let repo = target.path();
    let index: Value = read_json(&layout.join("index.json"))?;
    let top = match index["manifests"].as_array().map(Vec::as_slice) {
        Some([one]) => one.clone(),
        _ => {
            return Err(Error::invalid(
                layout.display(),
                "index.json must name exactly one image to push",
            ));
        }
    };
    let mut report = PushReport::default();
    let pusher = Pusher {
        client: &client,
        layout,
        repo,
        mount_from,
    };
    pusher.push_document(&top, Some(tag), &mut report, 0)?;
    Ok(report)
}

struct Pusher<'a> {
    client: &'a Client,
    layout: &'a Path,
    repo: &'a str,
    mount_from: Option<&'a str>,
}

impl Pusher<'_> {
    /// Pushes what `desc` names, and everything it names, then the document itself: under
    /// `tag` if given (the top), else under its digest.
    fn push_document(
        &self,
        desc: &Value,
        tag: Option<&str>,
        report: &mut PushReport,
        depth: usize,
    ) -> Result<()> {
        if depth > 8 {
            return Err(Error::invalid(
                self.layout.display(),
                "indexes nest too deeply",
            ));
        }
        let (digest, size) = descriptor(desc, self.layout)?;
        let media_type = desc["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json");
        let path = self.blob_path(&digest)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::io(path.display(), e))?;
        if bytes.len() as u64 != size {
            return Err(Error::invalid(
                path.display(),
                "size differs from its descriptor",
            ));
        }
        let doc: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            what: path.display().to_string(),
            source: e,
        })?;
        if let Some(children) = doc["manifests"].as_array() {
            for child in children {
                self.push_document(child, None, report, depth + 1)?;
            }
        } else {
            let mut blobs = vec![&doc["config"]];
            blobs.extend(doc["layers"].as_array().into_iter().flatten());
            for blob in blobs {
                let (d, s) = descriptor(blob, self.layout)?;
                let path = self.blob_path(&d)?;
                match self
                    .client
                    .push_blob(self.repo, &d, &path, s, self.mount_from)?
                {
                    Pushed::Present => report.present += 1,
                    Pushed::Mounted => report.mounted += 1,
                    Pushed::Uploaded => {
                        report.uploaded += 1;
                        report.bytes += s;
                    }
                }
                log::info!("{}: blob {d} in {}", self.client.host(), self.repo);
            }
        }
        let reference = tag.unwrap_or(&digest);
        let put = self
            .client
            .put_manifest(self.repo, reference, &bytes, media_type)?;
        if put != digest {
            return Err(self.client.error(format!(
                "PUT manifest {}: the registry reports digest {put}, the document's is {digest}",
                self.repo
            )));
        }
        report.digest = digest;
        Ok(())
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        match digest.strip_prefix("sha256:") {
            Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(self.layout.join("blobs/sha256").join(hex))
            }
            _ => Err(Error::invalid(
                self.layout.display(),
                format!("unsupported digest {digest:?}"),
            )),
        }
    }
}

fn descriptor(desc: &Value, layout: &Path) -> Result<(String, u64)> {
    match (desc["digest"].as_str(), desc["size"].as_u64()) {
        (Some(d), Some(s)) => Ok((d.to_string(), s)),
        _ => Err(Error::invalid(
            layout.display(),
            format!("descriptor without digest or size: {desc}"),
        )),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path.display(), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        what: path.display().to_string(),
        source: e,
    })
}
