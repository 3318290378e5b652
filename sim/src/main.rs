//! `sagamq-sim`: run seeded simulation sweeps, replay a seed's trace, list and
//! hunt planted bugs, shrink a failing plan, and benchmark the simulator.

use clap::{Parser, Subcommand};
use sagamq_sim::cluster::{self, ClusterBug, ClusterConfig};
use sagamq_sim::plan::FaultPlan;
use sagamq_sim::runner::{self, Summary};
use sagamq_sim::scenario::Scenario;
use sagamq_sim::world::RunConfig;
use sagamq_sim::{Bug, diagram, trace};
use std::io::{IsTerminal, Write as _};
use std::ops::Range;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sagamq-sim", about = "Deterministic simulation testbed for saga messaging")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sweep a range of seeds; exit 0 only if every seed passed.
    Run {
        /// A range `A..B` (B excluded) or a single seed.
        #[arg(long, value_parser = parse_seeds)]
        seeds: Range<u64>,
        /// `seed`, `saga`, `saga:N`, or `cluster` (several instances on a simulated PostgreSQL).
        #[arg(long, default_value = "saga", value_parser = parse_scenario)]
        scenario: Which,
        /// A planted bug (`list-bugs`); the cluster's own with `--scenario cluster`.
        #[arg(long, value_parser = parse_bug)]
        bug: Option<BugArg>,
        #[command(flatten)]
        shape: ClusterShape,
        /// Print the summary as one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// Worker threads (default: all cores; the cluster sweep runs on one).
        #[arg(long)]
        jobs: Option<usize>,
        /// Stop at the first failing seed.
        #[arg(long)]
        stop_at_first: bool,
    },
    /// Print the canonical trace of one seed, ending with `trace-hash: <hex>`.
    Replay {
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value = "saga", value_parser = parse_scenario)]
        scenario: Which,
        #[arg(long, value_parser = parse_bug)]
        bug: Option<BugArg>,
        #[command(flatten)]
        shape: ClusterShape,
        /// Replay an explicit plan (JSON: the `plan JSON:` line `shrink` prints, or a `plan.json` /
        /// `shrunk-plan.json` written by `runner::explain_failure`) instead of the seed's.
        #[arg(long)]
        plan: Option<std::path::PathBuf>,
        /// Write a sequence diagram (self-contained SVG; an HTML page if FILE ends in .html)
        /// of the run to this file instead of printing the trace.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
        /// Write a Mermaid sequenceDiagram of the run to this file (`-`: stdout) instead of printing the trace.
        #[arg(long)]
        mermaid: Option<std::path::PathBuf>,
        /// Diagrams show only this order's (GlobalID's) messages, plus crashes, partitions and violations.
        #[arg(long)]
        order: Option<String>,
    },
    /// Name the planted bugs with one line of explanation each.
    ListBugs,
    /// Reduce a failing seed's fault plan to a minimal one that still fails.
    Shrink {
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value = "saga")]
        scenario: Scenario,
        #[arg(long)]
        bug: Option<Bug>,
        /// Upper bound on simulation runs spent shrinking.
        #[arg(long, default_value_t = 400)]
        runs_max: u32,
    },
    /// Seeds/s, deliveries/s and simulated s per second (wall and CPU), next to a bare madsim relay run side by side.
    Bench {
        #[arg(long, default_value_t = 300)]
        seeds: u64,
    },
    /// Simulated acknowledged publishes/s and failover time for 1, 2, 3, 5 instances and
    /// 4, 16 partitions under the stated database commit-cost model (not a measurement).
    ClusterBench {
        /// Lease of the failover runs (ms).
        #[arg(long, default_value_t = 2_000)]
        lease_ms: u64,
        /// Seeds per configuration (throughput averaged, failover as a range).
        #[arg(long, default_value_t = 3)]
        seeds: u64,
    },
}

/// What `--scenario` names: one of the single-broker workloads, or the cluster.
#[derive(Clone, Copy, Debug)]
enum Which {
    Single(Scenario),
    Cluster,
}

fn parse_scenario(s: &str) -> Result<Which, String> {
    if s == "cluster" {
        return Ok(Which::Cluster);
    }
    s.parse::<Scenario>()
        .map(Which::Single)
        .map_err(|e| format!("{e} (or cluster)"))
}

/// A planted bug of either catalogue.
#[derive(Clone, Copy, Debug)]
enum BugArg {
    Single(Bug),
    Cluster(ClusterBug),
}

fn parse_bug(s: &str) -> Result<BugArg, String> {
    match (s.parse::<Bug>(), s.parse::<ClusterBug>()) {
        (Ok(b), _) => Ok(BugArg::Single(b)),
        (_, Ok(b)) => Ok(BugArg::Cluster(b)),
        (Err(e), Err(c)) => Err(format!("{e}; {c}")),
    }
}

/// The cluster's shape (`--scenario cluster` only).
#[derive(clap::Args, Clone, Copy, Debug)]
struct ClusterShape {
    /// Instances of `sagamq serve` sharing the simulated database.
    #[arg(long)]
    instances: Option<usize>,
    /// Partitions of the store.
    #[arg(long)]
    partitions: Option<u32>,
}

/// The configuration `--scenario`, `--bug` and the shape name, or why they do not fit together.
enum Config {
    Single(RunConfig),
    Cluster(ClusterConfig),
}

fn config(which: Which, bug: Option<BugArg>, shape: ClusterShape) -> Result<Config, String> {
    match (which, bug) {
        (Which::Cluster, None | Some(BugArg::Cluster(_))) => {
            let bug = match bug {
                Some(BugArg::Cluster(b)) => Some(b),
                _ => None,
            };
            Ok(Config::Cluster(ClusterConfig::new(
                shape.instances.unwrap_or(3),
                shape.partitions.unwrap_or(8),
                bug,
            )))
        }
        (Which::Cluster, Some(BugArg::Single(b))) => Err(format!(
            "{b} is a single-broker bug; the cluster's are no-fencing, partial-subscription, double-store-retried-commit"
        )),
        (Which::Single(_), Some(BugArg::Cluster(b))) => Err(format!("{b} is a cluster bug: add --scenario cluster")),
        (Which::Single(_), _) if shape.instances.is_some() || shape.partitions.is_some() => {
            Err("--instances and --partitions need --scenario cluster".to_string())
        }
        (Which::Single(scenario), bug) => {
            let bug = match bug {
                Some(BugArg::Single(b)) => Some(b),
                _ => None,
            };
            Ok(Config::Single(RunConfig::new(scenario, bug)))
        }
    }
}

fn cluster_sweep(cfg: &ClusterConfig, seeds: Range<u64>, stop_at_first: bool, json: bool) -> ExitCode {
    let s = cluster::sweep(cfg, seeds, stop_at_first);
    print!("{}", s.human());
    if json {
        println!("{}", serde_json::to_string(&s).expect("summary serializes"));
    }
    if s.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cluster_replay(mut cfg: ClusterConfig, seed: u64) -> ExitCode {
    cfg.trace = true;
    let r = cluster::run(seed, &cfg);
    print!("{}", trace::render(&r.trace));
    match r.violations.first() {
        None => ExitCode::SUCCESS,
        Some(v) => {
            eprintln!("seed {seed}: FAIL {v}");
            ExitCode::FAILURE
        }
    }
}

fn parse_seeds(s: &str) -> Result<Range<u64>, String> {
    match s.split_once("..") {
        Some((a, b)) => {
            let a: u64 = a.parse().map_err(|e| format!("bad seed range start {a:?}: {e}"))?;
            let b: u64 = b.parse().map_err(|e| format!("bad seed range end {b:?}: {e}"))?;
            if b <= a {
                return Err(format!("empty seed range {s}"));
            }
            Ok(a..b)
        }
        None => {
            let a: u64 = s.parse().map_err(|e| format!("bad seed {s:?}: {e}"))?;
            Ok(a..a + 1)
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run {
            seeds,
            scenario,
            bug,
            shape,
            json,
            jobs,
            stop_at_first,
        } => {
            let cfg = match config(scenario, bug, shape) {
                Ok(Config::Single(cfg)) => cfg,
                Ok(Config::Cluster(cfg)) => return cluster_sweep(&cfg, seeds, stop_at_first, json),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let tty = std::io::stderr().is_terminal();
            let progress = move |done: u64, total: u64, failed: u64| {
                if tty && (done.is_multiple_of(50) || done == total) {
                    eprint!("\r{done}/{total} seeds, {failed} failed ");
                }
            };
            let summary = runner::sweep(&cfg, seeds, jobs, stop_at_first, &progress);
            if tty {
                eprintln!();
            }
            report(&summary, json)
        }
        Cmd::Replay {
            seed,
            scenario,
            bug,
            shape,
            plan,
            svg,
            mermaid,
            order,
        } => {
            let (scenario, bug) = match config(scenario, bug, shape) {
                Ok(Config::Single(cfg)) => (cfg.scenario, cfg.bug),
                Ok(Config::Cluster(cfg)) => {
                    if plan.is_some() || svg.is_some() || mermaid.is_some() || order.is_some() {
                        eprintln!("--plan, --svg, --mermaid and --order are not available for the cluster");
                        return ExitCode::from(2);
                    }
                    return cluster_replay(cfg, seed);
                }
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            if order.is_some() && svg.is_none() && mermaid.is_none() {
                eprintln!("--order selects what a diagram shows: add --svg FILE or --mermaid FILE");
                return ExitCode::from(2);
            }
            let plan_file = plan.clone();
            let mut cfg = RunConfig::new(scenario, bug);
            cfg.trace = true;
            let plan = match plan {
                Some(path) => match std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str::<FaultPlan>(&t).map_err(|e| e.to_string()))
                {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("cannot read plan {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                },
                None => runner::plan_for(seed, &cfg),
            };
            let r = sagamq_sim::world::run(seed, &plan, &cfg);
            if svg.is_none() && mermaid.is_none() {
                print!("{}", trace::render(&r.trace));
            } else {
                let mut command =
                    runner::replay_command(seed, &cfg).replace("cargo run --release -p sagamq-sim --", "sagamq-sim");
                if let Some(p) = &plan_file {
                    command.push_str(&format!(" --plan {}", p.display()));
                }
                if let Some(o) = &order {
                    command.push_str(&format!(" --order {o}"));
                }
                let opts = diagram::Options {
                    order,
                    command: Some(command),
                };
                for (path, is_svg) in [(&svg, true), (&mermaid, false)] {
                    let Some(path) = path else { continue };
                    let rendered = if is_svg {
                        diagram::svg(&r.events, &opts)
                    } else {
                        diagram::mermaid(&r.events, &opts)
                    };
                    let mut text = match rendered {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("{e}");
                            return ExitCode::from(2);
                        }
                    };
                    if is_svg && path.extension().is_some_and(|e| e == "html" || e == "htm") {
                        text = diagram::html_page(&text, opts.command.as_deref().unwrap_or("sagamq-sim"));
                    }
                    let written = if path.as_os_str() == "-" {
                        std::io::stdout().write_all(text.as_bytes())
                    } else {
                        std::fs::write(path, &text)
                    };
                    if let Err(e) = written {
                        eprintln!("cannot write {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                    if path.as_os_str() != "-" {
                        eprintln!("wrote {} ({} bytes)", path.display(), text.len());
                    }
                }
                match r.violations.first() {
                    None => eprintln!("seed {seed}: no invariant violated"),
                    Some(v) => eprintln!("seed {seed}: FAIL {v}"),
                }
            }
            if r.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::ListBugs => {
            for b in Bug::ALL {
                println!("{:<24} {}", b.name(), b.explain());
            }
            println!("with --scenario cluster:");
            for b in cluster::CLUSTER_BUGS {
                println!("{:<28} {}", b.name(), b.explain());
            }
            ExitCode::SUCCESS
        }
        Cmd::Shrink {
            seed,
            scenario,
            bug,
            runs_max,
        } => {
            let cfg = RunConfig::new(scenario, bug);
            let plan = runner::plan_for(seed, &cfg);
            match runner::shrink(seed, &cfg, plan, runs_max) {
                None => {
                    eprintln!("seed {seed} passes: nothing to shrink");
                    ExitCode::from(2)
                }
                Some(s) => {
                    print!("{}", trace::render(&s.result.trace));
                    println!(
                        "shrunk seed {seed} ({}): {} faults -> {} faults in {} runs; still fails `{}`",
                        scenario,
                        s.original.faults.len(),
                        s.minimal.faults.len(),
                        s.runs,
                        s.invariant
                    );
                    print!("minimal plan:\n{}", s.minimal);
                    println!(
                        "plan JSON: {}",
                        serde_json::to_string(&s.minimal).expect("plan serializes")
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Bench { seeds } => {
            println!("{}", sagamq_sim::runner::bench(seeds));
            ExitCode::SUCCESS
        }
        Cmd::ClusterBench { lease_ms, seeds } => {
            print!("{}", cluster::bench::figures(lease_ms, seeds));
            ExitCode::SUCCESS
        }
    }
}

fn report(summary: &Summary, json: bool) -> ExitCode {
    println!("{}", summary.human());
    let silent = summary.silent_fault_kinds();
    if !silent.is_empty() {
        println!(
            "note: fault kinds that never fired in this sweep: {}",
            silent.join(", ")
        );
    }
    if json {
        println!("{}", serde_json::to_string(summary).expect("summary serializes"));
    }
    if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
