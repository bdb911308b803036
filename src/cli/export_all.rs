//! `flatfs export --all-platforms`: every platform of an index flattened, and a new index of the
//! flattened images written as an OCI layout or archive, or pushed to a registry.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::ui::Ui;
use crate::Opened;
use crate::export::{self, Format, OutCompression};
use crate::reference::{DEFAULT_TAG, Reference};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Where the new index goes.
#[derive(Clone, Copy)]
pub enum Dest<'a> {
    /// An OCI layout directory (new or empty).
    Layout(&'a Path),
    /// An OCI archive file.
    Archive(&'a Path),
    /// A registry.
    Push(&'a Reference),
}

/// What to flatten and how.
pub struct AllPlatforms<'a> {
    /// The source image (an index).
    pub image: &'a str,
    /// Layer compression of the flattened images.
    pub compression: Option<OutCompression>,
    /// The output name (its tag names the index).
    pub tag: Option<&'a Reference>,
    /// `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: Option<i64>,
}

/// Flattens every platform of `job.image` and writes or pushes the new index to `dest`.
pub fn run(job: &AllPlatforms, dest: Dest, ui: &Ui) -> Result<()> {
    let platforms = crate::source::platforms(job.image, &ui.registry)?;
    if platforms.is_empty() {
        bail!(
            "{}: a single image, not an index of platforms; export it without --all-platforms",
            job.image
        );
    }
    // Work beside a local output, so the finished layout is renamed into place.
    let work = match dest {
        Dest::Layout(p) | Dest::Archive(p) => {
            let parent = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            tempfile::Builder::new()
                .prefix(".flatfs-")
                .tempdir_in(parent)
        }
        Dest::Push(_) => tempfile::tempdir(),
    }
    .context("temp dir for the flattened images")?;
    let all = work.path().join("all");
    fs::create_dir_all(all.join("blobs/sha256"))?;
    let reference = job.tag.and_then(Reference::tag).unwrap_or(DEFAULT_TAG);
    let mut entries = Vec::new();
    for (i, platform) in platforms.iter().enumerate() {
        let Opened {
            image,
            tree,
            checkpoints,
        } = ui.open(job.image, Some(platform), None, Some(work.path()))?;
        let dir = work.path().join(format!("p{i}"));
        let opts = export::Options {
            format: Some(Format::Oci),
            compression: job.compression,
            tag: job.tag.map(ToString::to_string),
            source_date_epoch: job.source_date_epoch,
            checkpoints,
        };
        let out = dir.to_string_lossy().into_owned();
        let report = export::export_with_progress(&image, &tree, &out, &opts, &|_| {})
            .with_context(|| format!("flattening {} for {platform}", job.image))?;
        let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
        let mut desc = index["manifests"][0].clone();
        if let Some(d) = desc.as_object_mut() {
            d.remove("annotations");
            let mut p = json!({"os": platform.os, "architecture": platform.arch});
            if let Some(v) = &platform.variant {
                p["variant"] = json!(v);
            }
            d.insert("platform".into(), p);
        }
        for e in fs::read_dir(dir.join("blobs/sha256"))? {
            let e = e?;
            let to = all.join("blobs/sha256").join(e.file_name());
            if !to.exists() {
                fs::rename(e.path(), &to)?;
            }
        }
        if !ui.quiet {
            eprintln!(
                "flatfs: {platform}: flattened {} layers ({} entries)",
                image.layers.len(),
                report.entries
            );
        }
        entries.push(desc);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    }))?;
    let digest = crate::blob::sha256_of(&index);
    fs::write(
        all.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
        &index,
    )?;
    let top = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_INDEX,
            "digest": digest,
            "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": reference},
        }],
    });
    fs::write(all.join("index.json"), serde_json::to_vec(&top)?)?;
    fs::write(all.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;

    match dest {
        Dest::Push(target) => {
            let mount_from = job
                .image
                .strip_prefix("docker://")
                .and_then(|s| s.parse::<Reference>().ok())
                .filter(|r| r.domain() == target.domain())
                .map(|r| r.path().to_string());
            let pushed = crate::registry::push::push_layout(
                &all,
                target,
                mount_from.as_deref(),
                &ui.registry,
            )
            .with_context(|| format!("pushing the index to {target}"))?;
            if !ui.quiet {
                eprintln!(
                    "flatfs: pushed {target}@{} ({} platforms; {} blobs uploaded, {} mounted, {} \
                     already there)",
                    pushed.digest,
                    platforms.len(),
                    pushed.uploaded,
                    pushed.mounted,
                    pushed.present
                );
            }
        }
        Dest::Layout(out) => {
            let empty = fs::read_dir(out).map(|mut d| d.next().is_none());
            match empty {
                Ok(true) => fs::remove_dir(out)?,
                Ok(false) => bail!("{}: already exists and is not empty", out.display()),
                Err(_) => {}
            }
            fs::rename(&all, out).with_context(|| format!("writing {}", out.display()))?;
        }
        Dest::Archive(out) => {
            let tmp = tempfile::Builder::new()
                .prefix(".flatfs-")
                .tempfile_in(work.path())?;
            let mut b = tar::Builder::new(tmp.as_file());
            b.mode(tar::HeaderMode::Deterministic);
            b.append_path_with_name(all.join("oci-layout"), "oci-layout")?;
            b.append_path_with_name(all.join("index.json"), "index.json")?;
            let mut names: Vec<_> = fs::read_dir(all.join("blobs/sha256"))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            names.sort();
            for n in names {
                let name = Path::new("blobs/sha256").join(&n);
                b.append_path_with_name(all.join(&name), &name)?;
            }
            b.into_inner()?.sync_all()?;
            tmp.persist(out)
                .map_err(|e| e.error)
                .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    if !ui.quiet && !matches!(dest, Dest::Push(_)) {
        eprintln!(
            "flatfs: wrote an index of {} flattened platforms ({digest})",
            platforms.len()
        );
    }
    Ok(())
}
