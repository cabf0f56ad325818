//! Running one command: the single-threaded runtime, the error report and the exit status.

use std::process::ExitCode;

use crate::error::CliError;

/// Runs a command's future on a fresh single-threaded runtime. Its `Ok` is the exit status; an
/// `Err` is printed as one line on stderr, `{prefix}{error}` (`prefix` is e.g.
/// `"corral run: "`, or empty), and exits with [`CliError::exit_code`].
pub fn block_on<F>(prefix: &str, f: F) -> ExitCode
where
    F: Future<Output = Result<ExitCode, CliError>>,
{
    let res = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Runtime { source })
        .and_then(|rt| rt.block_on(f));
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{prefix}{e}");
            e.exit_code()
        }
    }
}
