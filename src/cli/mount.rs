//! `flatfs mount` and `flatfs umount`: the merged tree served over FUSE, and taken down.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::ui::{Ui, UiArgs};
use crate::content::Content;
use crate::fs::FlatFs;
use crate::source::Platform;
use crate::{Error, Opened};
use crate::{mount, stats};

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
/// A registry image (`docker://REF`) is mounted lazily: the mount is up once every layer's
/// index is known (from the cache, from an index artifact pushed with `flatfs index push`,
/// else from one pass over the layer), and file bytes are then fetched by range requests as
/// they are read, each 256 KiB span checked against the index before use and kept in the
/// cache for the next mount. `flatfs stats MOUNTPOINT` shows what it fetched.
///
/// To unmount: `flatfs umount MOUNTPOINT` (or `fusermount3 -u MOUNTPOINT`), or send the
/// serving process SIGINT or SIGTERM (Ctrl-C with -f).
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  flatfs mount app.docker.tar /mnt/app\n  ls -la /mnt/app/etc; getfattr -d -m- /mnt/app/usr/bin/ping\n  flatfs umount /mnt/app\n  flatfs mount -f --layers 2 image.oci.tar /mnt/x    # as after 2 layers; Ctrl-C unmounts\n  flatfs mount -o noexec,fsname=app app.oci.tar /mnt/app"
)]
pub struct MountArgs {
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
    #[arg(long, value_name = "N", value_parser = super::ls::layer_count)]
    layers: Option<usize>,
    /// Do not push small files (up to 64 KiB) into the page cache as their directory is
    /// listed. The push makes `tar`, `cp -r` or `grep -r` over many small files several
    /// times faster, at the cost of decompressing them when only listed (`ls -l`). Always off
    /// on a lazy registry mount, where it would fetch them. (Unrelated to `--prefetch`.)
    #[arg(long)]
    no_prefetch: bool,
    /// On a lazy registry mount, what to download in the background besides what is read:
    /// `landmark` (the default) fetches the files an eStargz layer's author put before its
    /// `.prefetch.landmark` (those the image is expected to read first; a layer with
    /// `.no.prefetch.landmark` or no landmark has none), kept in the cache dir for the reads
    /// of this mount and the next; `all` does that, then fetches the rest of every layer, in
    /// layer order, until the mount is fully local; `none` fetches only what is read (and, for
    /// a reader going through a layer in order, the next few MiB ahead of it). Either prefetch
    /// goes one request at a time, giving way to reads that wait, and every byte is checked as
    /// a read's would be. Watch it with `flatfs stats MOUNTPOINT`.
    #[arg(long, value_name = "WHAT", value_parser = ["all", "landmark", "none"], default_value = "landmark")]
    prefetch: String,
    /// On a lazy registry mount, do not use index artifacts from the registry (`flatfs index
    /// push`): a layer whose index is not cached is read once to build it. For a repository
    /// whose pushers you do not trust to describe its layers.
    #[arg(long)]
    no_index_artifact: bool,
    /// More mount options, comma-separated, e.g. noexec, noatime, allow_root, fsname=NAME,
    /// max_read=BYTES; `dev` and `suid` lift the defaults; `nonempty` mounts over a directory
    /// that is not empty (refused otherwise, as its contents would be hidden). `rw` is refused.
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    #[command(flatten)]
    pub ui: UiArgs,
}

/// Runs `flatfs mount`.
pub fn run(ui: &Ui, args: MountArgs) -> Result<()> {
    let MountArgs {
        image,
        mountpoint,
        foreground,
        allow_other,
        platform,
        layers,
        no_prefetch,
        prefetch,
        no_index_artifact,
        options,
        ..
    } = args;
    let fetch_all = prefetch == "all";
    let opts = mount::Options {
        foreground,
        allow_other,
        options,
    };
    // The cheap checks first: a mistyped mountpoint should not wait for a big image to
    // be indexed. Image errors still come before the fork, so both reach the terminal.
    let target = mount::Mountpoint::check(&mountpoint, &image, &opts)?;
    // Only a mount reads a registry image's layers by ranges: other commands read every byte.
    let ui = &Ui {
        quiet: ui.quiet,
        cache: ui.cache.clone(),
        registry: crate::registry::Options {
            lazy: true,
            no_index_artifact,
            ..ui.registry.clone()
        },
    };
    let Opened {
        image: img,
        tree,
        checkpoints,
    } = ui.open(&image, platform.as_ref(), layers, None)?;
    let content = Content::new(&img.layers, &checkpoints)
        .with_disk_cache(&img.layers, ui.cache.as_ref().map(|c| c.dir()));
    let mut fs = FlatFs::new(tree, content);
    // Checkpoints from the cache are read when first used: once the mount is live, read them
    // in the background, so that a first read does not wait for its layer's. Side by side:
    // on a lazy mount some come from the registry (an index artifact's checkpoints blobs).
    let warm: Vec<_> = checkpoints.iter().flatten().cloned().collect();
    // On a lazy mount those are an index artifact's checkpoints blobs (megabytes) when this
    // host has not got them yet: fetched only once the mount has been up a moment, so that a
    // mount that is only glanced at (or a script's mount, read, unmount) does not pay for
    // them; a read meanwhile fetches the one window it needs.
    let warm_after = if img.layers.iter().any(|l| l.blob.is_lazy()) {
        std::time::Duration::from_secs(2)
    } else {
        std::time::Duration::ZERO
    };
    let load = move || {
        std::thread::sleep(warm_after);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..warm.len().min(4) {
                s.spawn(|| {
                    while let Some(c) =
                        warm.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        c.points();
                    }
                });
            }
        });
    };
    // On a lazy registry mount a push would fetch every listed small file from the network:
    // there, only what is read is fetched.
    let lazy = img.layers.iter().any(|l| l.blob.is_lazy());
    if lazy && !no_prefetch {
        log::info!("lazy registry mount: small files are not pushed into the page cache");
    }
    fs.set_prefetch(!no_prefetch && !lazy);
    let lazies: Vec<_> = img
        .layers
        .iter()
        .filter_map(|l| l.blob.lazy_handle().cloned())
        .collect();
    // TOC layers (eStargz, zstd:chunked) whose chunks are not all local yet.
    let tocs: Vec<_> = img
        .layers
        .iter()
        .filter_map(|l| l.blob.toc().cloned())
        .filter(|t| fetch_all && !t.all_stored())
        .collect();
    if fetch_all && lazies.is_empty() && tocs.is_empty() {
        // Not an error (a script may pass it for every image), but not silent either: the
        // user asked for something that will not happen.
        let why = if img.name.starts_with("docker://") {
            "every layer is already in the cache"
        } else {
            "a local image is read in place"
        };
        eprintln!("flatfs: warning: --prefetch all: {why}; nothing to prefetch");
    }
    // eStargz layers with a prefetch landmark: their first files, unless told not to.
    let landmarks: Vec<_> = img
        .layers
        .iter()
        .filter_map(|l| l.blob.toc().cloned())
        .filter(|t| prefetch != "none" && t.landmark_bytes() > 0)
        .collect();
    let lazies = if fetch_all { lazies } else { Vec::new() };
    if !landmarks.is_empty() || !lazies.is_empty() || !tocs.is_empty() {
        fs.on_start(Box::new(move || prefetch_all(landmarks, tocs, lazies)));
    }
    // Stats for `flatfs stats`, keyed by the mountpoint's canonical path.
    match std::fs::canonicalize(&mountpoint) {
        Ok(canon) => {
            let reporter = stats::Reporter::new(fs.content(), canon, &image, &prefetch);
            let file = std::sync::Arc::new(std::sync::Mutex::new(None));
            let keep = file.clone();
            fs.on_start(Box::new(move || match reporter.start() {
                Ok(f) => *keep.lock().unwrap_or_else(|e| e.into_inner()) = Some(f),
                Err(e) => log::warn!("cannot keep mount stats: {e}"),
            }));
            fs.on_stop(Box::new(move || {
                file.lock().unwrap_or_else(|e| e.into_inner()).take();
            }));
        }
        Err(e) => log::warn!("{}: {e}; no stats for this mount", mountpoint.display()),
    }
    // The blobs keep their files open. Dropping the image now removes a spooled stdin
    // from the temp dir, which the daemon, ending with exit(), never would.
    drop(img);
    target.serve_then(fs, load)?;
    Ok(())
}

/// On a thread of its own: the files before each eStargz layer's prefetch landmark, then
/// (`--prefetch all`) the rest of every TOC layer and every lazy layer, in layer order.
fn prefetch_all(
    landmarks: Vec<std::sync::Arc<crate::toc::Toc>>,
    tocs: Vec<std::sync::Arc<crate::toc::Toc>>,
    lazies: Vec<std::sync::Arc<crate::blob::Lazy>>,
) {
    let spawned = std::thread::Builder::new()
        .name("flatfs-fetch-all".into())
        .spawn(move || {
            for t in &landmarks {
                t.prefetch_landmark();
            }
            for t in &tocs {
                t.prefetch_all();
            }
            if lazies.is_empty() {
                return;
            }
            let start = std::time::Instant::now();
            for l in &lazies {
                l.prefetch_all();
            }
            let fetched: u64 = lazies.iter().map(|l| l.stats().0).sum();
            log::info!(
                "prefetch: {} lazy layers local after {:.1?} ({fetched} bytes fetched by this \
                 mount)",
                lazies.len(),
                start.elapsed()
            );
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the prefetch: {e}");
    }
}

/// Unmount a flatfs mount, also one whose server has died.
///
/// Runs `fusermount3 -u`; if that fails (the mount is busy, or its server died: "Transport
/// endpoint is not connected"), detaches it lazily with `fusermount3 -u -z`, then `umount -l`.
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// Where the image is mounted.
    mountpoint: PathBuf,
}

/// Runs `flatfs umount`.
pub fn umount(args: UmountArgs) -> Result<()> {
    let mountpoint = args.mountpoint;
    let how = mount::umount(&mountpoint).map_err(|e| match e {
        // The library's mount errors say "mount DIR"; this is the other way round.
        Error::Mount { mountpoint, msg } => anyhow::anyhow!("umount {mountpoint}: {msg}"),
        e => e.into(),
    })?;
    if how == mount::Unmounted::Lazily {
        eprintln!(
            "flatfs: {} was busy or its server gone; detached it lazily (it goes away \
             when the last file open in it is closed)",
            mountpoint.display()
        );
    }
    Ok(())
}
