//! `sagamq`: the real broker binary. Built with `--features real`.

#[cfg(feature = "real")]
fn main() -> std::process::ExitCode {
    sagamq::real::cli::main()
}

#[cfg(not(feature = "real"))]
fn main() {
    eprintln!("sagamq was built without the `real` feature; run: cargo run --release --features real -- serve --help");
    std::process::exit(2);
}
