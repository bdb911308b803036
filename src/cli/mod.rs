//! Command line: the clap definition of `flatfs` and the dispatch to one module per command.
//! Each command's arguments sit beside its handler; `anyhow` lives here and in main only.

mod cache;
mod cat;
mod diff;
mod export;
mod export_all;
mod inspect;
mod ls;
mod misc;
mod mount;
mod ui;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

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
    #[command(flatten)]
    registry: RegistryArgs,
}

/// How to reach registries, for `docker://` images; skopeo's names and meanings.
#[derive(Args, Debug)]
struct RegistryArgs {
    /// Registry credentials from this auth file only [default: $REGISTRY_AUTH_FILE, else
    /// $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json,
    /// ~/.docker/config.json].
    #[arg(long, global = true, value_name = "PATH")]
    authfile: Option<std::path::PathBuf>,
    /// Registry credentials from a file holding USER:PASSWORD (never on the command line).
    #[arg(long, global = true, value_name = "PATH")]
    creds_file: Option<std::path::PathBuf>,
    /// CA certificates (*.crt) and a client certificate (*.cert, *.key) for the registry
    /// [default: /etc/containers/certs.d/HOST:PORT].
    #[arg(long, global = true, value_name = "DIR")]
    cert_dir: Option<std::path::PathBuf>,
    /// Require HTTPS and a valid certificate; `--tls-verify=false` also allows plain HTTP.
    #[arg(
        long,
        global = true,
        value_name = "BOOL",
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    tls_verify: bool,
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
    let cache = if cli.no_cache {
        None
    } else {
        crate::cache::default_dir().map(Cache::new)
    };
    let registry = crate::registry::Options {
        authfile: cli.registry.authfile,
        creds_file: cli.registry.creds_file,
        cert_dir: cli.registry.cert_dir,
        insecure: !cli.registry.tls_verify,
        cache_dir: cache.as_ref().map(|c| c.dir().to_path_buf()),
    };
    let ui = Ui {
        quiet: cli.quiet,
        cache,
        registry,
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
