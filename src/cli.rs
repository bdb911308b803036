//! Command line: clap definitions and the glue from arguments to the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::content::Content;
use crate::export::{self, Format, OutCompression};
use crate::fs::FlatFs;
use crate::mount;
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
    ///
    /// Nothing is extracted: only the layers' tar headers are read to build the merged tree, and
    /// a file's bytes are read from its layer when someone reads the file. flatfs returns once
    /// the mount is ready and serves it from the background (with -f, in the foreground); the
    /// exit status says whether mounting worked.
    ///
    /// The mount is read-only, nosuid and nodev, and the kernel checks the image's owners and
    /// permission bits (default_permissions). Only the user who mounts sees it, unless
    /// --allow-other.
    ///
    /// To unmount: `flatfs umount MOUNTPOINT` (or `fusermount3 -u MOUNTPOINT`), or send the
    /// serving process SIGINT or SIGTERM (Ctrl-C with -f).
    #[command(
        after_help = "Examples:\n  flatfs mount app.docker.tar /mnt/app\n  ls -la /mnt/app/etc; getfattr -d -m- /mnt/app/usr/bin/ping\n  flatfs umount /mnt/app\n  flatfs mount -f --layers 2 image.oci.tar /mnt/x    # as after 2 layers; Ctrl-C unmounts\n  flatfs mount -o noexec,fsname=app app.oci.tar /mnt/app"
    )]
    Mount {
        /// The image to mount (same forms as for export).
        image: String,
        /// An existing directory to mount on.
        mountpoint: PathBuf,
        /// Serve in the foreground instead of returning once mounted; Ctrl-C unmounts.
        #[arg(short, long)]
        foreground: bool,
        /// Let other users in, not only the one who mounts (the image's permission bits still
        /// apply). As a normal user this needs `user_allow_other` in /etc/fuse.conf.
        #[arg(long)]
        allow_other: bool,
        /// Platform to pick from a multi-platform image [default: this host's].
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<Platform>,
        /// Mount the image as it was after its first N layers [default: all].
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
        /// More mount options, comma-separated, e.g. noexec, noatime, allow_root, fsname=NAME,
        /// max_read=BYTES; `dev` and `suid` lift the defaults. `rw` is refused.
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
    },
    /// Unmount a flatfs mount, also one whose server has died.
    ///
    /// Runs `fusermount3 -u`; if that fails (the mount is busy, or its server died: "Transport
    /// endpoint is not connected"), detaches it lazily with `fusermount3 -u -z`, then `umount -l`.
    Umount {
        /// Where the image is mounted.
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
        Command::Mount {
            image,
            mountpoint,
            foreground,
            allow_other,
            platform,
            layers,
            options,
        } => {
            let opts = mount::Options {
                foreground,
                allow_other,
                options,
            };
            // The cheap checks first: a mistyped mountpoint should not wait for a big image to
            // be indexed. Image errors still come before the fork, so both reach the terminal.
            let target = mount::Mountpoint::check(&mountpoint, &image, &opts)?;
            let (img, tree) = crate::open_merged(&image, platform.as_ref(), layers)?;
            let fs = FlatFs::new(tree, Content::new(&img.layers));
            // The blobs keep their files open. Dropping the image now removes a spooled stdin
            // from the temp dir, which the daemon, ending with exit(), never would.
            drop(img);
            target.serve(fs)?;
            Ok(())
        }
        Command::Umount { mountpoint } => {
            if mount::umount(&mountpoint)? == mount::Unmounted::Lazily {
                eprintln!(
                    "flatfs: {} was busy or its server gone; detached it lazily (it goes away \
                     when the last file open in it is closed)",
                    mountpoint.display()
                );
            }
            Ok(())
        }
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
