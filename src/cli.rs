//! Command line: clap definitions and the glue from arguments to the library.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cache::{self, Cache, CacheKind};
use crate::content::Content;
use crate::export::{self, Format, OutCompression};
use crate::fs::FlatFs;
use crate::inspect;
use crate::layer::LayerIndex;
use crate::mount;
use crate::source::{self, Image, Platform};
use crate::tree::{self, Node, NodeId, NodeKind, Tree};
use crate::{IndexOptions, Opened};

/// Flatten a multi-layer container image: mount it as one read-only filesystem, or export it as
/// a single-layer image. No daemon, nothing extracted.
#[derive(Parser, Debug)]
#[command(
    name = "flatfs",
    version,
    about,
    long_about = None,
    after_help = "Exit status: 0 success, 1 error, 2 usage error (141 when the reader of stdout went away, 130 when interrupted)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// No progress bar or summary on stderr (errors are still printed).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Log what flatfs does to stderr (-vv for more; RUST_LOG works too).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Neither read nor write the cache of layer indexes and merged trees ($FLATFS_CACHE_DIR, else
    /// $XDG_CACHE_HOME/flatfs, else ~/.cache/flatfs).
    #[arg(long, global = true)]
    no_cache: bool,
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
        /// Keep the bottom N layers as they are (same blobs and digests) and squash only the
        /// layers above them into one [default: 0, squash everything].
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
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
        /// Do not push small files (up to 64 KiB) into the page cache as their directory is
        /// listed. The push makes `tar`, `cp -r` or `grep -r` over many small files several
        /// times faster, at the cost of decompressing them when only listed (`ls -l`).
        #[arg(long)]
        no_prefetch: bool,
        /// More mount options, comma-separated, e.g. noexec, noatime, allow_root, fsname=NAME,
        /// max_read=BYTES; `dev` and `suid` lift the defaults. `rw` is refused.
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
    },
    /// Show an image at a glance: config, one row per layer, and what flattening would save.
    ///
    /// Per layer: compressed and uncompressed size, entries, files added / changed / whited
    /// out, the bytes of lower layers it deletes or replaces (REMOVES: the waste flattening
    /// removes), and the history line that made it. `--json` prints the same as one JSON
    /// object (documented in docs/inspect-json.md).
    Inspect {
        /// The image (same forms as for export).
        image: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Platform to pick from a multi-platform image [default: this host's].
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<Platform>,
    },
    /// List the merged tree, like `ls` (or `tar tv` with -R).
    Ls {
        /// The image.
        image: String,
        /// A path in the image [default: /]; symlinks in it are followed inside the image.
        #[arg(default_value = "/")]
        path: String,
        /// Long format: mode, links, owner, size, mtime.
        #[arg(short, long)]
        long: bool,
        /// Everything below PATH, with full paths.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Add the layer each entry comes from (1 = bottom; `-` for a directory no layer has).
        #[arg(long)]
        layer: bool,
        /// Platform to pick from a multi-platform image [default: this host's].
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<Platform>,
        /// List the image as it was after its first N layers.
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
    },
    /// Print files of the merged image (symlinks are followed inside the image only).
    Cat {
        /// The image.
        image: String,
        /// Paths in the image.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Platform to pick from a multi-platform image [default: this host's].
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<Platform>,
    },
    /// What a layer changed: added (+), modified (~) and deleted (-) paths, with sizes.
    ///
    /// `flatfs diff IMAGE N` compares the image after layer N-1 with the image after layer N;
    /// `--from N --to M` compares after N layers with after M (0 = empty).
    Diff {
        /// The image.
        image: String,
        /// The layer (1 = bottom).
        #[arg(conflicts_with_all = ["from", "to"], required_unless_present_all = ["from", "to"])]
        layer: Option<usize>,
        /// Compare from the image after this many layers.
        #[arg(long, requires = "to")]
        from: Option<usize>,
        /// ... to the image after this many layers.
        #[arg(long, requires = "from")]
        to: Option<usize>,
        /// Platform to pick from a multi-platform image [default: this host's].
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<Platform>,
    },
    /// Manage the cache of layer indexes and merged trees.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Print a shell completion script (e.g. `flatfs completions bash > /etc/bash_completion.d/flatfs`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `flatfs man | man -l -`.
    Man,
    /// Unmount a flatfs mount, also one whose server has died.
    ///
    /// Runs `fusermount3 -u`; if that fails (the mount is busy, or its server died: "Transport
    /// endpoint is not connected"), detaches it lazily with `fusermount3 -u -z`, then `umount -l`.
    Umount {
        /// Where the image is mounted.
        mountpoint: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CacheAction {
    /// One line per cached layer index or merged tree: digest (or key), size, entries.
    Ls,
    /// Total size of the cache and where it is.
    Du,
    /// Delete every cached index and merged tree.
    Clear,
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
    init_logging(cli.verbose);
    let ui = Ui {
        quiet: cli.quiet,
        cache: if cli.no_cache {
            None
        } else {
            cache::default_dir().map(Cache::new)
        },
    };
    match cli.command {
        Command::Export {
            image,
            output,
            format,
            compression,
            tag,
            platform,
            keep,
        } => {
            export::catch_interrupts();
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
            // Compressed layers are kept decompressed beside the output while indexing, so
            // export reads file contents in place instead of decompressing every layer again.
            let spool_dir = match output.as_str() {
                "-" => std::env::temp_dir(),
                o => match Path::new(o).parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                },
            };
            if let Some(keep) = keep.filter(|&k| k > 0) {
                return export_keeping(
                    &ui,
                    &image,
                    platform.as_ref(),
                    keep,
                    &spool_dir,
                    &output,
                    &opts,
                );
            }
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
            if !ui.quiet {
                eprintln!(
                    "flatfs: flattened {} layers ({} entries) into {} ({})",
                    img.layers.len(),
                    report.entries,
                    if output == "-" { "stdout" } else { &output },
                    report.manifest_digest.as_deref().unwrap_or(&report.diff_id)
                );
            }
            Ok(())
        }
        Command::Mount {
            image,
            mountpoint,
            foreground,
            allow_other,
            platform,
            layers,
            no_prefetch,
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
            let Opened {
                image: img,
                tree,
                checkpoints,
            } = ui.open(&image, platform.as_ref(), layers, None)?;
            let mut fs = FlatFs::new(tree, Content::new(&img.layers, &checkpoints));
            fs.set_prefetch(!no_prefetch);
            // The blobs keep their files open. Dropping the image now removes a spooled stdin
            // from the temp dir, which the daemon, ending with exit(), never would.
            drop(img);
            target.serve(fs)?;
            Ok(())
        }
        Command::Inspect {
            image,
            json,
            platform,
        } => {
            let img = source::open(&image, platform.as_ref())?;
            let indexes = ui.index(&img, None, None)?;
            let report = inspect::inspect(&img, &indexes)?;
            let mut out = io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                inspect::write_text(&report, &mut out)?;
            }
            out.flush()?;
            Ok(())
        }
        Command::Ls {
            image,
            path,
            long,
            recursive,
            layer,
            platform,
            layers,
        } => {
            let tree = ui.open(&image, platform.as_ref(), layers, None)?.tree;
            let id = inspect::resolve_following(&tree, path.as_bytes())?;
            let mut out = io::BufWriter::new(io::stdout().lock());
            let show = |out: &mut dyn Write, name: &[u8], id: NodeId| -> io::Result<()> {
                let node = tree.node(id);
                if layer {
                    match node.layer {
                        0 => write!(out, "{:>3} ", "-")?,
                        n => write!(out, "{n:>3} ")?,
                    }
                }
                if long {
                    write!(
                        out,
                        "{} {:>3} {:>5} {:>5} {:>10} {} ",
                        mode_string(node),
                        node.nlink,
                        node.meta.uid,
                        node.meta.gid,
                        match node.kind {
                            NodeKind::Char(a, b) | NodeKind::Block(a, b) => format!("{a}, {b}"),
                            _ => node.size().to_string(),
                        },
                        short_time(node.meta.mtime)
                    )?;
                }
                out.write_all(if name.is_empty() { b"." } else { name })?;
                if long && let NodeKind::Symlink(t) = &node.kind {
                    out.write_all(b" -> ")?;
                    out.write_all(t)?;
                }
                out.write_all(b"\n")
            };
            if recursive {
                let mut err = None;
                let prefix = path.trim_matches('/').as_bytes().to_vec();
                subtree_walk(&tree, id, &prefix, &mut |p, child| {
                    if let Err(e) = show(&mut out, p, child) {
                        err = Some(e);
                    }
                });
                if let Some(e) = err {
                    return Err(e.into());
                }
            } else if tree.node(id).is_dir() {
                for (name, child) in tree.children(id) {
                    show(&mut out, name, child)?;
                }
            } else {
                show(&mut out, path.trim_matches('/').as_bytes(), id)?;
            }
            out.flush()?;
            Ok(())
        }
        Command::Cat {
            image,
            paths,
            platform,
        } => {
            let opened = ui.open(&image, platform.as_ref(), None, None)?;
            let content = opened.content();
            let mut out = io::stdout().lock();
            for p in paths {
                inspect::cat(&opened.tree, &content, p.as_bytes(), &mut out)?;
            }
            out.flush()?;
            Ok(())
        }
        Command::Diff {
            image,
            layer,
            from,
            to,
            platform,
        } => {
            let img = source::open(&image, platform.as_ref())?;
            let n = img.layers.len();
            let (from, to) = match (layer, from, to) {
                (Some(l), _, _) => (l.saturating_sub(1), l),
                (None, Some(f), Some(t)) => (f, t),
                _ => anyhow::bail!("give a layer N, or --from N --to M"),
            };
            if from > n || to > n || (layer.is_some() && to == 0) {
                anyhow::bail!("{image} has {n} layers: layers are numbered 1..={n} (0 = empty)");
            }
            let indexes = ui.index(&img, Some(from.max(to)), None)?;
            let tree_at = |k: usize| tree::merge(&indexes[..k]);
            let changes = inspect::diff(&tree_at(from)?, &tree_at(to)?)?;
            let mut out = io::BufWriter::new(io::stdout().lock());
            for c in changes {
                writeln!(out, "{} {:>10} {}", c.op, c.size, c.path)?;
            }
            out.flush()?;
            Ok(())
        }
        Command::Cache { action } => {
            let Some(cache) = ui.cache.as_ref() else {
                anyhow::bail!(
                    "no cache directory: --no-cache given, or no HOME, XDG_CACHE_HOME or FLATFS_CACHE_DIR"
                );
            };
            let entries = cache
                .list()
                .with_context(|| format!("reading {}", cache.dir().display()))?;
            match action {
                CacheAction::Ls => {
                    let mut out = io::stdout().lock();
                    for e in &entries {
                        let what = match e.kind {
                            CacheKind::LayerIndex => "entries",
                            CacheKind::MergedTree => "nodes (merged tree)",
                        };
                        let n = e
                            .entries
                            .map_or("unreadable".to_string(), |n| format!("{n} {what}"));
                        writeln!(out, "{}  {:>10}  {}", e.digest, inspect::human(e.size), n)?;
                    }
                }
                CacheAction::Du => {
                    let total: u64 = entries.iter().map(|e| e.size).sum();
                    let (indexes, trees) = count_kinds(&entries);
                    println!(
                        "{}\t{indexes} layer indexes, {trees} merged trees\t{}",
                        inspect::human(total),
                        cache.dir().display()
                    );
                }
                CacheAction::Clear => {
                    let freed = cache
                        .clear()
                        .with_context(|| format!("clearing {}", cache.dir().display()))?;
                    if !ui.quiet {
                        let (indexes, trees) = count_kinds(&entries);
                        eprintln!(
                            "flatfs: removed {indexes} layer indexes and {trees} merged trees ({})",
                            inspect::human(freed)
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "flatfs", &mut io::stdout());
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut io::stdout())?;
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

/// `export --keep N`: the bottom N layers as they are, the rest squashed into one layer.
fn export_keeping(
    ui: &Ui,
    image: &str,
    platform: Option<&Platform>,
    keep: usize,
    spool_dir: &Path,
    output: &str,
    opts: &export::Options,
) -> Result<()> {
    let img = source::open(image, platform)?;
    let (opened, base) = crate::open_keeping(img, keep, |img| {
        ui.index_with(img, None, Some(spool_dir), keep)
    })?;
    let (img, tree) = (opened.image, opened.tree);
    let started = Instant::now();
    let keep = export::Keep {
        layers: keep,
        base: &base,
    };
    let report = export::export_keeping(&img, &tree, keep, output, opts, &|_| {})
        .with_context(|| format!("exporting {image} to {output}"))?;
    log::info!("exported in {:.2?}", started.elapsed());
    if !ui.quiet {
        let stats = report.squash.unwrap_or_default();
        eprintln!(
            "flatfs: kept {} layers, squashed {} into one ({} changed, {} names, {} whiteouts, {} opaque) in {} ({})",
            keep.layers,
            img.layers.len() - keep.layers,
            stats.changed,
            stats.names,
            stats.whiteouts,
            stats.opaques,
            if output == "-" { "stdout" } else { output },
            report.manifest_digest.as_deref().unwrap_or(&report.diff_id)
        );
    }
    Ok(())
}

/// How many layer indexes and merged trees.
fn count_kinds(entries: &[cache::CacheEntry]) -> (usize, usize) {
    let indexes = entries
        .iter()
        .filter(|e| e.kind == CacheKind::LayerIndex)
        .count();
    (indexes, entries.len() - indexes)
}

/// What every command shares: quietness, the cache, the progress bar.
struct Ui {
    quiet: bool,
    cache: Option<Cache>,
}

impl Ui {
    /// A progress bar on stderr, only when stderr is a terminal and not `--quiet`.
    fn bar(&self, total: u64, what: &str) -> Option<ProgressBar> {
        if self.quiet || !io::stderr().is_terminal() || total == 0 {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .map(|s| s.progress_chars("=> "));
        if let Ok(style) = style {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        Some(bar)
    }

    fn index(
        &self,
        img: &Image,
        layers: Option<usize>,
        spool_dir: Option<&Path>,
    ) -> Result<Vec<LayerIndex>> {
        self.index_with(img, layers, spool_dir, 0)
    }

    /// [`Ui::index`], leaving the first `unspooled` layers without a spooled copy.
    fn index_with(
        &self,
        img: &Image,
        layers: Option<usize>,
        spool_dir: Option<&Path>,
        unspooled: usize,
    ) -> Result<Vec<LayerIndex>> {
        let limit = layers.unwrap_or(img.layers.len()).min(img.layers.len());
        let total = img.layers[..limit].iter().map(|l| l.blob.len()).sum();
        let bar = self.bar(total, "indexing");
        let started = Instant::now();
        let progress = |n: u64| {
            if let Some(b) = &bar {
                b.inc(n);
            }
        };
        let indexes = crate::index_layers(
            img,
            &IndexOptions {
                layers,
                spool_dir,
                cache: self.cache.as_ref(),
                progress: Some(&progress),
                unspooled,
            },
        )?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        log::info!(
            "indexed {} layers in {:.2?}",
            indexes.len(),
            started.elapsed()
        );
        Ok(indexes)
    }

    fn open(
        &self,
        spec: &str,
        platform: Option<&Platform>,
        layers: Option<usize>,
        spool_dir: Option<&Path>,
    ) -> Result<Opened> {
        let img = source::open(spec, platform)?;
        crate::check_layer_count(&img, layers)?;
        let opts = IndexOptions {
            layers,
            spool_dir,
            cache: self.cache.as_ref(),
            progress: None,
            unspooled: 0,
        };
        crate::open_tree(img, &opts, |img| self.index(img, layers, spool_dir))
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "flatfs=info,warn",
        _ => "debug",
    };
    let env = env_logger::Env::default().default_filter_or(default);
    // Logging is best effort: a second init (tests) is not an error worth reporting.
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp(None)
        .try_init();
}

/// `drwxr-xr-x`, as `ls -l` writes it.
fn mode_string(node: Node) -> String {
    let t = match node.kind {
        NodeKind::Dir(_) => 'd',
        NodeKind::File(_) => '-',
        NodeKind::Symlink(_) => 'l',
        NodeKind::Char(..) => 'c',
        NodeKind::Block(..) => 'b',
        NodeKind::Fifo => 'p',
    };
    let m = node.meta.mode;
    let bit = |mask: u32, c: char| if m & mask != 0 { c } else { '-' };
    let special = |x: u32, s: u32, lower: char, upper: char| match (m & x != 0, m & s != 0) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => 'x',
        (false, false) => '-',
    };
    format!(
        "{t}{}{}{}{}{}{}{}{}{}",
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        special(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        special(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        special(0o001, 0o1000, 't', 'T'),
    )
}

/// `YYYY-MM-DD HH:MM` (UTC).
fn short_time(secs: i64) -> String {
    let t = export::rfc3339(secs);
    format!("{} {}", &t[..10], &t[11..16])
}

/// Visits `id` and everything below it, with paths relative to the image root.
fn subtree_walk(tree: &Tree, id: NodeId, prefix: &[u8], visit: &mut dyn FnMut(&[u8], NodeId)) {
    let mut stack = vec![(prefix.to_vec(), id)];
    while let Some((path, id)) = stack.pop() {
        visit(&path, id);
        for (name, child) in tree.children(id).iter().rev() {
            let mut p = path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            stack.push((p, child));
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
