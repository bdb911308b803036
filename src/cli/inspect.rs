//! `flatfs inspect`: an image's config and per-layer table, as text or JSON.

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;

use super::ui::{Ui, UiArgs};
use crate::inspect;
use crate::source::{self, Platform};

/// Show an image at a glance: config, one row per layer, and what flattening would save.
///
/// Per layer: compressed and uncompressed size, entries, files added / changed / whited
/// out, the bytes of lower layers it deletes or replaces (REMOVES: the waste flattening
/// removes), and the history line that made it. `--json` prints the same as one JSON
/// object, whose fields keep their names and meaning from one version to the next.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The image (same forms as for export).
    image: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Platform to pick from a multi-platform image [default: this host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<Platform>,
    #[command(flatten)]
    pub ui: UiArgs,
}

/// Runs `flatfs inspect`.
pub fn run(ui: &Ui, args: InspectArgs) -> Result<()> {
    let img = source::open(&args.image, args.platform.as_ref())?;
    let indexes = ui.index(&img, None, None)?;
    let report = inspect::inspect(&img, &indexes)?;
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        inspect::write_text(&report, &mut out)?;
    }
    out.flush()?;
    Ok(())
}
