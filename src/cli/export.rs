//! `flatfs export`: the merged tree written out as a single-layer image or a rootfs tar.

use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
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
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  flatfs export app.docker.tar -o flat.tar\n  flatfs export ./layout:latest -o flat.oci.tar --format oci-archive\n  docker save app | flatfs export - -o - | docker load"
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
    /// Flatten every platform of an index and write (oci, oci-archive) or push a new index.
    #[arg(long)]
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
        }),
        tag: tag.map(|t| t.to_string()),
        source_date_epoch: source_date_epoch()?,
    };
    // Compressed layers are kept decompressed beside the output while indexing, so
    // export reads file contents in place instead of decompressing every layer again.
    let spool_dir = match output.as_str() {
        "-" => std::env::temp_dir(),
        o => match Path::new(o).parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    let Opened {
        image: img, tree, ..
    } = ui.open(&image, platform.as_ref(), None, Some(&spool_dir))?;
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
                "flatfs: flattened {} layers ({} entries) and pushed {target}@{} ({} blobs \
                 uploaded, {} mounted, {} already there)",
                img.layers.len(),
                report.entries,
                pushed.digest,
                pushed.uploaded,
                pushed.mounted,
                pushed.present
            );
        }
        return Ok(());
    }
    if !ui.quiet {
        eprint!("{}", summary(img.layers.len(), &output, &report));
    }
    Ok(())
}

/// What was written, on stderr: where, from how many layers, and the digests that name it,
/// each labelled (a docker archive has no manifest digest: its manifest.json is not hashed).
fn summary(layers: usize, output: &str, report: &export::Report) -> String {
    let layers = match layers {
        1 => "1 layer".to_string(),
        n => format!("{n} layers"),
    };
    let into = if output == "-" { "stdout" } else { output };
    let mut s = format!(
        "flatfs: flattened {layers} ({} entries) into {into}\n",
        report.entries
    );
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
