//! The same job run by this operator and by the tools users would pick instead, one after the
//! other on one control plane and one Google emulator, in one table.
//!
//! `cargo bench --bench peers -- --count 1000 [--lifetime 600 --lifetimes 3]`. The job: N
//! workloads, each needing an Artifact Registry pull Secret (dockerconfigjson) with a fresh token
//! for its own Google service account. Every system gets, in namespaces of its own: a cold start
//! of N objects, a restart with N valid tokens, then N objects under short-lived tokens, with new
//! objects created while those refresh. A Secret counts as done when the emulator knows its token
//! as live and issued for that workload's service account.
//!
//! The peers are built from their published Go modules by `benches/peers/go.mod`, cached under
//! `~/.cache/gcp-token-operator/peers/`. Under `cargo test` a tiny configuration runs every
//! system, so the benchmark cannot rot. See docs/performance.md for the configurations and what
//! each peer cannot do.

mod common;

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt, stream};
use gcp_token_operator::crd::TokenRequest;
use gcp_token_operator_testkit::{
    control_plane::{ControlPlane, apply_crds, create_namespace},
    emulator::{Endpoint, GoogleEmulator, InterceptingProxy},
    operator::{OperatorOptions, OperatorProcess},
};
use k8s_openapi::{
    api::core::v1::{Secret, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use sha2::Digest as _;

const AUDIENCE: &str = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool/providers/k8s";
const REGISTRY: &str = "us-docker.pkg.dev";
const ESO_MODULE: &str = "github.com/external-secrets/external-secrets";
/// Token lifetime outside the short-lived phase: Google's default.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// The Google endpoints whose tokens end up in the Secrets, one per system's flow.
const TOKEN_ENDPOINTS: [Endpoint; 3] = [Endpoint::Sts, Endpoint::GenerateAccessToken, Endpoint::OAuthToken];

/// Workload `i`'s own Google service account.
fn google_account(i: usize) -> String {
    format!("peer-{i}@proj.iam.gserviceaccount.com")
}

/// Workload `i`'s pull Secret, and the object that asks for it.
fn pull_name(i: usize) -> String {
    format!("pull-{i}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum System {
    /// This operator: one TokenRequest per workload (STS with impersonation, from the
    /// workload's ServiceAccount token).
    Operator,
    /// External Secrets Operator: a GCRAccessToken generator and an ExternalSecret per workload.
    ExternalSecrets,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Operator => "this operator",
            System::ExternalSecrets => "External Secrets",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            System::Operator => "op",
            System::ExternalSecrets => "eso",
        }
    }
}

#[derive(Parser, Debug)]
struct Args {
    /// Workloads, each with a pull Secret of its own.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Token lifetime in the short-lived phase (seconds); at least 11, as the operator refuses a
    /// token that expires within 10 s of its arrival.
    #[arg(long, default_value_t = 600)]
    lifetime: u64,
    /// Length of the short-lived phase, in token lifetimes.
    #[arg(long, default_value_t = 3)]
    lifetimes: u32,
    /// New objects created one after another during the short-lived phase, each timed until its
    /// Secret holds a valid token.
    #[arg(long, default_value_t = 20)]
    probes: usize,
    /// How long a restarted system is watched for calls and writes (seconds).
    #[arg(long, default_value_t = 30)]
    restart_window: u64,
    /// Concurrent reconciles of every system (the operator's default), and parallel creates.
    #[arg(long, default_value_t = 16)]
    parallelism: usize,
    /// Systems to run, in order; the operator first, as the ratios' reference.
    #[arg(long, value_delimiter = ',', default_values = ["operator", "external-secrets"])]
    systems: Vec<System>,
    /// Passed by `cargo bench`; absent under `cargo test`, which runs a tiny configuration.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = common::args("peers", |defaults: Args| Args {
        count: 3,
        lifetime: 15,
        lifetimes: 2,
        probes: 2,
        restart_window: 5,
        ..defaults
    });
    ensure!(args.lifetime >= 11, "--lifetime must be at least 11 s");
    ensure!(
        args.systems.first() == Some(&System::Operator),
        "--systems must start with operator"
    );
    let started = Instant::now();
    let peers = if args.systems.contains(&System::ExternalSecrets) {
        Some(build_external_secrets()?)
    } else {
        None
    };
    let control_plane = ControlPlane::start().await.context("starting the control plane")?;
    let client = control_plane.client().await;
    let mut crds = vec![TokenRequest::crd()];
    if let Some(eso) = &peers {
        crds.extend(eso.crds()?);
    }
    apply_crds(&client, &crds).await?;
    let google = Arc::new(GoogleEmulator::start().await?);
    google.add_workload_identity_provider(AUDIENCE);
    // The peers are unmodified: they reach Google's own hosts, through the emulator's proxy.
    let proxy = google.start_intercepting_proxy().await?;
    // One RSA key serves every service account key file: signing costs the same, and generating
    // thousands of keys would only slow the set-up down.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).context("RSA key generation")?;
    for i in 0..args.count + args.probes {
        google.add_service_account(&google_account(i), &["*"]);
        google.add_service_account_key(&google_account(i), &format!("key-{i}"), &key.public_key_pem());
    }
    let bench = Bench {
        client,
        control_plane: &control_plane,
        google,
        proxy,
        private_key_pem: key.serialize_pem(),
        external_secrets: peers.map(|p| p.binary),
        logs: tempfile::tempdir()?,
        args,
    };
    let mut results = Vec::new();
    for &system in &bench.args.systems {
        eprintln!("peers: running {}", system.label());
        let figures = bench
            .run(system)
            .await
            .with_context(|| format!("running {}", system.label()))?;
        results.push((system, figures));
        if results.len() < bench.args.systems.len() {
            // So far, in case a later system ends the run.
            eprintln!("{}", bench.table(&results));
        }
    }
    println!("{}", bench.table(&results));
    eprintln!("benchmark finished in {:.0?}", started.elapsed());
    Ok(())
}

struct Bench<'a> {
    args: Args,
    client: Client,
    control_plane: &'a ControlPlane,
    google: Arc<GoogleEmulator>,
    proxy: InterceptingProxy,
    private_key_pem: String,
    external_secrets: Option<PathBuf>,
    logs: tempfile::TempDir,
}

/// One system's figures; lower is better for each.
#[derive(Default)]
struct Figures {
    cold_start: f64,
    cold_rss: f64,
    cold_cpu: f64,
    cold_google_calls: f64,
    cold_requests: f64,
    cold_writes: f64,
    restart_google_calls: f64,
    restart_writes: f64,
    restart_rss: f64,
    probe_p50: f64,
    probe_p99: f64,
    probe_timeouts: f64,
    refresh_unfilled: f64,
    expired_object_seconds: f64,
    expired_seconds: f64,
    refresh_tokens: f64,
    refresh_cpu: f64,
    refresh_rss: f64,
}

impl Bench<'_> {
    async fn run(&self, system: System) -> anyhow::Result<Figures> {
        let n = self.args.count;
        let mut figures = Figures::default();
        let all: Vec<usize> = (0..n).collect();

        // Cold start: N objects waiting, then the system starts.
        let ns = create_namespace(&self.client, &format!("{}-cold", system.prefix())).await?;
        self.create_workloads(system, &ns, 0..n, DEFAULT_LIFETIME).await?;
        let tracker = Tracker::start(&self.client, &ns, &self.google);
        let (api_before, calls_before) = (self.api_counts().await?, self.google_calls());
        let by_endpoint = self.calls_by_endpoint();
        let t = Instant::now();
        let process = self.spawn(system, &ns, 1)?;
        tracker.wait_valid(&all, Duration::from_secs(1800), &process).await?;
        figures.cold_start = t.elapsed().as_secs_f64();
        figures.cold_cpu = process.cpu_seconds();
        figures.cold_rss = process.peak_rss_mib();
        let api = self.api_counts().await?.since(api_before);
        figures.cold_google_calls = (self.google_calls() - calls_before) as f64 / n as f64;
        let calls: Vec<String> = (self.calls_by_endpoint().iter().zip(&by_endpoint))
            .filter(|((_, after), (_, before))| after > before)
            .map(|((endpoint, after), (_, before))| format!("{endpoint:?} {}", after - before))
            .collect();
        eprintln!(
            "peers: {} cold start, Google calls: {}",
            system.label(),
            calls.join(", ")
        );
        figures.cold_requests = api.requests / n as f64;
        figures.cold_writes = api.writes / n as f64;

        // Restart with N valid tokens: there is nothing to do.
        drop(process);
        let (api_before, calls_before) = (self.api_counts().await?, self.google_calls());
        let process = self.spawn(system, &ns, 2)?;
        tokio::time::sleep(Duration::from_secs(self.args.restart_window)).await;
        figures.restart_google_calls = (self.google_calls() - calls_before) as f64;
        figures.restart_writes = self.api_counts().await?.since(api_before).writes;
        figures.restart_rss = process.peak_rss_mib();
        drop(process);
        drop(tracker);

        // Short-lived tokens: N objects refreshing, new ones timed meanwhile.
        let lifetime = Duration::from_secs(self.args.lifetime);
        for endpoint in TOKEN_ENDPOINTS {
            self.google.set_lifetime(endpoint, lifetime);
        }
        let ns = create_namespace(&self.client, &format!("{}-refresh", system.prefix())).await?;
        self.create_workloads(system, &ns, 0..n, lifetime).await?;
        let tracker = Tracker::start(&self.client, &ns, &self.google);
        let process = self.spawn(system, &ns, 3)?;
        let window = lifetime * self.args.lifetimes;
        // A system that cannot fill N Secrets within one window has its shortfall recorded, and
        // the window then counts what it leaves expired, instead of the run ending without a table.
        figures.refresh_unfilled = tracker.missing_after(&all, window, &process).await? as f64;
        let (cpu_before, issued_before) = (process.cpu_seconds(), self.google.issued_tokens().len());
        let start = tokio::time::Instant::now();
        let sample = async {
            let (mut object_seconds, mut seconds) = (0, 0);
            for s in 1..=window.as_secs() {
                tokio::time::sleep_until(start + Duration::from_secs(s)).await;
                let expired = tracker.without_valid_token(&all);
                object_seconds += expired;
                seconds += usize::from(expired > 0);
            }
            (object_seconds, seconds)
        };
        let probe = async {
            let spacing = window / u32::try_from(self.args.probes.max(1))?;
            let mut latencies = Vec::new();
            let mut timeouts = 0;
            for k in 0..self.args.probes {
                tokio::time::sleep_until(start + spacing * u32::try_from(k)? + spacing / 2).await;
                let i = n + k;
                let t = Instant::now();
                self.create_workloads(system, &ns, i..i + 1, lifetime).await?;
                // Probes that never become valid would otherwise wait a window each, one after
                // another; ending all waits two windows after the start still gives each one window.
                let left = (start + window * 2).saturating_duration_since(tokio::time::Instant::now());
                match tracker.wait_valid(&[i], left, &process).await {
                    Ok(()) => latencies.push(t.elapsed().as_secs_f64()),
                    Err(_) => timeouts += 1,
                }
            }
            anyhow::Ok((latencies, timeouts))
        };
        let ((object_seconds, seconds), probed) = tokio::join!(sample, probe);
        let (mut latencies, timeouts) = probed?;
        figures.refresh_cpu = process.cpu_seconds() - cpu_before;
        // Tokens for the N workloads' own accounts: the probes' and STS's federated ones aside.
        let accounts: std::collections::HashSet<String> = (0..n)
            .map(|i| format!("serviceAccount:{}", google_account(i)))
            .collect();
        let refreshes = self.google.issued_tokens()[issued_before..]
            .iter()
            .filter_map(|token| self.google.token_info(token))
            .filter(|info| accounts.contains(&info.principal))
            .count();
        figures.refresh_tokens = refreshes as f64 / (n as f64 * f64::from(self.args.lifetimes));
        figures.refresh_rss = process.peak_rss_mib();
        figures.expired_object_seconds = object_seconds as f64;
        figures.expired_seconds = seconds as f64;
        latencies.sort_by(f64::total_cmp);
        figures.probe_p50 = percentile(&latencies, 0.50);
        figures.probe_p99 = percentile(&latencies, 0.99);
        figures.probe_timeouts = f64::from(timeouts);
        drop(process);
        for endpoint in TOKEN_ENDPOINTS {
            self.google.set_lifetime(endpoint, DEFAULT_LIFETIME);
        }
        Ok(figures)
    }

    /// The objects of workloads `range` for `system`; `lifetime` is the tokens' lifetime, which
    /// a fixed refresh interval has to be chosen from.
    async fn create_workloads(
        &self,
        system: System,
        ns: &str,
        range: std::ops::Range<usize>,
        lifetime: Duration,
    ) -> anyhow::Result<()> {
        stream::iter(range)
            .map(|i| async move {
                match system {
                    System::Operator => self.create_operator_workload(ns, i).await,
                    System::ExternalSecrets => self.create_external_secrets_workload(ns, i, lifetime).await,
                }
            })
            .buffer_unordered(self.args.parallelism)
            .try_collect::<()>()
            .await
    }

    /// A ServiceAccount of its own and a TokenRequest: its token exchanged at STS, the federated
    /// token impersonating the workload's Google service account, kept as a dockerconfigjson.
    async fn create_operator_workload(&self, ns: &str, i: usize) -> anyhow::Result<()> {
        let account = format!("wl-{i}");
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": account}}))?;
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await?;
        let tr: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "gcptoken.dev/v1alpha1", "kind": "TokenRequest",
            "metadata": {"name": pull_name(i)},
            "spec": {
                "flow": {"sts": {"audience": AUDIENCE, "serviceAccountImpersonation": {"serviceAccount": google_account(i)}}},
                "source": {"serviceAccountToken": {"serviceAccountName": account}},
                "secret": {"type": "kubernetes.io/dockerconfigjson", "registries": [REGISTRY]},
            },
        }))?;
        Api::<TokenRequest>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &tr)
            .await?;
        Ok(())
    }

    /// The service account's key in a Secret, a GCRAccessToken generator using it, and an
    /// ExternalSecret templating its output into a dockerconfigjson, as External Secrets' docs
    /// show. Its refresh interval is fixed: half the token lifetime, as the docs' 30m for 1h tokens.
    async fn create_external_secrets_workload(&self, ns: &str, i: usize, lifetime: Duration) -> anyhow::Result<()> {
        let key_file = json!({
            "type": "service_account",
            "project_id": "proj",
            "private_key_id": format!("key-{i}"),
            "private_key": self.private_key_pem,
            "client_email": google_account(i),
            "client_id": "100000000000000000001",
            "token_uri": "https://oauth2.googleapis.com/token",
        });
        let key: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("key-{i}")},
            "stringData": {"key.json": key_file.to_string()},
        }))?;
        Api::<Secret>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &key)
            .await?;
        let generator = json!({
            "apiVersion": "generators.external-secrets.io/v1alpha1", "kind": "GCRAccessToken",
            "metadata": {"name": pull_name(i)},
            "spec": {
                "projectID": "proj",
                "auth": {"secretRef": {"secretAccessKeySecretRef": {"name": format!("key-{i}"), "key": "key.json"}}},
            },
        });
        let docker_config = format!(
            r#"{{"auths":{{"{REGISTRY}":{{"username":"{{{{ .username }}}}","password":"{{{{ .password }}}}","auth":"{{{{ printf "%s:%s" .username .password | b64enc }}}}"}}}}}}"#
        );
        let external_secret = json!({
            "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
            "metadata": {"name": pull_name(i)},
            "spec": {
                "refreshInterval": format!("{}s", (lifetime / 2).as_secs()),
                "target": {
                    "name": pull_name(i),
                    "template": {"type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": docker_config}},
                },
                "dataFrom": [{"sourceRef": {"generatorRef": {
                    "apiVersion": "generators.external-secrets.io/v1alpha1", "kind": "GCRAccessToken", "name": pull_name(i),
                }}}],
            },
        });
        for (object, plural) in [(generator, "gcraccesstokens"), (external_secret, "externalsecrets")] {
            let object: DynamicObject = serde_json::from_value(object)?;
            let types = object.types.clone().context("an object without apiVersion")?;
            let gvk = GroupVersionKind::try_from(&types)?;
            let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
            Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &resource)
                .create(&PostParams::default(), &object)
                .await?;
        }
        Ok(())
    }

    /// Starts `system` watching `ns` only, with the same concurrency and no client-side limits:
    /// the table compares the systems, not their throttles.
    fn spawn(&self, system: System, ns: &str, run: usize) -> anyhow::Result<Process> {
        let log_path = self.logs.path().join(format!("{}-{run}.log", system.prefix()));
        let concurrency = self.args.parallelism.to_string();
        Ok(match system {
            System::Operator => Process::Operator(OperatorProcess::spawn(OperatorOptions {
                binary: Path::new(env!("CARGO_BIN_EXE_gcp-token-operator")),
                kubeconfig: self.control_plane.kubeconfig_path(),
                namespaces: &[ns.to_owned()],
                google: &self.google.base_url(),
                log_path,
                log_filter: "warn",
                extra_args: &common::unthrottled_operator_args(&concurrency),
            })?),
            System::ExternalSecrets => {
                let binary = self
                    .external_secrets
                    .as_deref()
                    .context("External Secrets was not built")?;
                let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
                let log = std::fs::File::create(&log_path)?;
                let child = Command::new(binary)
                    .args(["--namespace", ns, "--concurrent", &concurrency, "--loglevel", "warn"])
                    // A negative QPS turns client-go's rate limiter off.
                    .args(["--client-qps=-1", "--metrics-addr", &metrics.to_string()])
                    .env("KUBECONFIG", self.control_plane.kubeconfig_path())
                    .envs(self.proxy.env())
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("starting {}", binary.display()))?;
                Process::Peer { child, log_path }
            }
        })
    }

    fn calls_by_endpoint(&self) -> Vec<(Endpoint, usize)> {
        [TOKEN_ENDPOINTS.as_slice(), &[Endpoint::Metadata, Endpoint::TokenInfo]]
            .concat()
            .into_iter()
            .map(|endpoint| (endpoint, self.google.calls(endpoint)))
            .collect()
    }

    fn google_calls(&self) -> usize {
        self.google.requests().len()
    }

    /// The apiserver's own request counters, all clients together: each system runs alone. Lease
    /// traffic (kube-controller-manager's, leader election) is left out.
    async fn api_counts(&self) -> anyhow::Result<ApiCounts> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = self.client.request_text(request).await?;
        let mut counts = ApiCounts::default();
        for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
            if line.contains("resource=\"leases\"") {
                continue;
            }
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            counts.requests += value;
            let write = ["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"]
                .iter()
                .any(|verb| line.contains(&format!("verb=\"{verb}\"")));
            if write {
                counts.writes += value;
            }
        }
        Ok(counts)
    }

    fn table(&self, results: &[(System, Figures)]) -> String {
        let n = self.args.count;
        let (l, k) = (self.args.lifetime, self.args.lifetimes);
        type Row = (String, fn(&Figures) -> f64, &'static str);
        let rows: Vec<Row> = vec![
            (
                format!("cold start: all {n} Secrets hold a valid token"),
                |f| f.cold_start,
                "s",
            ),
            ("peak RSS, cold start".into(), |f| f.cold_rss, "MiB"),
            ("CPU, cold start".into(), |f| f.cold_cpu, "s"),
            (
                "Google calls per object, cold start".into(),
                |f| f.cold_google_calls,
                "",
            ),
            (
                "apiserver requests per object, cold start".into(),
                |f| f.cold_requests,
                "",
            ),
            ("apiserver writes per object, cold start".into(), |f| f.cold_writes, ""),
            (
                "restart with valid tokens: Google calls".into(),
                |f| f.restart_google_calls,
                "",
            ),
            (
                "restart with valid tokens: apiserver writes".into(),
                |f| f.restart_writes,
                "",
            ),
            ("peak RSS, restarted".into(), |f| f.restart_rss, "MiB"),
            (
                format!("{l} s tokens: a new object to a valid token, p50"),
                |f| f.probe_p50,
                "s",
            ),
            (
                format!("{l} s tokens: a new object to a valid token, p99"),
                |f| f.probe_p99,
                "s",
            ),
            (
                format!("{l} s tokens: new objects not valid within {k} lifetimes"),
                |f| f.probe_timeouts,
                "",
            ),
            (
                format!("{l} s tokens: of {n} new Secrets, without a valid token after {k} lifetimes"),
                |f| f.refresh_unfilled,
                "",
            ),
            (
                format!("{l} s tokens over {k} lifetimes: Secret-seconds without a valid token"),
                |f| f.expired_object_seconds,
                "",
            ),
            (
                format!("{l} s tokens over {k} lifetimes: seconds any Secret lacked one"),
                |f| f.expired_seconds,
                "",
            ),
            (
                format!("{l} s tokens: tokens issued per object per lifetime"),
                |f| f.refresh_tokens,
                "",
            ),
            (format!("{l} s tokens: CPU over {k} lifetimes"), |f| f.refresh_cpu, "s"),
            (format!("{l} s tokens: peak RSS"), |f| f.refresh_rss, "MiB"),
        ];
        let mut header = vec!["measure".to_owned()];
        header.extend(results.iter().map(|(s, _)| s.label().to_owned()));
        header.extend(results.iter().skip(1).map(|(s, _)| format!("{} / operator", s.label())));
        let mut table = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
        for (name, value, unit) in rows {
            let values: Vec<f64> = results.iter().map(|(_, f)| value(f)).collect();
            let mut cells = vec![name];
            cells.extend(
                values
                    .iter()
                    .map(|v| format!("{v:.2}{}{unit}", if unit.is_empty() { "" } else { " " })),
            );
            cells.extend(values.iter().skip(1).map(|&v| ratio(v, values[0])));
            let _ = writeln!(table, "| {} |", cells.join(" | "));
        }
        table
    }
}

fn ratio(value: f64, reference: f64) -> String {
    if reference > 0.0 {
        format!("{:.2}x", value / reference)
    } else if value == 0.0 {
        "both 0".into()
    } else {
        "operator 0".into()
    }
}

/// Nearest-rank percentile of sorted `values`; 0 when there are none.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = (p * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

#[derive(Clone, Copy, Default)]
struct ApiCounts {
    requests: f64,
    writes: f64,
}

impl ApiCounts {
    fn since(self, before: ApiCounts) -> ApiCounts {
        ApiCounts {
            requests: self.requests - before.requests,
            writes: self.writes - before.writes,
        }
    }
}

/// A system under test; killed when dropped.
enum Process {
    Operator(OperatorProcess),
    Peer { child: Child, log_path: PathBuf },
}

impl Process {
    fn pid(&self) -> u32 {
        match self {
            Process::Operator(operator) => operator.pid(),
            Process::Peer { child, .. } => child.id(),
        }
    }

    fn log(&self) -> String {
        let path = match self {
            Process::Operator(operator) => &operator.log_path,
            Process::Peer { log_path, .. } => log_path,
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Peak resident set size (VmHWM) so far, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
        kib.unwrap_or(f64::NAN) / 1024.0
    }

    /// CPU time used so far (user + system), in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // utime and stime are the 14th and 15th fields; the command name before them may hold spaces.
        let ticks: Option<f64> = stat.rsplit_once(')').and_then(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
        });
        ticks.unwrap_or(f64::NAN) / clock_ticks()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Process::Peer { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let output = Command::new("getconf").arg("CLK_TCK").output();
        let ticks = output
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok());
        ticks.unwrap_or(100.0)
    })
}

/// Follows the pull Secrets of one namespace: for each workload, when the token its Secret holds
/// expires, if the emulator issued it for the workload's own service account.
struct Tracker {
    held: Arc<Mutex<HashMap<usize, SystemTime>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tracker {
    fn start(client: &Client, ns: &str, google: &Arc<GoogleEmulator>) -> Tracker {
        let held = Arc::new(Mutex::new(HashMap::new()));
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let (google, map) = (Arc::clone(google), Arc::clone(&held));
        let task = tokio::spawn(async move {
            let events = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            let mut events = std::pin::pin!(events);
            // The watcher retries by itself; its errors are only reported.
            while let Some(event) = events.next().await {
                let Ok(secret) = event else { continue };
                let name = secret.metadata.name.clone().unwrap_or_default();
                let Some(i) = name.strip_prefix("pull-").and_then(|i| i.parse::<usize>().ok()) else {
                    continue;
                };
                let info = docker_config_token(&secret).and_then(|token| google.token_info(&token));
                let mut held = map.lock().unwrap();
                match info {
                    Some(info) if info.principal == format!("serviceAccount:{}", google_account(i)) => {
                        held.insert(i, info.expires_at);
                    }
                    _ => {
                        held.remove(&i);
                    }
                }
            }
        });
        Tracker { held, task }
    }

    fn without_valid_token(&self, workloads: &[usize]) -> usize {
        let now = SystemTime::now();
        let held = self.held.lock().unwrap();
        workloads
            .iter()
            .filter(|i| held.get(i).is_none_or(|e| *e <= now))
            .count()
    }

    /// Waits until every one of `workloads` holds a valid token; fails early if `process` exits.
    async fn wait_valid(&self, workloads: &[usize], timeout: Duration, process: &Process) -> anyhow::Result<()> {
        let missing = self.missing_after(workloads, timeout, process).await?;
        ensure!(
            missing == 0,
            "{missing} of {} Secrets without a valid token after {timeout:?}; last lines of the log:\n{}",
            workloads.len(),
            process.log()
        );
        Ok(())
    }

    /// How many of `workloads` still lack a valid token once all have one or `timeout` passed.
    async fn missing_after(&self, workloads: &[usize], timeout: Duration, process: &Process) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.without_valid_token(workloads);
            if missing == 0 || Instant::now() > deadline {
                return Ok(missing);
            }
            if std::fs::metadata(format!("/proc/{}", process.pid())).is_err() {
                bail!("the process exited; last lines of its log:\n{}", process.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The password of the first registry in a dockerconfigjson Secret (or, without one, the
/// password half of its `auth`).
fn docker_config_token(secret: &Secret) -> Option<String> {
    let data = secret.data.as_ref()?.get(".dockerconfigjson")?;
    let config: Value = serde_json::from_slice(&data.0).ok()?;
    let entry = config.get("auths")?.as_object()?.values().next()?;
    if let Some(password) = entry.get("password").and_then(Value::as_str) {
        return Some(password.to_owned());
    }
    let auth = base64::engine::general_purpose::STANDARD
        .decode(entry.get("auth")?.as_str()?)
        .ok()?;
    Some(String::from_utf8(auth).ok()?.split_once(':')?.1.to_owned())
}

/// External Secrets, built from benches/peers/go.mod.
struct ExternalSecretsBuild {
    binary: PathBuf,
    go: PathBuf,
}

impl ExternalSecretsBuild {
    /// Its CRDs, from the module as published (`config/crds/bases`).
    fn crds(&self) -> anyhow::Result<Vec<CustomResourceDefinition>> {
        let dir = go_output(&self.go, &["list", "-m", "-f", "{{.Dir}}", ESO_MODULE])?;
        let bases = Path::new(dir.trim()).join("config/crds/bases");
        let mut crds = Vec::new();
        for entry in std::fs::read_dir(&bases).with_context(|| format!("reading {}", bases.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
                let text = std::fs::read_to_string(&path)?;
                crds.push(serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?);
            }
        }
        Ok(crds)
    }
}

fn peers_module() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers")
}

/// `go` with the module's settings: the local toolchain, the checksums in go.sum, no cgo.
fn go_command(go: &Path) -> Command {
    let mut command = Command::new(go);
    command
        .current_dir(peers_module())
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false")
        .env("CGO_ENABLED", "0");
    command
}

fn go_output(go: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = go_command(go).args(args).stderr(Stdio::inherit()).output()?;
    ensure!(
        output.status.success(),
        "go {} failed: {}",
        args.join(" "),
        output.status
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Builds External Secrets once per recipe (go.mod, go.sum, Go version) into the cache, and
/// returns where it is. Concurrent builders wait on a lock instead of building twice.
fn build_external_secrets() -> anyhow::Result<ExternalSecretsBuild> {
    let go = gcp_token_operator_testkit::go::toolchain()
        .context("Go is required to build the peers (it installs as the test substrate needs it)")?;
    let module = peers_module();
    let go_mod = std::fs::read_to_string(module.join("go.mod"))?;
    let go_sum = std::fs::read_to_string(module.join("go.sum"))?;
    let version = go_mod
        .lines()
        .find_map(|l| l.trim().strip_prefix(ESO_MODULE)?.split_whitespace().next())
        .context("benches/peers/go.mod requires no External Secrets version")?
        .to_owned();
    let go_version = go_output(&go, &["version"])?;
    let recipe = hex::encode(sha2::Sha256::digest(format!("{go_mod}{go_sum}{go_version}")));
    let cache = std::env::var_os("GCP_TOKEN_OPERATOR_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("gcp-token-operator")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/gcp-token-operator")))
        .context("no cache directory: set HOME")?
        .join("peers");
    std::fs::create_dir_all(&cache)?;
    let dir = cache.join(format!("external-secrets-{version}-{}", &recipe[..12]));
    let binary = dir.join("external-secrets");
    let lock = std::fs::File::create(cache.join(".lock"))?;
    lock.lock()?;
    if !binary.exists() {
        let scratch = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        eprintln!("peers: building External Secrets {version} (first time only; minutes on 2 cores)");
        let t = Instant::now();
        let mut child = go_command(&go)
            .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
            .arg(scratch.join("external-secrets"))
            .arg(ESO_MODULE)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut errors = String::new();
        child.stderr.take().context("no stderr")?.read_to_string(&mut errors)?;
        let status = child.wait()?;
        ensure!(
            status.success(),
            "building External Secrets {version} failed ({status}):\n{errors}"
        );
        std::fs::rename(&scratch, &dir)?;
        eprintln!(
            "peers: built External Secrets in {:.0?}, cached in {}",
            t.elapsed(),
            dir.display()
        );
    }
    Ok(ExternalSecretsBuild { binary, go })
}
