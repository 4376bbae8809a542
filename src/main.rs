//! The `corecast` binary: parse the command line, load the config, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use corecast::config::{Cli, Command, Config};
use corecast::machine::Machine;

/// sysexits.h EX_CONFIG: the configuration is wrong.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, check_only) = match cli.command {
        None => (cli.serve, false),
        Some(Command::Serve(args)) => (args, false),
        Some(Command::Check(args)) => (args, true),
    };
    let (config, warnings) = match Config::load(&args, &Machine::detect()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("corecast: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if check_only {
        for w in &warnings {
            eprintln!("corecast: warning: {w}");
        }
        // What `serve` would refuse before listening, refused here the same way: the log
        // file as a config error (78), the rest as `run`'s start-up errors (1). Nothing is
        // created, bound or changed.
        if let Err(e) = corecast::log::check_file(&config.log, &config.name) {
            eprintln!("corecast: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
        if let Err(e) = corecast::preflight(&config) {
            eprintln!("corecast: error: {e}");
            return ExitCode::FAILURE;
        }
        if let Some(w) = corecast::check_rings(&config) {
            eprintln!("corecast: warning: {w}");
        }
        println!("{:#}", config.to_json());
        return ExitCode::SUCCESS;
    }
    // Dropped when main returns, after `run`: flushes the file log.
    let _log_guard = match corecast::log::init(&config.log, &config.name) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("corecast: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    for w in &warnings {
        tracing::warn!("{w}");
    }
    match corecast::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corecast: error: {e}");
            ExitCode::FAILURE
        }
    }
}
