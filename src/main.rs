use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use gcp_token_operator::{
    cli::{Cli, Command, RunArgs},
    controller::{self, Settings},
    crd_yaml,
    google::GoogleClient,
    http,
    leader::{self, LeaseSettings, Outcome},
    metrics::Metrics,
    ratelimit::KubeRateLimitLayer,
    telemetry,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // kube and reqwest both use rustls: one crypto provider for both, chosen before either starts.
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let cli = Cli::parse_checked();
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
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    // The Lease has a client of its own, not throttled with the reconciles: a renewal queued behind
    // a burst of them could miss its deadline and stop the leader.
    let lease_client = args
        .leader_elect
        .then(|| kube::Client::try_from(config.clone()))
        .transpose()
        .context("building the Kubernetes client for the Lease")?;
    let builder = kube::client::ClientBuilder::try_from(config).context("building the Kubernetes client")?;
    let client = match args.kube_rate() {
        Some(rate) => builder.with_layer(&KubeRateLimitLayer::new(rate)).build(),
        None => builder.build(),
    };
    controller::check_crd(&client, &args.namespaces)
        .await
        .context("listing TokenRequests failed; is the CRD installed? (gcp-token-operator crd | kubectl apply -f -)")?;
    let metrics = Arc::new(Metrics::default());
    let google = GoogleClient::new(args.endpoints(), &args.google_limits(), metrics.clone())
        .context("building the HTTP client")?;
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(http::serve(args.http_addr, metrics.clone(), ready.clone()));
    let instance = std::env::var("POD_NAME").unwrap_or_else(|_| hostname());
    let timing = args.lease_timing()?;
    let lease = lease_client.map(|lease_client| {
        let settings = LeaseSettings {
            name: args.lease_name.clone(),
            namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string()),
            // Unique even for two processes on one host.
            identity: format!("{instance}_{}", std::process::id()),
            timing,
        };
        (lease_client, settings)
    });
    let settings = Settings {
        // One controller per watched namespace, or one for all.
        fairness: args.fairness_limits(args.namespaces.len().max(1)),
        policy: args.policy(),
        ambient: args.ambient(),
        namespaces: args.namespaces,
        concurrency: args.concurrency,
        refresh_spread: args.refresh_spread,
        initial_list: args.initial_list,
        instance,
    };
    let reconcile = controller::run(client.clone(), google, metrics.clone(), settings, ready.clone());
    let work = async {
        let Some((lease_client, lease)) = lease else {
            // Without election this replica is the one that reconciles.
            metrics.set_leader(true);
            reconcile.await;
            return Ok(());
        };
        // A standby is healthy and ready to take over; it reports ready so rollouts proceed.
        ready.store(true, Ordering::Relaxed);
        match leader::run_as_leader(lease_client, lease, &metrics, shutdown_signal(), reconcile).await {
            Outcome::Finished(()) | Outcome::ShutDown => Ok(()),
            Outcome::Lost(loss) => {
                anyhow::bail!("stopped leading ({loss}); exiting so that only the new leader writes")
            }
        }
    };
    tokio::select! {
        result = work => result,
        result = server => {
            result.context("the HTTP server task failed")?.context("the HTTP server failed")
        }
    }
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "gcp-token-operator".into())
}
