//! `flatfs completions` and `flatfs man`: what the command line says about itself.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

use super::Cli;

/// Print a shell completion script (e.g. `flatfs completions bash > /etc/bash_completion.d/flatfs`).
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    shell: clap_complete::Shell,
}

/// Runs `flatfs completions`.
pub fn completions(args: CompletionsArgs) -> Result<()> {
    // clap_complete panics on a write error (`| head`): generate in memory, write ourselves.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "flatfs", &mut script);
    let mut out = io::stdout().lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("writing to stdout")?;
    Ok(())
}

/// Print a man page (roff): flatfs(1), or a command's, e.g. `flatfs man export | man -l -`.
///
/// With --dir, writes every page (flatfs.1, flatfs-export.1, flatfs-cache-ls.1, …) into DIR,
/// e.g. /usr/local/share/man/man1.
#[derive(Args, Debug)]
pub struct ManArgs {
    /// The command whose page to print (`cache ls` for a cache command) [default: flatfs(1)].
    command: Vec<String>,
    /// Write every page into this directory instead.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    dir: Option<PathBuf>,
}

/// Runs `flatfs man`.
pub fn man(args: ManArgs) -> Result<()> {
    let mut cmd = Cli::command();
    // Building sets the names the pages cross-reference: `flatfs-export`, `flatfs export`.
    cmd.build();
    let cmd = hide_help(cmd);
    if let Some(dir) = args.dir {
        return write_pages(&cmd, &dir);
    }
    let mut page = &cmd;
    for name in &args.command {
        page = page
            .get_subcommands()
            .find(|c| c.get_name() == name && c.get_name() != "help")
            .ok_or_else(|| {
                let names: Vec<&str> = page
                    .get_subcommands()
                    .map(|c| c.get_name())
                    .filter(|&n| n != "help")
                    .collect();
                // A wrong argument: a usage error (exit 2), as clap reports its own.
                Cli::command()
                    .error(
                        clap::error::ErrorKind::InvalidValue,
                        format!(
                            "no man page for {:?}: the commands are {}",
                            args.command.join(" "),
                            names.join(", ")
                        ),
                    )
                    .exit()
            })?;
    }
    page_of(page).render(&mut io::stdout())?;
    Ok(())
}

/// `cmd` with clap's `help` commands hidden at every level: they have no page to refer to.
fn hide_help(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    names.into_iter().fold(cmd, |cmd, name| {
        if name == "help" {
            cmd.mut_subcommand(name, |h| h.hide(true))
        } else {
            cmd.mut_subcommand(name, hide_help)
        }
    })
}

/// The page of `cmd`, its footer naming flatfs and its version (a command has none of its own).
fn page_of(cmd: &clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd.clone()).source(format!("flatfs {}", env!("CARGO_PKG_VERSION")))
}

/// Writes the page of `cmd` and of every command below it into `dir`.
fn write_pages(cmd: &clap::Command, dir: &Path) -> Result<()> {
    let man = page_of(cmd);
    let path = dir.join(man.get_filename());
    let mut out = Vec::new();
    man.render(&mut out)?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
        write_pages(sub, dir)?;
    }
    Ok(())
}
