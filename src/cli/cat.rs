//! `flatfs cat`: files of the merged tree to stdout.

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;

use super::ui::{Ui, UiArgs};
use crate::Error;
use crate::inspect;
use crate::source::Platform;

/// Print files of the merged image (symlinks are followed inside the image only).
#[derive(Args, Debug)]
pub struct CatArgs {
    /// The image.
    image: String,
    /// Paths in the image.
    #[arg(required = true)]
    paths: Vec<String>,
    /// Platform to pick from a multi-platform image [default: this host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<Platform>,
    #[command(flatten)]
    pub ui: UiArgs,
}

/// Runs `flatfs cat`.
pub fn run(ui: &Ui, args: CatArgs) -> Result<()> {
    let opened = ui.open(&args.image, args.platform.as_ref(), None, None)?;
    let content = opened.content();
    let mut out = io::stdout().lock();
    let mut failed = false;
    for p in args.paths {
        match inspect::cat(&opened.tree, &content, p.as_bytes(), &mut out) {
            Ok(()) => {}
            // Writing failed (a closed pipe, a full disk): no later path can do better.
            Err(Error::Io { path, source }) if path == "stdout" => {
                return Err(Error::Io { path, source }.into());
            }
            // As GNU cat: say what is wrong with this path, go on with the next.
            Err(e) => {
                out.flush()?;
                eprintln!("flatfs: {e}");
                failed = true;
            }
        }
    }
    out.flush()?;
    if failed {
        return Err(super::Reported.into());
    }
    Ok(())
}
