use anyhow::Result;
use std::process::ExitCode;
pub fn run(_a: &crate::cli::BenchArgs) -> Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
