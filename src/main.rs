//! `sagamq`: the real broker binary. Built with `--features real`.

fn main() {
    #[cfg(feature = "real")]
    {
        eprintln!("sagamq serve: TODO(issue 6)");
        std::process::exit(2);
    }
    #[cfg(not(feature = "real"))]
    {
        eprintln!(
            "sagamq was built without the `real` feature; run: cargo run --release --features real -- serve --help"
        );
        std::process::exit(2);
    }
}
