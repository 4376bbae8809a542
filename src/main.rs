//! The `corecast` binary: parse the command line, load the config, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use corecast::config::{keys, Cli, Command, Config};
use corecast::machine::Machine;

/// sysexits.h EX_CONFIG: the configuration is wrong.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, check) = match cli.command {
        None => (cli.serve, None),
        Some(Command::Serve(args)) => (args, None),
        Some(Command::Check(check)) => (check.serve.clone(), Some(check)),
        Some(Command::Keys) => {
            print!("{}", keys::markdown());
            return ExitCode::SUCCESS;
        }
    };
    let machine = Machine::detect();
    let (config, warnings) = match Config::load(&args, &machine) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("corecast: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Some(check) = check {
        let kind = if check.strict { "config error" } else { "warning" };
        for w in &warnings {
            eprintln!("corecast: {kind}: {w}");
        }
        if check.strict && !warnings.is_empty() {
            return ExitCode::from(EX_CONFIG);
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
    // SIGHUP reads the file again, with the same flags over it.
    let source = Box::new(move || Config::load(&args, &machine));
    match corecast::run_reloadable(config, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corecast: error: {e}");
            ExitCode::FAILURE
        }
    }
}
