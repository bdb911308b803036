//! The `flatfs` binary: parse arguments, run, print the error chain, map exit codes.

use std::io::ErrorKind;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flatfs::cli::Cli::parse();
    match flatfs::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if io_kind(&err) == Some(ErrorKind::BrokenPipe) => {
            // The reader went away (`| head`): not our error to report, but not a success.
            ExitCode::from(141)
        }
        Err(err) if io_kind(&err) == Some(ErrorKind::Interrupted) => {
            // SIGINT/SIGTERM stopped an export; its temp files are gone. 128 + SIGINT, as shells say.
            eprintln!("flatfs: interrupted");
            ExitCode::from(130)
        }
        Err(err) if err.is::<flatfs::cli::Reported>() => ExitCode::FAILURE,
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

/// The kind of the I/O error at the root of `err`, if there is one. Our error variants expose
/// their I/O cause as `source`, so the chain reaches it.
fn io_kind(err: &anyhow::Error) -> Option<ErrorKind> {
    // serde_json wraps the I/O error of a writer it was given (`inspect --json`).
    err.chain().find_map(|c| {
        c.downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| c.downcast_ref::<serde_json::Error>()?.io_error_kind())
    })
}
