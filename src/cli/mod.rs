//! Command line: the clap definition of `flatfs` and the dispatch to one module per command.
//! Each command's arguments sit beside its handler; `anyhow` lives here and in main only.

mod cache;
mod cat;
mod diff;
mod export;
mod inspect;
mod ls;
mod misc;
mod mount;
mod ui;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cache::Cache;
use ui::Ui;

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
    /// No progress bar or summary on stderr (errors are still printed).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Log what flatfs does to stderr (-vv for more; RUST_LOG works too).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Neither read nor write the cache of layer indexes and merged trees ($FLATFS_CACHE_DIR, else
    /// $XDG_CACHE_HOME/flatfs, else ~/.cache/flatfs).
    #[arg(long, global = true)]
    no_cache: bool,
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
    Completions(misc::CompletionsArgs),
    /// Print the man page (roff), e.g. `flatfs man | man -l -`.
    Man,
    Umount(mount::UmountArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    ui::init_logging(cli.verbose);
    let ui = Ui {
        quiet: cli.quiet,
        cache: if cli.no_cache {
            None
        } else {
            crate::cache::default_dir().map(Cache::new)
        },
    };
    match cli.command {
        Command::Export(args) => export::run(args, &ui),
        Command::Mount(args) => mount::run(args, &ui),
        Command::Inspect(args) => inspect::run(args, &ui),
        Command::Ls(args) => ls::run(args, &ui),
        Command::Cat(args) => cat::run(args, &ui),
        Command::Diff(args) => diff::run(args, &ui),
        Command::Cache(args) => cache::run(args, &ui),
        Command::Completions(args) => misc::completions(args),
        Command::Man => misc::man(),
        Command::Umount(args) => mount::umount(args),
    }
}
