//! Command line: the clap definition of `flatfs` and the dispatch to one module per command.
//! Each command's arguments sit beside its handler; `anyhow` lives in `cli/` and main only.

mod cache;
mod cat;
mod diff;
mod export;
mod export_all;
mod index;
mod inspect;
mod ls;
mod misc;
mod mount;
mod stats;
mod ui;

use anyhow::Result;
use clap::{Parser, Subcommand};

use ui::UiArgs;

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
    #[command(flatten)]
    top: UiArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    Export(export::ExportArgs),
    Mount(mount::MountArgs),
    Inspect(inspect::InspectArgs),
    Ls(ls::LsArgs),
    Cat(cat::CatArgs),
    Diff(diff::DiffArgs),
    Cache(cache::CacheArgs),
    Index(index::IndexArgs),
    Stats(stats::StatsArgs),
    Completions(misc::CompletionsArgs),
    Man(misc::ManArgs),
    Umount(mount::UmountArgs),
}

/// A failure already told on stderr (e.g. `cat` of a missing path among others): exit 1 without
/// another message.
#[derive(Debug, thiserror::Error)]
#[error("errors were reported above")]
pub struct Reported;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let top = cli.top;
    match cli.command {
        Command::Export(a) => export::run(&a.ui.start(&top), a),
        Command::Mount(a) => mount::run(&a.ui.start(&top), a),
        Command::Inspect(a) => inspect::run(&a.ui.start(&top), a),
        Command::Ls(a) => ls::run(&a.ui.start(&top), a),
        Command::Cat(a) => cat::run(&a.ui.start(&top), a),
        Command::Diff(a) => diff::run(&a.ui.start(&top), a),
        Command::Cache(a) => cache::run(top.log.quiet, a),
        Command::Index(a) => index::run(&top, a),
        Command::Stats(a) => stats::run(a),
        Command::Completions(a) => misc::completions(a),
        Command::Man(a) => misc::man(a),
        Command::Umount(a) => mount::umount(a),
    }
}
