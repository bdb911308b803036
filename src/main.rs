//! The `flatfs` binary: parse arguments, run, print the error chain, map exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flatfs::cli::Cli::parse();
    match flatfs::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if broken_pipe(&err) => {
            // The reader went away (`| head`): not our error to report, but not a success.
            ExitCode::from(141)
        }
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

fn broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<flatfs::Error>().is_some_and(|e| {
                matches!(e, flatfs::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
            })
    })
}
