//! `flatfs export`: the merged tree written out as a single-layer image or a rootfs tar.

use std::io::{self, IsTerminal};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use super::ui::{Ui, UiArgs};
use crate::Opened;
use crate::export::{self, Format, OutCompression};
use crate::reference::Reference;
use crate::source::Platform;

/// Write the merged image as a single-layer image (or a plain rootfs tar).
///
/// IMAGE is a `docker save` archive, an OCI image layout directory (DIR or DIR:REF), an OCI
/// archive, or `-` for an archive on stdin. The runtime config (Cmd, Env, Entrypoint, …) is
/// kept; the history records the squash.
///
/// With --keep N (or --keep-until, --keep-base), the bottom layers stay exactly as they are
/// (same blobs, digests, diff_ids, media types, annotations) and only the layers above them
/// become one layer, holding just what they changed: registries and hosts that already have
/// the base layers share them.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  flatfs export app.docker.tar -o flat.tar\n  flatfs export ./layout:latest -o flat.oci.tar --format oci-archive\n  docker save app | flatfs export - -o - | docker load\n  flatfs export app.oci.tar --keep-base python.oci.tar -o app-squashed.oci.tar\n  flatfs export app.oci.tar --keep 5 -o app-squashed.oci.tar    # layers 1-5 kept as they are"
)]
pub struct ExportArgs {
    /// The image to flatten.
    image: String,
    /// Where to write (`-` for stdout; `docker://[HOST/]REPO[:TAG]` pushes to a registry).
    #[arg(short, long, value_name = "OUT")]
    output: String,
    /// Output format [default: docker-archive for docker input, oci-archive for OCI input].
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Layer compression [default: gzip; none for docker-archive and rootfs].
    #[arg(long, value_enum)]
    compression: Option<CompressionArg>,
    /// Name of the output image, e.g. `app:1.0` or `registry.example.com:5000/team/app`
    /// (`:latest` if no tag) [default: the input's name].
    #[arg(long, value_name = "NAME[:TAG]", value_parser = parse_tag)]
    tag: Option<Reference>,
    /// Platform to pick from a multi-platform image [default: this host's].
    #[arg(
        long,
        value_name = "OS/ARCH[/VARIANT]",
        conflicts_with = "all_platforms"
    )]
    platform: Option<Platform>,
    /// Keep the bottom N layers as they are and squash only the layers above them into one
    /// (0: squash everything, the default). Not with --format rootfs.
    #[arg(long, value_name = "N", group = "keeping")]
    keep: Option<usize>,
    /// Keep the layers up to and including the one whose digest or diff_id starts with
    /// DIGEST (as `flatfs inspect` shows them, with or without `sha256:`).
    #[arg(long, value_name = "DIGEST", group = "keeping")]
    keep_until: Option<String>,
    /// Keep the layers that image BASE consists of (IMAGE must start with them), e.g. the
    /// python or debian image the application was built FROM.
    #[arg(long, value_name = "BASE", group = "keeping")]
    keep_base: Option<String>,
    /// Flatten every platform of an index and write (oci, oci-archive) or push a new index.
    #[arg(long, conflicts_with = "keeping")]
    all_platforms: bool,
    /// Write to stdout even when it is a terminal.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    pub ui: UiArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum FormatArg {
    DockerArchive,
    OciArchive,
    Oci,
    Rootfs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CompressionArg {
    Gzip,
    Zstd,
    None,
    /// gzip laid out as eStargz (per-file members, a TOC): lazily mountable, still tar+gzip.
    Estargz,
}

/// Runs `flatfs export`.
pub fn run(ui: &Ui, args: ExportArgs) -> Result<()> {
    let ExportArgs {
        image,
        output,
        format,
        compression,
        tag,
        platform,
        keep,
        keep_until,
        keep_base,
        all_platforms,
        force,
        ..
    } = args;
    // As gzip and zstd do: an image is no use on a screen, and can upset the terminal.
    if output == "-" && !force && io::stdout().is_terminal() {
        anyhow::bail!(
            "refusing to write an image to a terminal: redirect stdout, pipe it, or use --force"
        );
    }
    export::catch_interrupts();
    // `-o docker://…`: export to an OCI layout in a temp dir, then push that.
    let target = match output.strip_prefix("docker://") {
        Some(name) => Some(
            Reference::parse_tag_arg(name)
                .with_context(|| format!("-o {output}"))?
                .with_default_tag(),
        ),
        None => None,
    };
    if all_platforms {
        use super::export_all::{AllPlatforms, Dest};
        let dest = match (&target, format) {
            (Some(t), None | Some(FormatArg::Oci)) => Dest::Push(t),
            (None, Some(FormatArg::Oci)) => Dest::Layout(Path::new(&output)),
            (None, None | Some(FormatArg::OciArchive)) if output != "-" => {
                Dest::Archive(Path::new(&output))
            }
            _ => anyhow::bail!(
                "--all-platforms writes an index: -o DIR --format oci, -o FILE (oci-archive) or \
                 -o docker://…"
            ),
        };
        let job = AllPlatforms {
            image: &image,
            compression: compression.map(|c| match c {
                CompressionArg::Gzip => OutCompression::Gzip,
                CompressionArg::Zstd => OutCompression::Zstd,
                CompressionArg::None => OutCompression::None,
                CompressionArg::Estargz => OutCompression::Estargz,
            }),
            tag: target.as_ref().or(tag.as_ref()),
            source_date_epoch: source_date_epoch()?,
        };
        return super::export_all::run(&job, dest, ui);
    }
    let push_dir = match &target {
        Some(_) if format.is_some_and(|f| !matches!(f, FormatArg::Oci)) => {
            anyhow::bail!("-o docker://… pushes an image: --format must be oci or left out")
        }
        Some(_) => Some(tempfile::tempdir().context("temp dir for the image to push")?),
        None => None,
    };
    let (output, format, tag) = match (&push_dir, &target) {
        (Some(dir), Some(t)) => (
            dir.path().join("layout").to_string_lossy().into_owned(),
            Some(FormatArg::Oci),
            Some(t.clone()),
        ),
        _ => (output, format, tag),
    };
    if matches!(format, Some(FormatArg::Rootfs)) && tag.is_some() {
        anyhow::bail!(
            "--tag names an image: a rootfs tar has no name (drop --tag or pick an image --format)"
        );
    }
    let opts = export::Options {
        format: format.map(|f| match f {
            FormatArg::DockerArchive => Format::DockerArchive,
            FormatArg::OciArchive => Format::OciArchive,
            FormatArg::Oci => Format::Oci,
            FormatArg::Rootfs => Format::Rootfs,
        }),
        compression: compression.map(|c| match c {
            CompressionArg::Gzip => OutCompression::Gzip,
            CompressionArg::Zstd => OutCompression::Zstd,
            CompressionArg::None => OutCompression::None,
            CompressionArg::Estargz => OutCompression::Estargz,
        }),
        tag: tag.map(|t| t.to_string()),
        source_date_epoch: source_date_epoch()?,
        checkpoints: Vec::new(),
    };
    // Compressed layers are kept decompressed beside the output while indexing, so
    // export reads file contents in place instead of decompressing every layer again.
    let spool_dir = export::scratch_dir(&output);
    let keeping = keep.is_some_and(|k| k > 0) || keep_until.is_some() || keep_base.is_some();
    let (layers, report, summary_text) = if keeping {
        if opts.format == Some(Format::Rootfs) {
            anyhow::bail!(
                "--keep, --keep-until and --keep-base keep layers: a rootfs tar has none (use --format oci, oci-archive or docker-archive)"
            );
        }
        let img = ui.open_image(&image, platform.as_ref())?;
        let keep = match (keep, keep_until, keep_base) {
            (Some(n), _, _) => n,
            (_, Some(digest), _) => layers_until(&img, &digest)?,
            (_, _, Some(base)) => base_layers(ui, &img, &base, platform.as_ref())?,
            (None, None, None) => unreachable!("one of them is given"),
        };
        let layers = img.layers.len();
        let (report, text) = export_keeping(ui, img, keep, &spool_dir, &output, &opts)?;
        (layers, report, text)
    } else {
        let Opened {
            image: img,
            tree,
            checkpoints,
        } = ui.open(&image, platform.as_ref(), None, Some(&spool_dir))?;
        // Layers whose index came from the cache kept their checkpoints: decompressed in parallel.
        let opts = export::Options {
            checkpoints,
            ..opts
        };
        let started = Instant::now();
        let bar = ui.bar(export::content_bytes(&tree), "exporting");
        let report = export::export_with_progress(&img, &tree, &output, &opts, &|n| {
            if let Some(b) = &bar {
                b.inc(n);
            }
        })
        .with_context(|| format!("exporting {image} to {output}"))?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        log::info!("exported in {:.2?}", started.elapsed());
        let text = summary(img.layers.len(), &output, &report);
        (img.layers.len(), report, text)
    };
    if let Some(target) = &target {
        // Blobs of a source in the same registry can be mounted rather than uploaded.
        let mount_from = image
            .strip_prefix("docker://")
            .and_then(|s| s.parse::<Reference>().ok())
            .filter(|r| r.domain() == target.domain())
            .map(|r| r.path().to_string());
        let pushed = crate::registry::push::push_layout(
            std::path::Path::new(&output),
            target,
            mount_from.as_deref(),
            &ui.registry,
        )
        .with_context(|| format!("pushing {image} flattened to {target}"))?;
        if !ui.quiet {
            eprintln!(
                "flatfs: flattened {layers} layers ({} entries) and pushed {target}@{} ({} blobs \
                 uploaded, {} mounted, {} already there)",
                report.entries, pushed.digest, pushed.uploaded, pushed.mounted, pushed.present
            );
        }
        return Ok(());
    }
    if !ui.quiet {
        eprint!("{summary_text}");
    }
    Ok(())
}

/// `export --keep N`: the bottom N layers as they are, the rest squashed into one layer.
fn export_keeping(
    ui: &Ui,
    img: crate::source::Image,
    keep: usize,
    spool_dir: &Path,
    output: &str,
    opts: &export::Options,
) -> Result<(export::Report, String)> {
    let name = img.name.clone();
    // The kept layers are indexed (or their indexes loaded) but never spooled: only the
    // layers above them are read for their contents.
    let (opened, base) = crate::open_keeping(img, keep, |img| {
        ui.index_with(img, None, Some(spool_dir), keep)
    })?;
    let (img, tree) = (opened.image, opened.tree);
    let opts = &export::Options {
        checkpoints: opened.checkpoints,
        ..opts.clone()
    };
    let started = Instant::now();
    let plan = crate::squash::Plan::new(&base, &tree)?;
    drop(base);
    let keep = export::Keep {
        layers: keep,
        plan: &plan,
    };
    let bar = ui.bar(export::planned_content_bytes(&tree, &plan), "exporting");
    let report = export::export_keeping(&img, &tree, keep, output, opts, &|n| {
        if let Some(b) = &bar {
            b.inc(n);
        }
    })
    .with_context(|| format!("exporting {name} to {output}"))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    log::info!("exported in {:.2?}", started.elapsed());
    let s = report.squash.unwrap_or_default();
    let text = format!(
        "flatfs: kept {} layers, squashed {} into one ({} changed, {} names, {} whiteouts, {} opaque) in {}\n{}",
        keep.layers,
        img.layers.len() - keep.layers,
        s.changed,
        s.names,
        s.whiteouts,
        s.opaques,
        if output == "-" { "stdout" } else { output },
        digests(&report)
    );
    Ok((report, text))
}

/// `--keep-until DIGEST`: the number of the one layer whose digest or diff_id starts with it.
fn layers_until(img: &crate::source::Image, digest: &str) -> Result<usize> {
    let want = digest
        .trim()
        .trim_start_matches("sha256:")
        .to_ascii_lowercase();
    if want.is_empty() || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        anyhow::bail!(
            "--keep-until {digest:?}: give a layer digest or diff_id (hex, as `flatfs inspect` shows it)"
        );
    }
    let found: Vec<usize> = img
        .layers
        .iter()
        .filter(|l| {
            [&l.digest, &l.diff_id]
                .into_iter()
                .flatten()
                .any(|d| d.trim_start_matches("sha256:").starts_with(&want))
        })
        .map(|l| l.number)
        .collect();
    match found[..] {
        [n] => Ok(n),
        [] => anyhow::bail!(
            "--keep-until {digest}: no layer of {} has a digest or diff_id starting with it",
            img.name
        ),
        _ => anyhow::bail!(
            "--keep-until {digest}: ambiguous, layers {} of {} match; give more digits",
            found
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            img.name
        ),
    }
}

/// `--keep-base BASE`: how many layers BASE has, once IMAGE is seen to start with them (same
/// diff_ids, that is the same uncompressed contents, in the same order).
fn base_layers(
    ui: &Ui,
    img: &crate::source::Image,
    base: &str,
    platform: Option<&Platform>,
) -> Result<usize> {
    let b = ui
        .open_image(base, platform)
        .with_context(|| format!("reading --keep-base {base}"))?;
    if b.layers.len() > img.layers.len() {
        anyhow::bail!(
            "{} does not start with the layers of {base}: it has {} layers, {base} has {}",
            img.name,
            img.layers.len(),
            b.layers.len()
        );
    }
    for (mine, theirs) in img.layers.iter().zip(&b.layers) {
        if mine.diff_id != theirs.diff_id {
            anyhow::bail!(
                "{} does not start with the layers of {base}: layer {} is {}, in {base} it is {}",
                img.name,
                mine.number,
                mine.diff_id.as_deref().unwrap_or("unknown"),
                theirs.diff_id.as_deref().unwrap_or("unknown")
            );
        }
        if mine.digest.is_some() && theirs.digest.is_some() && mine.digest != theirs.digest {
            // Same contents, another blob (recompressed): kept as IMAGE has it, which a
            // registry holding BASE's blob will not recognise.
            log::warn!(
                "layer {} has the contents of {base}'s layer {} but another blob ({} vs {}): \
                 it is kept as {} stores it",
                mine.number,
                theirs.number,
                mine.digest.as_deref().unwrap_or(""),
                theirs.digest.as_deref().unwrap_or(""),
                img.name
            );
        }
    }
    Ok(b.layers.len())
}

/// What was written, on stderr: where, from how many layers, and the digests that name it,
/// each labelled (a docker archive has no manifest digest: its manifest.json is not hashed).
fn summary(layers: usize, output: &str, report: &export::Report) -> String {
    let layers = match layers {
        1 => "1 layer".to_string(),
        n => format!("{n} layers"),
    };
    let into = if output == "-" { "stdout" } else { output };
    format!(
        "flatfs: flattened {layers} ({} entries) into {into}\n{}",
        report.entries,
        digests(report)
    )
}

/// The digests that name what was written, one labelled line each.
fn digests(report: &export::Report) -> String {
    let mut s = String::new();
    let mut label = |what: &str, value: &str| s.push_str(&format!("  {what:<9} {value}\n"));
    match (&report.image_id, &report.manifest_digest) {
        (None, _) => label("tar", &report.diff_id),
        (Some(id), manifest) => {
            label("image ID", id);
            if let Some(m) = manifest {
                label("manifest", m);
            }
        }
    }
    s
}

/// `--tag`, checked by the reference grammar while the command line is parsed: a bad name is
/// a usage error before any work is done.
fn parse_tag(s: &str) -> Result<Reference, String> {
    Reference::parse_tag_arg(s).map_err(|e| e.reason.to_string())
}

/// `SOURCE_DATE_EPOCH`, if set: the timestamp a reproducible build asks for.
fn source_date_epoch() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => {
            Ok(Some(v.trim().parse().with_context(|| {
                format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")
            })?))
        }
        _ => Ok(None),
    }
}
