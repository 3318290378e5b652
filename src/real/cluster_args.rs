//! The flags of `sagamq serve --store postgres://...` and the seam from the
//! command line into [`super::cluster`] (feature `postgres`); without that
//! feature, `--store` is refused with a clear error.

use std::process::ExitCode;
use std::time::Duration;

/// How long an owner's lease lasts without renewal (`--lease-ms`).
pub const LEASE_TTL_DEFAULT: Duration = Duration::from_secs(5);

/// `sagamq serve --store ...` flags (flattened into `serve`'s).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// Keep the state in PostgreSQL (`postgres://user:pass@host:port/db`) instead of --data; several
    /// instances may share one database. Needs a build with the `postgres` feature.
    #[arg(long, value_name = "URL", env = "SAGAMQ_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// With --store: partitions of a new store (fixed at its first start) [default: 16].
    #[arg(long, requires = "store")]
    pub partitions: Option<u32>,
    /// With --store: an owner's lease, in ms; a stopped instance's partitions are served again
    /// elsewhere within about 1.25 times this.
    #[arg(long, requires = "store", default_value_t = LEASE_TTL_DEFAULT.as_millis() as u64)]
    pub lease_ms: u64,
    /// With --store: the base URL other instances forward requests to [default: http://ADDR].
    #[arg(long, requires = "store", value_name = "URL")]
    pub advertise: Option<String>,
}

/// Runs `serve --store`: until Ctrl-C or SIGTERM, then hands every partition back.
#[cfg(feature = "postgres")]
pub fn serve(opts: &super::ServeOptions, args: &ClusterArgs, rt: &tokio::runtime::Runtime) -> ExitCode {
    let o = match super::cluster::ClusterOptions::from_serve(opts, args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sagamq serve: {e}");
            return ExitCode::from(2);
        }
    };
    let r = rt.block_on(async move {
        let mut signal = super::cli::ShutdownSignal::install().map_err(|e| format!("listen for signals: {e}"))?;
        let running = tokio::select! {
            biased;
            () = signal.recv() => return Ok(()),
            r = super::cluster::start(o) => r?,
        };
        println!("{}{}", super::cli::LISTENING_PREFIX, running.url());
        let _ = std::io::Write::flush(&mut std::io::stdout());
        running.run_until(signal.recv()).await;
        Ok::<(), String>(())
    });
    super::cli::serve_exit(r)
}

/// Without the `postgres` feature: a clear refusal.
#[cfg(not(feature = "postgres"))]
pub fn serve(_opts: &super::ServeOptions, _args: &ClusterArgs, _rt: &tokio::runtime::Runtime) -> ExitCode {
    eprintln!(
        "sagamq serve: --store needs a build with the `postgres` feature \
         (cargo build --release --features postgres)"
    );
    ExitCode::from(2)
}
