//! `sagamq demo`: TODO once the saga participants land.

use super::cli::DemoArgs;
use std::process::ExitCode;

pub async fn main(args: DemoArgs) -> ExitCode {
    let _ = args;
    eprintln!("sagamq demo: not yet available");
    ExitCode::FAILURE
}
