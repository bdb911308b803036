//! `flatfs diff`: what one layer (or a range of layers) changed in the merged tree.

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;

use super::ui::Ui;
use crate::inspect;
use crate::source::Platform;
use crate::tree;

/// What a layer changed: added (+), modified (~) and deleted (-) paths, with sizes.
///
/// `flatfs diff IMAGE N` compares the image after layer N-1 with the image after layer N;
/// `--from N --to M` compares after N layers with after M (0 = empty).
#[derive(Args, Debug)]
pub struct DiffArgs {
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
}

/// Runs `flatfs diff`.
pub fn run(args: DiffArgs, ui: &Ui) -> Result<()> {
    let DiffArgs {
        image,
        layer,
        from,
        to,
        platform,
    } = args;
    let img = ui.open_image(&image, platform.as_ref())?;
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
