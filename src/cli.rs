//! Command line: clap definitions and the glue from arguments to the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::export::{self, Format, OutCompression};
use crate::source::Platform;

/// Flatten a multi-layer container image: mount it as one read-only filesystem, or export it as
/// a single-layer image. No daemon, nothing extracted.
#[derive(Parser, Debug)]
#[command(name = "flatfs", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the merged image as a single-layer image (or a plain rootfs tar).
    ///
    /// IMAGE is a `docker save` archive, an OCI image layout directory (DIR or DIR:REF), an OCI
    /// archive, or `-` for an archive on stdin. The runtime config (Cmd, Env, Entrypoint, …) is
    /// kept; the history records the squash.
    #[command(
        after_help = "Examples:\n  flatfs export app.docker.tar -o flat.tar\n  flatfs export ./layout:latest -o flat.oci.tar --format oci-archive\n  docker save app | flatfs export - -o - | docker load"
    )]
    Export {
        /// The image to flatten.
        image: String,
        /// Where to write (`-` for stdout).
        #[arg(short, long, value_name = "OUT")]
        output: String,
        /// Output format [default: docker-archive for docker input, oci-archive for OCI input].
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Layer compression [default: gzip; none for docker-archive and rootfs].
        #[arg(long, value_enum)]
        compression: Option<CompressionArg>,
        /// NAME:TAG of the output image [default: the input's tag].
        #[arg(long, value_name = "NAME:TAG")]
        tag: Option<String>,
        /// Platform to pick from a multi-platform image [default: this host's].
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<Platform>,
    },
    /// Mount the merged image as a read-only FUSE filesystem.
    Mount {
        /// The image to mount (same forms as for export).
        image: String,
        /// An existing empty directory.
        mountpoint: PathBuf,
    },
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

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Export {
            image,
            output,
            format,
            compression,
            tag,
            platform,
        } => {
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
                tag,
                source_date_epoch: source_date_epoch()?,
            };
            let (img, tree) = crate::open_merged(&image, platform.as_ref(), None)?;
            let report = export::export(&img, &tree, &output, &opts)
                .with_context(|| format!("exporting {image} to {output}"))?;
            eprintln!(
                "flatfs: flattened {} layers ({} entries) into {} ({})",
                img.layers.len(),
                report.entries,
                if output == "-" { "stdout" } else { &output },
                report.manifest_digest.as_deref().unwrap_or(&report.diff_id)
            );
            Ok(())
        }
        Command::Mount { .. } => anyhow::bail!("mount is not built yet"),
    }
}

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
