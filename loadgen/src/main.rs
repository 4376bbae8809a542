//! The `corecast-loadgen` command; everything is in the library (`src/lib.rs`).

fn main() -> std::process::ExitCode {
    corecast_loadgen::main_with(std::env::args_os())
}
