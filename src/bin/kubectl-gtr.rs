//! `kubectl-gtr`: the kubectl plugin (`kubectl gtr ...` once it is on the PATH). All of it lives
//! in `gcp_token_operator::plugin`; this only parses the command line and sets the exit status.

use std::process::ExitCode;

use clap::Parser;
use gcp_token_operator::plugin::{Cli, Error, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("installing the TLS crypto provider"))?;
    match run(cli).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // Each failed refresh was printed as it happened; this is the summary.
        Err(Error::Failed(summary)) => {
            eprintln!("error: {summary}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
