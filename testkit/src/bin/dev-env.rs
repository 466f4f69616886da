//! A local environment for trying the operator, with no cluster and no Google account.
//!
//! - `dev-env`: a Kubernetes control plane on loopback that runs until Ctrl-C or SIGTERM.
//! - `dev-env demo`: the same control plane plus the Google emulator, the CRD, the operator binary
//!   running against both, and `examples/` applied; it shows the TokenRequests, whose tokens
//!   refresh within a minute, until Ctrl-C, then tears everything down.

use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gcp_token_operator::crd::TokenRequest;
use gcp_token_operator_testkit::control_plane::{ControlPlane, apply_crds};
use gcp_token_operator_testkit::emulator::{Endpoint, GoogleEmulator};
use gcp_token_operator_testkit::examples;
use gcp_token_operator_testkit::operator::{OperatorOptions, OperatorProcess};
use kube::CustomResourceExt as _;
use tokio::signal::unix::{SignalKind, signal};

/// Starts a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)
/// and prints the `export KUBECONFIG=...` line for it; `demo` adds the operator at work. Runs
/// until interrupted, then tears it down.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The operator at work: control plane, Google emulator, the operator and examples/, with
    /// `kubectl get tokenrequests` printed periodically, until Ctrl-C.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// The operator binary. Default: `gcp-token-operator` next to this program, built first when
    /// this program was started by `cargo run`.
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Namespace the examples go to.
    #[arg(long, default_value = "demo")]
    namespace: String,
    /// How often the TokenRequests are shown.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Lifetime of the tokens the emulated STS, IAM Credentials and Developer Connect issue; short,
    /// so that refreshes happen while you watch.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Listen before starting, so that a signal at any point tears down what was started.
    let mut stopped = pin!(stop_signal()?);
    // The demo's operator binary comes first, so that a failed build starts nothing.
    let demo = match args.command {
        Some(Command::Demo(demo)) => {
            let operator = match &demo.operator {
                Some(path) => path.clone(),
                None => build_operator().await?,
            };
            Some((operator, demo))
        }
        None => None,
    };
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
    let result = match demo {
        None => {
            eprintln!("Ctrl-C stops it");
            stopped.await;
            Ok(())
        }
        Some((operator, args)) => run_demo(&control_plane, &operator, args, stopped).await,
    };
    eprintln!("tearing down");
    // Dropping it kills the processes and removes the directory.
    drop(control_plane);
    result
}

async fn run_demo(
    control_plane: &ControlPlane,
    operator_binary: &Path,
    args: DemoArgs,
    mut stopped: Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let google = GoogleEmulator::start().await.context("starting the Google emulator")?;
    let minting = [
        Endpoint::Sts,
        Endpoint::GenerateAccessToken,
        Endpoint::FetchAccessToken,
        Endpoint::GenerateIdToken,
        Endpoint::MetadataIdentity,
        Endpoint::FetchReadToken,
        Endpoint::FetchReadWriteToken,
    ];
    for endpoint in minting {
        google.set_lifetime(endpoint, args.token_lifetime);
    }
    // The demo runs exactly what the tests prove to work.
    examples::register(&google, &args.namespace);
    eprintln!("Google emulator on {}", google.base_url());

    let client = control_plane.client().await;
    apply_crds(&client, &[TokenRequest::crd()]).await?;
    let kubeconfig = control_plane.kubeconfig_path();
    kubectl(control_plane, &["create", "namespace", &args.namespace]).await?;

    let log_path = control_plane.log_dir().join("operator.log");
    let extra_args = examples::operator_args(&args.namespace);
    let operator = OperatorProcess::spawn(OperatorOptions {
        binary: operator_binary,
        kubeconfig,
        namespaces: std::slice::from_ref(&args.namespace),
        google: &google.base_url(),
        log_path: log_path.clone(),
        log_filter: "info",
        extra_args: &extra_args,
    })
    .with_context(|| format!("starting {}", operator_binary.display()))?;
    eprintln!(
        "operator running (pid {}); its log: {}",
        operator.pid(),
        log_path.display()
    );

    print!(
        "{}",
        examples::apply(control_plane, &args.namespace)
            .await
            .map_err(anyhow::Error::msg)?
    );
    eprintln!("Ctrl-C stops the demo");
    let mut ticks = tokio::time::interval(args.interval);
    loop {
        tokio::select! {
            // Not fatal: Ctrl-C in a terminal also interrupts a kubectl that is running.
            _ = ticks.tick() => if let Err(e) = show(control_plane, &args.namespace).await {
                eprintln!("{e:#}");
            },
            () = &mut stopped => break,
        }
    }
    drop(operator);
    Ok(())
}

/// `cargo build`s the operator when run through `cargo run` (which builds only this binary), so
/// the demo never runs a stale operator; otherwise expects it next to this program.
async fn build_operator() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating this program")?;
    let binary = me.with_file_name("gcp-token-operator");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = me
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|dir| dir == "release");
        let mut build = tokio::process::Command::new(cargo);
        build.args([
            "build",
            "--package",
            "gcp-token-operator",
            "--bin",
            "gcp-token-operator",
        ]);
        if release {
            build.arg("--release");
        }
        let status = build.status().await.context("running cargo build")?;
        anyhow::ensure!(status.success(), "building the operator failed ({status})");
    }
    anyhow::ensure!(
        binary.exists(),
        "{} does not exist: build it (`cargo build --bins`) or pass --operator",
        binary.display()
    );
    Ok(binary)
}

/// Columns that show refreshes: the expiry moves on and the token's fingerprint changes.
const COLUMNS: &str = "custom-columns=NAME:.metadata.name,FLOW:.status.flow,\
READY:.status.conditions[?(@.type==\"Ready\")].status,REASON:.status.conditions[?(@.type==\"Ready\")].reason,\
SECRET:.status.secretName,EXPIRES:.status.expirationTime,NEXT-REFRESH:.status.nextRefreshTime,\
TOKEN:.status.tokenFingerprint";

/// The TokenRequests, as kubectl shows them.
async fn show(control_plane: &ControlPlane, namespace: &str) -> anyhow::Result<()> {
    let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    println!("\n--- {time}: kubectl get tokenrequests -n {namespace}");
    print!(
        "{}",
        kubectl(control_plane, &["get", "tokenrequests", "-n", namespace, "-o", COLUMNS]).await?
    );
    Ok(())
}

/// The substrate's kubectl, of the server's version.
async fn kubectl(control_plane: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let output = control_plane
        .kubectl()
        .args(args)
        .output()
        .await
        .context("running kubectl")?;
    anyhow::ensure!(
        output.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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
