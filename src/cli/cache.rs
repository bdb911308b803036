//! `flatfs cache`: list, size and clear the cache of layer indexes, merged trees, pulled blobs
//! and decompressed layers.

use std::io::{self, Write};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::cache::{Cache, CacheEntry, CacheKind};
use crate::inspect;

/// Manage the cache: layer indexes, merged trees, pulled blobs and decompressed layers.
#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    action: CacheAction,
    /// No summary on stderr after `clear`.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum CacheAction {
    /// One line per cached layer index, merged tree, pulled blob or decompressed layer: digest
    /// (or key; a decompressed layer's diff_id), size, entries.
    Ls,
    /// Total size of the cache and where it is.
    Du,
    /// Delete every cached index, merged tree, pulled blob and decompressed layer.
    Clear,
}

/// Runs `flatfs cache`.
pub fn run(quiet: bool, args: CacheArgs) -> Result<()> {
    let quiet = quiet || args.quiet;
    let Some(cache) = crate::cache::default_dir().map(Cache::new) else {
        anyhow::bail!("no cache directory: no HOME, XDG_CACHE_HOME or FLATFS_CACHE_DIR");
    };
    let entries = cache
        .list()
        .with_context(|| format!("reading {}", cache.dir().display()))?;
    match args.action {
        CacheAction::Ls => {
            let mut out = io::stdout().lock();
            for e in &entries {
                let what = match e.kind {
                    CacheKind::LayerIndex => "entries",
                    CacheKind::Checkpoints => "",
                    CacheKind::MergedTree => "nodes (merged tree)",
                    CacheKind::Blob | CacheKind::PartialBlob | CacheKind::Content => "",
                };
                let n = match (e.kind, e.entries) {
                    (CacheKind::Blob, _) => "blob (pulled)".to_string(),
                    (CacheKind::PartialBlob, _) => {
                        "blob (partial: spans a lazy mount read)".to_string()
                    }
                    (CacheKind::Content, _) => "decompressed layer".to_string(),
                    (CacheKind::Checkpoints, _) => {
                        "gzip checkpoint windows (of the layer index)".to_string()
                    }
                    (_, Some(n)) => format!("{n} {what}"),
                    (_, None) => "unreadable".to_string(),
                };
                writeln!(out, "{}  {:>10}  {}", e.digest, inspect::human(e.size), n)?;
            }
        }
        CacheAction::Du => {
            let total: u64 = entries.iter().map(|e| e.size).sum();
            let (indexes, trees, blobs, layers) = count_kinds(&entries);
            let mut out = io::stdout().lock();
            writeln!(
                out,
                "{}\t{indexes} layer indexes, {trees} merged trees, {blobs} blobs, {layers} \
                 decompressed layers\t{}",
                inspect::human(total),
                cache.dir().display()
            )?;
            out.flush()?;
        }
        CacheAction::Clear => {
            let freed = cache
                .clear()
                .with_context(|| format!("clearing {}", cache.dir().display()))?;
            if !quiet {
                let (indexes, trees, blobs, layers) = count_kinds(&entries);
                eprintln!(
                    "flatfs: removed {indexes} layer indexes, {trees} merged trees, {blobs} \
                     blobs and {layers} decompressed layers ({})",
                    inspect::human(freed)
                );
            }
        }
    }
    Ok(())
}

/// How many layer indexes, merged trees, blobs and decompressed layers.
fn count_kinds(entries: &[CacheEntry]) -> (usize, usize, usize, usize) {
    let count = |k| entries.iter().filter(|e| e.kind == k).count();
    (
        count(CacheKind::LayerIndex),
        count(CacheKind::MergedTree),
        count(CacheKind::Blob) + count(CacheKind::PartialBlob),
        count(CacheKind::Content),
    )
}
