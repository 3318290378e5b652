//! `sagamq bench`: TODO.

use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {}

pub async fn main(args: BenchArgs) -> ExitCode {
    let _ = args;
    ExitCode::FAILURE
}
