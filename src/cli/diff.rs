//! `flatfs diff`: what one layer (or a range of layers) changed in the merged tree.

use std::io::{self, Write};

use anyhow::Result;
use clap::{ArgGroup, Args};

use super::ui::{Ui, UiArgs};
use crate::inspect;
use crate::source::Platform;
use crate::tree;

/// What a layer changed: added (+), modified (~) and deleted (-) paths, with sizes.
///
/// `flatfs diff IMAGE N` compares the image after layer N-1 with the image after layer N;
/// `--from N --to M` compares after N layers with after M (0 = empty).
#[derive(Args, Debug)]
#[command(
    group(ArgGroup::new("which").args(["layer", "from"]).required(true)),
    override_usage = "flatfs diff [OPTIONS] <IMAGE> <LAYER>\n       flatfs diff [OPTIONS] <IMAGE> --from <N> --to <M>"
)]
pub struct DiffArgs {
    /// The image.
    image: String,
    /// The layer (1 = bottom); required unless --from and --to are given.
    #[arg(conflicts_with_all = ["from", "to"], value_parser = layer_number)]
    layer: Option<usize>,
    /// Compare from the image after this many layers (0 = empty).
    #[arg(long, value_name = "N", requires = "to")]
    from: Option<usize>,
    /// ... to the image after this many layers.
    #[arg(long, value_name = "M", requires = "from")]
    to: Option<usize>,
    /// Platform to pick from a multi-platform image [default: this host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<Platform>,
    #[command(flatten)]
    pub ui: UiArgs,
}

/// A layer number: 1 or more (`--from 0` is the way to the empty image).
fn layer_number(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err(
            "layers are numbered from 1, the bottom layer (compare with the empty \
                      image with --from 0 --to M)"
                .to_string(),
        ),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `flatfs diff`.
pub fn run(ui: &Ui, args: DiffArgs) -> Result<()> {
    let DiffArgs {
        image,
        layer,
        from,
        to,
        platform,
        ..
    } = args;
    let img = ui.open_image(&image, platform.as_ref())?;
    let n = img.layers.len();
    let count = match n {
        1 => "1 layer".to_string(),
        n => format!("{n} layers"),
    };
    let (from, to) = match (layer, from, to) {
        (Some(l), _, _) if l > n => anyhow::bail!("{image} has {count}: there is no layer {l}"),
        (Some(l), _, _) => (l - 1, l),
        (None, Some(f), Some(t)) if f.max(t) > n => {
            anyhow::bail!("{image} has {count}: --from and --to go from 0 (the empty image) to {n}")
        }
        (None, Some(f), Some(t)) => (f, t),
        _ => unreachable!("clap requires LAYER, or --from with --to"),
    };
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
