//! corecast-loadgen: open-loop load generator for corecast, and for nats-server and
//! redis-server running the same workload shape, so the three can be compared.
//!
//! The binary (`src/main.rs`) is [`main_with`] over the process's arguments; corecast's
//! own tests (`tests/loadgen.rs` at the workspace root) call it the same way, against a
//! relay started by their harness.
//!
//! `corecast-loadgen [run] --target HOST:PORT ...` runs one workload and prints a summary
//! (and JSON with `--json`); `corecast-loadgen compare ...` starts the servers pinned to
//! one CPU and runs the standard workloads against each in alternating rounds. Both write,
//! on request, a self-contained HTML report with charts, `.hgrm` distributions, CSV and
//! SVG charts (`report/`), and record the versions, machine and settings they ran with.

mod accounting;
mod anchor;
mod compare;
mod engine;
mod measure;
mod merge;
mod proto;
mod reader;
mod report;
mod runner;
mod tls;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use proto::Protocol;

/// Default `--burst-us`: at most a thousand writes a second per publisher.
pub const DEFAULT_BURST_US: u64 = 1000;

#[derive(Debug, Parser)]
#[command(
    name = "corecast-loadgen",
    version,
    about = "Load generator for corecast, NATS and Redis pub/sub"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one workload against one server (the default).
    Run(RunArgs),
    /// Start corecast (and nats-server / redis-server when installed) pinned to one CPU and
    /// compare them on the standard workloads in alternating rounds.
    Compare(compare::CompareArgs),
}

/// What the run exercises besides plain fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every client receives; publishers send at the rate.
    Fanout,
    /// Like fanout, but `--slow` receivers never read (the same as `--stuck-readers`);
    /// accounting covers the others.
    SlowConsumer,
    /// Like fanout at a rate meant to exceed the server's limit: counts notices and loss.
    OverRate,
    /// Connections that stay open and silent; reports the server's memory per connection.
    Idle,
    /// Fan-out while extra connections open and close at `--connect-rate`.
    Churn,
    /// Fan-out while extra clients send invalid UTF-8 and oversize lines once a second.
    BadInput,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Server address. Repeat it for the nodes of a corecast cluster: client i connects to
    /// target i mod n, and the summary adds the deliveries that crossed nodes (publisher
    /// and receiver on different targets) and their latency.
    #[arg(long, default_value = "127.0.0.1:8888")]
    pub target: Vec<String>,
    #[arg(long, value_enum, default_value_t = Protocol::Summoner)]
    pub protocol: Protocol,
    /// Connections that receive.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// How many of the clients also publish.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Lines per second per publisher (0 = as fast as the socket takes them).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Payload bytes per line (at least 42, the header).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// A publisher's lines go out in bursts, one every this many µs: each burst holds the
    /// lines due before the next one and carries its own scheduled time, so a client that
    /// writes in batches is modelled without hiding any delay (0 = each line at its own
    /// time, one write per line).
    #[arg(long, default_value_t = DEFAULT_BURST_US)]
    pub burst_us: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds to wait after the last send for deliveries still in flight.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Connections opened per second (0 = as fast as possible); in `churn`, the churn rate.
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Local addresses to connect from, round-robin: `127.0.0.2-127.0.0.9` or a comma list.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// CPUs to pin the generator's threads to, e.g. `1` or `2-3` or `1,3`.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Server process to charge CPU (and, for `idle`, memory) to.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the result as one JSON object to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// No progress bar even on a TTY.
    #[arg(long)]
    pub no_progress: bool,
    #[arg(long, value_enum, default_value_t = Scenario::Fanout)]
    pub scenario: Scenario,
    /// Receivers that never read, in the slow-consumer scenario (default: a tenth).
    #[arg(long)]
    pub slow: Option<usize>,
    /// Receivers that connect and never read, in any scenario; the report says whether and
    /// when the server closed each.
    #[arg(long)]
    pub stuck_readers: Option<usize>,
    /// Bytes per second a rate-limited receiver reads at most: it reads 4096 bytes at a
    /// time and then waits as long as they take at this rate. Applies to `--slow-readers`
    /// receivers, or to every receiver that is neither stuck nor pausing.
    #[arg(long, value_name = "BYTES_PER_S")]
    pub reader_rate: Option<f64>,
    /// How many receivers read at `--reader-rate`.
    #[arg(long, requires = "reader_rate")]
    pub slow_readers: Option<usize>,
    /// Receivers that stop reading once, for `--pause-ms`, then read normally.
    #[arg(long, requires = "pause_ms")]
    pub pause_readers: Option<usize>,
    /// How long a pausing receiver stops reading.
    #[arg(long, requires = "pause_readers")]
    pub pause_ms: Option<u64>,
    /// When it stops, after the start of the measured window (the end of the warm-up).
    #[arg(long, default_value_t = 0, requires = "pause_readers")]
    pub pause_at_ms: u64,
    #[command(flatten)]
    pub tls: tls::TlsArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// What a run or a comparison writes besides the summary and `--json`: the HTML report,
/// `.hgrm` distributions, CSV, and which latency percentiles they all report.
#[derive(Debug, Clone, Default, Args)]
pub struct OutputArgs {
    /// Write a self-contained HTML report (charts inline as SVG, no external assets).
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
    /// Write HdrHistogram percentile distributions (values in ms): PREFIX-<class>.hgrm for a
    /// run, PREFIX-<workload>-<server>.hgrm (all rounds) for `compare`.
    #[arg(long, value_name = "PREFIX")]
    pub hgrm: Option<std::path::PathBuf>,
    /// Write PREFIX-summary.csv (one row per run) and PREFIX-timeline.csv (one row per
    /// second of each run).
    #[arg(long, value_name = "PREFIX")]
    pub csv: Option<std::path::PathBuf>,
    /// Write every chart of the report as DIR/<chart>.svg as well.
    #[arg(long, value_name = "DIR")]
    pub charts: Option<std::path::PathBuf>,
    /// Latency percentiles reported in the summary, the JSON (`percentiles_us`) and the CSV.
    #[arg(long, value_delimiter = ',', default_value = "50,90,99,99.9,99.99")]
    pub percentiles: Vec<f64>,
}

/// Parses `args` (the program name first) as the command line and runs it, as the binary
/// does: the summary goes to stdout, `--json` writes the result, errors go to stderr.
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    report::meta::set_command_line(args.iter().map(|a| a.to_string_lossy().into_owned()).collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Some(Command::Compare(args)) => compare::run(&args),
        Some(Command::Run(args)) => run_once(&args),
        None => run_once(&cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corecast-loadgen: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_once(args: &RunArgs) -> Result<(), String> {
    report::check_percentiles(&args.output.percentiles)?;
    // Before the run: the date is its start, and the source commit is read before any
    // output file is written (which would make a tracked one look changed).
    let meta = report::meta::Meta::collect(
        args.server_pid
            .map(|pid| report::meta::ServerInfo::of_pid(pid, args.protocol))
            .into_iter()
            .collect(),
    );
    let mut result = runner::run(args)?;
    result.meta = Some(meta);
    print!("{}", result.human());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    report::write_run_outputs(&result, &args.output)
}
