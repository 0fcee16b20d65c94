//! `quiver-bench`: the same as `quiver bench`, without the rest of the CLI.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = quiver_bench::BenchArgs::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(quiver_bench::run_cli(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
