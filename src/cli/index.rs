//! `flatfs index push`: the layer indexes of a registry image (from the cache, or built by
//! pulling it) pushed next to it as an OCI artifact, for lazy mounts on other hosts.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::ui::{Ui, UiArgs};
use crate::cache::Cache;
use crate::reference::Reference;
use crate::registry::artifact::{self, Listed, Subject};
use crate::registry::client::Client;
use crate::registry::store::BlobStore;
use crate::source::Platform;

/// Share layer indexes through a registry, so that lazy mounts skip the indexing pass.
///
/// A lazy `flatfs mount docker://…` reads only the bytes it needs, but it needs each layer's
/// index (entries, gzip checkpoints, span digests) first, and without one it streams the
/// layer once to build it. `index push` builds those indexes (or takes them from the cache)
/// and pushes them as an OCI 1.1 artifact (artifactType application/vnd.flatfs.index.v1)
/// whose subject is the image manifest: found through the registry's referrers API, or the
/// `sha256-HEX` tag fallback on registries without it. A mount on any host whose cache lacks
/// an index looks for that artifact, checks every blob's digest and every field as it checks
/// its own cache files, and mounts at once; a missing or bad artifact is a warning, and the
/// layers are then read as without one.
///
/// Trust: the artifact is as trustworthy as the repository's push rights. Layer bytes are
/// checked against the artifact's span digests as they are fetched (and against the layer
/// digest once all are local), but an index from someone who may push to the repository
/// could describe files the layer does not hold. `flatfs mount --no-index-artifact` does
/// without them.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  flatfs index push docker://registry.example/app:1\n  flatfs index push app.oci.tar --to docker://registry.example/app:1   # indexes built from the local copy\n  flatfs mount docker://registry.example/app:1 /mnt/app                 # on another host: no pass over the layers"
)]
pub struct IndexArgs {
    #[command(subcommand)]
    action: IndexAction,
}

#[derive(Subcommand, Debug)]
enum IndexAction {
    /// Push the layer indexes of IMAGE as an artifact attached to it in its registry.
    ///
    /// IMAGE is `docker://REF`, or with `--to docker://REF` a local image that was pushed to
    /// REF with its layers unchanged (then the indexes come from the local copy and nothing is
    /// downloaded). Layers whose indexes are cached are not downloaded either. Pushing the
    /// same indexes again changes nothing.
    #[command(
        after_help = "Examples:\n  flatfs index push docker://registry.example/app:1\n  flatfs index push app.oci.tar --to docker://registry.example/app:1   # indexes built from the local copy\n  flatfs mount docker://registry.example/app:1 /mnt/app                 # on another host: no pass over the layers"
    )]
    Push(PushArgs),
}

#[derive(Args, Debug)]
struct PushArgs {
    /// The image: `docker://REF`, or a local image with `--to`.
    image: String,
    /// The registry image to attach the indexes to [default: IMAGE].
    #[arg(long, value_name = "docker://REF")]
    to: Option<String>,
    /// Platform to pick from a multi-platform image [default: this host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<Platform>,
    #[command(flatten)]
    ui: UiArgs,
}

/// Runs `flatfs index`.
pub fn run(top: &UiArgs, args: IndexArgs) -> Result<()> {
    match args.action {
        IndexAction::Push(a) => push(&a.ui.start(top), &a),
    }
}

fn push(ui: &Ui, args: &PushArgs) -> Result<()> {
    let target = args.to.as_deref().unwrap_or(&args.image);
    let Some(name) = target.strip_prefix("docker://") else {
        anyhow::bail!(
            "{target}: index push attaches indexes to a registry image: give docker://REF \
             (or --to docker://REF for a local image)"
        );
    };
    let reference: Reference = name.parse().with_context(|| target.to_string())?;
    let mut local_layers = None;
    if args.to.is_some() {
        // The local image's indexes go to the cache, keyed by layer digest, where the open
        // of REF below finds them for the layers it shares.
        if ui.cache.is_none() {
            anyhow::bail!("--to takes the indexes through the cache: drop --no-cache");
        }
        let img = ui.open_image(&args.image, args.platform.as_ref())?;
        ui.index(&img, None, None)?;
        local_layers = Some(img.layers.into_iter().map(|l| l.digest).collect::<Vec<_>>());
    }
    // Layers with a cached index are read by ranges (not at all); the others are pulled and
    // indexed. The indexes pushed are built here, never taken from another artifact.
    let ui = &Ui {
        quiet: ui.quiet,
        cache: ui.cache.clone(),
        registry: crate::registry::Options {
            lazy: true,
            no_index_artifact: true,
            ..ui.registry.clone()
        },
    };
    let img = ui.open_image(target, args.platform.as_ref())?;
    if let Some(local) = &local_layers {
        // A copy pushed with recompression (skopeo gzips a docker archive's layers), or the
        // wrong --to, shares no blobs with REF: say so before its layers are downloaded.
        let missing = img
            .layers
            .iter()
            .filter(|l| l.digest.is_none() || !local.contains(&l.digest))
            .count();
        if missing > 0 {
            log::warn!(
                "{}: {missing} of {target}'s {} layers are not in it (recompressed on push, or \
                 another image?): they are downloaded from the registry and indexed",
                args.image,
                img.layers.len()
            );
        }
    }
    let indexes = ui.index(&img, None, None)?;
    // A layer that carries its own TOC (eStargz, zstd:chunked) is mounted through that: an
    // index for it would go unused, and its TOC-made index has no span digests to push.
    let mut skipped = 0;
    for layer in &img.layers {
        if let Some(toc) = layer.blob.toc() {
            skipped += 1;
            // Opening it made a partial blob to keep the chunks a mount reads; nothing read
            // any here, so an empty one would only be junk in `cache ls`.
            if let (Some(dir), Some(d)) = (&ui.registry.cache_dir, &layer.digest)
                && let Err(e) = BlobStore::in_cache(dir).remove_partial_if_unused(d)
            {
                log::warn!("cannot remove the empty partial blob {d}: {e}");
            }
            if !ui.quiet {
                eprintln!(
                    "flatfs: layer {} carries its own {} TOC; a lazy mount needs no index for it",
                    layer.label(),
                    toc.format
                );
            }
        }
    }
    if skipped == img.layers.len() {
        if !ui.quiet {
            eprintln!("flatfs: {target}: no layer needs an index: nothing pushed");
        }
        return Ok(());
    }
    let client = Client::connect(reference.domain(), &ui.registry)?;
    let repo = reference.path();
    let m = client.manifest(repo, &img.manifest_digest)?;
    let subject = Subject {
        media_type: m.media_type,
        digest: m.digest,
        size: m.bytes.len() as u64,
    };
    let mut layers: Vec<(String, crate::cache::Portable)> = Vec::new();
    for (layer, index) in img.layers.iter().zip(&indexes) {
        if layer.blob.toc().is_some() {
            continue;
        }
        let digest = layer
            .digest
            .clone()
            .with_context(|| format!("layer {}: no digest", layer.label()))?;
        if layers.iter().any(|(d, _)| *d == digest) {
            continue;
        }
        let bytes = Cache::portable(index, &digest)
            .map_err(|e| anyhow::anyhow!("layer {}: {e}", layer.label()))?;
        layers.push((digest, bytes));
    }
    let pushed = artifact::push(&client, repo, &subject, &layers)
        .with_context(|| format!("pushing the index artifact of {target}"))?;
    println!("{}", pushed.digest);
    if ui.quiet {
        return Ok(());
    }
    // A re-push uploads nothing new (blobs and manifest are already there, by digest): say
    // so rather than "pushed".
    if pushed.listed == Listed::TagPresent {
        eprintln!(
            "flatfs: the indexes of {} layers, {}@{} for {} (listed in tag {}), are already \
             in the registry; nothing pushed",
            layers.len(),
            reference.name(),
            pushed.digest,
            subject.digest,
            artifact::fallback_tag(&subject.digest)
        );
        return Ok(());
    }
    let how = match pushed.listed {
        Listed::Referrers => "listed by the referrers API".to_string(),
        _ => format!("listed in tag {}", artifact::fallback_tag(&subject.digest)),
    };
    eprintln!(
        "flatfs: pushed the indexes of {} layers ({} compressed) as {}@{} for {}, {how}",
        layers.len(),
        crate::inspect::human(pushed.bytes),
        reference.name(),
        pushed.digest,
        subject.digest
    );
    Ok(())
}
