//! The `flatfs` binary: parse arguments, run, print the error chain, map exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flatfs::cli::Cli::parse();
    match flatfs::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut msg = format!("flatfs: {err}");
            for cause in err.chain().skip(1) {
                // Our error variants already print their cause; don't say it twice.
                let cause = cause.to_string();
                if !msg.contains(&cause) {
                    msg.push_str(&format!(": {cause}"));
                }
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
