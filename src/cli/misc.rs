//! `flatfs completions` and `flatfs man`: what the command line says about itself.

use std::io;

use anyhow::Result;
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
    clap_complete::generate(args.shell, &mut Cli::command(), "flatfs", &mut io::stdout());
    Ok(())
}

/// Runs `flatfs man`.
pub fn man() -> Result<()> {
    clap_mangen::Man::new(Cli::command()).render(&mut io::stdout())?;
    Ok(())
}
