//! Command line, shared by every command: quietness, the cache, the progress bar, logging, and
//! opening and indexing an image with them.

use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cache::Cache;
use crate::layer::LayerIndex;
use crate::source::{self, Image, Platform};
use crate::{IndexOptions, Opened};

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
    /// A progress bar on stderr, only when stderr is a terminal and not `--quiet`.
    pub fn bar(&self, total: u64, what: &str) -> Option<ProgressBar> {
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

    /// Indexes the image's first `layers` layers (all if `None`), with a progress bar.
    pub fn index(
        &self,
        img: &Image,
        layers: Option<usize>,
        spool_dir: Option<&Path>,
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
        };
        crate::open_tree(img, &opts, |img| self.index(img, layers, spool_dir))
    }
}

/// Logs to stderr: warnings by default, more with each `-v`; `RUST_LOG` overrides.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
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
