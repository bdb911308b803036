//! `flatfs stats`: what a running mount's reads have cost, from the stats file its serving
//! process keeps (`stats.rs`).

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::Value;

use crate::inspect::human;

/// Show what a mount has read: per layer, for a lazy registry mount, the bytes fetched, range
/// requests, reads served locally and time spent waiting for the network; for any mount, the
/// bytes read and decompressed.
///
/// The serving process keeps the numbers current (within a quarter of a second) while the
/// mount is up. LOCAL is how much of a layer is on this host, FETCHED what this mount
/// downloaded (of it, pre: fetched before any read asked for it, by `--prefetch` or by the
/// read-ahead of a reader going through a layer in order), HITS the reads served with no wait
/// for the network, BLOCKED the time reads waited for it.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  flatfs stats /mnt/app\n  flatfs stats --json /mnt/app | jq '.layers[].fetched_bytes'"
)]
pub struct StatsArgs {
    /// Where the image is mounted.
    mountpoint: PathBuf,
    /// Print the stats file as it is (JSON).
    #[arg(long)]
    json: bool,
}

/// Runs `flatfs stats`.
pub fn run(args: StatsArgs) -> Result<()> {
    let v = crate::stats::read(&args.mountpoint).map_err(anyhow::Error::msg)?;
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    writeln!(
        out,
        "{} (pid {}): {}{}",
        v["mountpoint"].as_str().unwrap_or("?"),
        n(&v, "pid"),
        v["image"].as_str().unwrap_or("?"),
        match v["prefetch"].as_str() {
            Some(p @ ("all" | "landmark")) => format!(", --prefetch {p}"),
            _ => String::new(),
        }
    )?;
    let layers = v["layers"].as_array().cloned().unwrap_or_default();
    if layers.iter().any(|l| l["lazy"] == true) {
        writeln!(
            out,
            "{:>5}  {:>10}  {:>10}  {:>8}  {:>10}  {:>8}  {:>8}  {:>9}",
            "LAYER", "LOCAL", "SIZE", "FETCHED", "", "REQUESTS", "HITS", "BLOCKED"
        )?;
    }
    for l in &layers {
        if l["lazy"] == true {
            writeln!(
                out,
                "{:>5}  {:>10}  {:>10}  {:>8}  {:>10}  {:>8}  {:>8}  {:>7}ms{}",
                n(l, "layer"),
                human(n(l, "local_bytes")),
                human(n(l, "blob_bytes")),
                human(n(l, "fetched_bytes")),
                format!("({} pre)", human(n(l, "prefetched_bytes"))),
                n(l, "requests"),
                format!(
                    "{}/{}",
                    n(l, "span_hits"),
                    n(l, "span_hits").saturating_add(n(l, "span_misses"))
                ),
                n(l, "blocked_ms"),
                if l["complete"] == true {
                    "  complete"
                } else {
                    ""
                }
            )?;
        } else {
            writeln!(
                out,
                "{:>5}  {:>10}  (local)",
                n(l, "layer"),
                human(n(l, "blob_bytes"))
            )?;
        }
    }
    let c = &v["content"];
    writeln!(
        out,
        "read {} of files; decompressed {} in {} blocks; {} block-cache hits",
        human(n(c, "read_bytes")),
        human(n(c, "decompressed_bytes")),
        n(c, "blocks_decompressed"),
        n(c, "block_hits")
    )?;
    out.flush()?;
    Ok(())
}
