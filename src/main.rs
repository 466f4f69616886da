use std::sync::{Arc, atomic::AtomicBool};

use anyhow::Context as _;
use clap::Parser;
use gcp_token_operator::{
    cli::{Cli, Command, RunArgs},
    controller::{self, Settings},
    crd_yaml,
    google::GoogleClient,
    http,
    metrics::Metrics,
    telemetry,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // kube and reqwest both use rustls: one crypto provider for both, chosen before either starts.
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", crd_yaml());
            Ok(())
        }
        Some(Command::Run(args)) => run(*args).await,
        None => run(cli.run).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    controller::check_crd(&client, &args.namespaces)
        .await
        .context("listing TokenRequests failed; is the CRD installed? (gcp-token-operator crd | kubectl apply -f -)")?;
    let metrics = Arc::new(Metrics::default());
    let google = GoogleClient::new(args.endpoints(), metrics.clone()).context("building the HTTP client")?;
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(http::serve(args.http_addr, metrics.clone(), ready.clone()));
    let instance = std::env::var("POD_NAME").unwrap_or_else(|_| hostname());
    let settings = Settings {
        namespaces: args.namespaces,
        concurrency: args.concurrency,
        instance,
    };
    tokio::select! {
        () = controller::run(client, google, metrics, settings, ready) => Ok(()),
        result = server => {
            result.context("the HTTP server task failed")?.context("the HTTP server failed")
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "gcp-token-operator".into())
}
