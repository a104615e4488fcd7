use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = silo::config::Cli::parse();
    silo::telemetry::init_tracing(cli.log_format);
    silo::cli::run(cli).await
}
