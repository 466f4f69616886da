//! A local environment for trying the operator: a Kubernetes control plane on loopback that runs
//! until Ctrl-C or SIGTERM, then is torn down.

use std::pin::pin;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use gcp_token_operator::testkit::control_plane::ControlPlane;
use tokio::signal::unix::{SignalKind, signal};

/// Starts a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager v1.20)
/// and prints the `export KUBECONFIG=...` line for it. Runs until interrupted, then tears it down.
#[derive(Parser)]
#[command(version)]
struct Args {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Args::parse();
    // Listen before starting, so that a signal at any point tears down what was started.
    let mut stopped = pin!(stop_signal()?);
    let started = Instant::now();
    let control_plane = tokio::select! {
        control_plane = ControlPlane::start() => control_plane.context("starting the control plane")?,
        () = &mut stopped => return Ok(()),
    };
    eprintln!(
        "control plane {} ready in {:.1?}; logs in {}",
        control_plane.api_server_url(),
        started.elapsed(),
        control_plane.log_dir().display(),
    );
    println!("export KUBECONFIG={}", control_plane.kubeconfig_path().display());
    eprintln!("Ctrl-C stops it");
    stopped.await;
    eprintln!("tearing down");
    // Dropping it kills the processes and removes the directory.
    drop(control_plane);
    Ok(())
}

/// Completes on SIGINT, SIGTERM or SIGHUP (a closed terminal).
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
    })
}
