//! Command line, shared by every command: quietness, the cache, the progress bar, logging, and
//! opening and indexing an image with them.

use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cache::Cache;
use crate::layer::LayerIndex;
use crate::source::{self, Image, Platform};
use crate::{IndexOptions, Opened};

/// `-q` and `-v`, for the commands that have something to be quiet or verbose about.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct LogArgs {
    /// No progress bar or summary on stderr (errors are still printed).
    #[arg(short, long)]
    pub quiet: bool,
    /// Log what flatfs does to stderr (-vv for more; RUST_LOG works too).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The options of every command that reads an image. They are also taken before the command
/// name (`flatfs -q export …`), where every command accepts them.
#[derive(Args, Debug, Clone, Default)]
pub struct UiArgs {
    #[command(flatten)]
    pub log: LogArgs,
    /// Neither read nor write the cache: layer indexes, merged trees, pulled blobs, decompressed
    /// layers ($FLATFS_CACHE_DIR, else $XDG_CACHE_HOME/flatfs, else ~/.cache/flatfs).
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How to reach registries, for `docker://` images; skopeo's names and meanings.
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Registry credentials from this auth file only [default: $REGISTRY_AUTH_FILE, else
    /// $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json,
    /// ~/.docker/config.json].
    #[arg(long, value_name = "PATH")]
    pub authfile: Option<std::path::PathBuf>,
    /// Registry credentials from a file holding USER:PASSWORD, or `-` to read that line from
    /// standard input (never on the command line, where `ps` shows it).
    #[arg(long, value_name = "PATH")]
    pub creds_file: Option<std::path::PathBuf>,
    /// CA certificates (*.crt) and a client certificate (*.cert, *.key) for the registry
    /// [default: /etc/containers/certs.d/HOST:PORT].
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<std::path::PathBuf>,
    /// Require HTTPS and a valid certificate [default: true]; `--tls-verify=false` also
    /// allows plain HTTP.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub tls_verify: Option<bool>,
}

impl UiArgs {
    /// Starts logging and builds the [`Ui`] for these options and those given before the
    /// command name (`top`).
    pub fn start(&self, top: &UiArgs) -> Ui {
        let quiet = self.log.quiet || top.log.quiet;
        init_logging(self.log.verbose.saturating_add(top.log.verbose));
        let cache = if self.no_cache || top.no_cache {
            None
        } else {
            crate::cache::default_dir().and_then(usable_cache)
        };
        let (here, there) = (self.registry.clone(), top.registry.clone());
        let registry = crate::registry::Options {
            authfile: here.authfile.or(there.authfile),
            creds_file: here.creds_file.or(there.creds_file),
            cert_dir: here.cert_dir.or(there.cert_dir),
            insecure: !here.tls_verify.or(there.tls_verify).unwrap_or(true),
            cache_dir: cache.as_ref().map(|c| c.dir().to_path_buf()),
            lazy: false,
            no_index_artifact: false,
        };
        Ui {
            quiet,
            cache,
            registry,
        }
    }
}

/// The cache in `dir`, if the directory is there or can be made: one warning when it cannot,
/// rather than one per layer and merged tree that could not be saved.
fn usable_cache(dir: std::path::PathBuf) -> Option<Cache> {
    match std::fs::create_dir_all(&dir) {
        Ok(()) => Some(Cache::new(dir)),
        Err(e) => {
            log::warn!(
                "cannot create the cache directory {}: {e}; going on without a cache (set \
                 FLATFS_CACHE_DIR, or --no-cache)",
                dir.display()
            );
            None
        }
    }
}

/// What every command shares: quietness, the cache, the progress bar.
pub struct Ui {
    /// No progress bar or summary on stderr.
    pub quiet: bool,
    /// Where layer indexes and merged trees are kept, unless `--no-cache`.
    pub cache: Option<Cache>,
    /// How to reach registries (`docker://` images).
    pub registry: crate::registry::Options,
}

impl Ui {
    /// A progress bar on stderr, only when stderr is a terminal, not `--quiet`, and the job is
    /// big enough to watch (at least 1 MiB). It fills the terminal's width and no more: a line
    /// that wraps is redrawn as a new line at every tick.
    pub fn bar(&self, total: u64, what: &str) -> Option<ProgressBar> {
        const TINY: u64 = 1 << 20;
        if self.quiet || !io::stderr().is_terminal() || total < TINY {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        // `wide_bar` takes what the rest leaves of the width indicatif reads from the terminal;
        // below ~60 columns the rest alone would wrap, so the bar goes.
        let template = if terminal_width().is_some_and(|w| w < 60) {
            "{msg} {bytes}/{total_bytes} ETA {eta}"
        } else {
            "{msg:>9} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        Some(bar)
    }

    /// Indexes the image's first `layers` layers (all if `None`), with a progress bar.
    pub fn index(
        &self,
        img: &Image,
        layers: Option<usize>,
        spool_dir: Option<&Path>,
    ) -> Result<Vec<LayerIndex>> {
        self.index_with(img, layers, spool_dir, 0)
    }

    /// [`Ui::index`], leaving the first `unspooled` layers without a spooled copy
    /// (`export --keep`: those are copied as they are).
    pub fn index_with(
        &self,
        img: &Image,
        layers: Option<usize>,
        spool_dir: Option<&Path>,
        unspooled: usize,
    ) -> Result<Vec<LayerIndex>> {
        let limit = layers.unwrap_or(img.layers.len()).min(img.layers.len());
        let total = img.layers[..limit].iter().map(|l| l.blob.len()).sum();
        // A registry image's layers are indexed as they download: the bar is the pull's.
        let what = if img.name.starts_with("docker://") {
            "pulling"
        } else {
            "indexing"
        };
        let bar = self.bar(total, what);
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

    /// Opens `spec` (pulling it first if it is in a registry).
    pub fn open_image(&self, spec: &str, platform: Option<&Platform>) -> Result<Image> {
        Ok(source::open_with(spec, platform, &self.registry)?)
    }

    /// Opens `spec` and builds its merged tree (from the cache when it can).
    pub fn open(
        &self,
        spec: &str,
        platform: Option<&Platform>,
        layers: Option<usize>,
        spool_dir: Option<&Path>,
    ) -> Result<Opened> {
        let img = self.open_image(spec, platform)?;
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

/// The width of the terminal on stderr, if it is one that says.
fn terminal_width() -> Option<u16> {
    // SAFETY: TIOCGWINSZ writes a winsize into the struct passed, and nothing else.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0).then_some(ws.ws_col)
}

/// Logs to stderr: warnings by default, more with each `-v`; `RUST_LOG` overrides.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        // fuser warns that it could not unmount what `flatfs umount` already had: not news.
        0 => "warn,fuser=error",
        1 => "flatfs=info,warn",
        _ => "debug",
    };
    let env = env_logger::Env::default().default_filter_or(default);
    let mut builder = env_logger::Builder::from_env(env);
    builder.format_timestamp(None);
    if verbose == 0 && std::env::var_os("RUST_LOG").is_none() {
        // Only warnings reach a user who asked for no log: say them like the errors are said.
        builder.format(|out, record| {
            writeln!(
                out,
                "flatfs: {}: {}",
                match record.level() {
                    log::Level::Warn => "warning".to_string(),
                    l => l.as_str().to_lowercase(),
                },
                record.args()
            )
        });
    }
    // Logging is best effort: a second init (tests) is not an error worth reporting.
    let _ = builder.try_init();
}
