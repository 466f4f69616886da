//! Scale and footprint benchmark on the real control plane and the Google emulator.
//!
//! `cargo bench --bench scale -- --count 1000 [--unrelated-secrets 50000]` prints a table:
//! cold start of N TokenRequests against the apiserver-only limit, Google calls and apiserver
//! writes per TokenRequest, restart with N valid tokens, steady-state refreshes, peak RSS.
//! Under `cargo test` it runs a small smoke configuration so the code stays working.

mod common;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use gcp_token_operator::crd::TokenRequest;
use gcp_token_operator_testkit::{
    control_plane::{ControlPlane, apply_crds, create_namespace},
    emulator::{Endpoint, GoogleEmulator},
    operator::{OperatorOptions, OperatorProcess},
};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, CustomResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

/// Each TokenRequest impersonates an account of its own, as in real use: identical exchanges
/// would be folded into one call by the operator and measure nothing.
fn service_account(i: usize) -> String {
    format!("bench-{i}@proj.iam.gserviceaccount.com")
}
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

#[derive(Parser, Debug)]
struct Args {
    /// TokenRequests created at once.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// TokenRequests refreshing continuously during the steady-state window.
    #[arg(long, default_value_t = 500)]
    steady_count: usize,
    /// Token lifetime in the steady-state phase (seconds); at least 11, as the operator refuses a
    /// token that expires within 10 s of its arrival.
    #[arg(long, default_value_t = 15)]
    steady_lifetime: u64,
    /// Length of the steady-state measurement window (seconds).
    #[arg(long, default_value_t = 30)]
    steady_window: u64,
    /// Secrets without the operator's label created before it starts (must not cost memory).
    #[arg(long, default_value_t = 0)]
    unrelated_secrets: usize,
    /// Parallel requests of the apiserver-only baseline and of object creation: the operator's
    /// own default concurrency.
    #[arg(long, default_value_t = 16)]
    parallelism: usize,
    /// Passed by `cargo bench`; absent under `cargo test`, which runs a smoke configuration.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = common::args("scale", |defaults: Args| Args {
        count: 10,
        steady_count: 5,
        steady_lifetime: 12,
        steady_window: 5,
        ..defaults
    });
    let started = Instant::now();
    let control_plane = ControlPlane::start().await.context("starting the control plane")?;
    let client = control_plane.client().await;
    apply_crds(&client, &[TokenRequest::crd()]).await?;
    let google = GoogleEmulator::start().await?;
    for i in 0..args.count.max(args.steady_count) {
        google.add_service_account(&service_account(i), &["*"]);
    }
    let bench = Bench {
        args,
        client,
        control_plane: &control_plane,
        google,
        logs: tempfile::tempdir()?,
    };
    let report = bench.run().await?;
    println!("{report}");
    eprintln!("benchmark finished in {:.0?}", started.elapsed());
    Ok(())
}

struct Bench<'a> {
    args: Args,
    client: Client,
    control_plane: &'a ControlPlane,
    google: GoogleEmulator,
    logs: tempfile::TempDir,
}

/// apiserver write counters, from its own metrics.
#[derive(Clone, Copy, Debug, Default)]
struct Writes {
    /// Creates of the operator's Secrets (each new one is created, then applied).
    secret_creates: f64,
    secrets: f64,
    statuses: f64,
    events: f64,
}

impl<'a> Bench<'a> {
    async fn run(&self) -> anyhow::Result<String> {
        let n = self.args.count;
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));

        // The physical limit: the same writes the operator makes, with no operator.
        let baseline_ns = create_namespace(&self.client, "baseline").await?;
        self.create_token_requests(&baseline_ns, n).await?;
        let baseline = self.apiserver_only(&baseline_ns, n).await?;
        row(
            "apiserver only: N Secret applies + N status patches",
            format!("{:.1} s", baseline.as_secs_f64()),
        );
        // The operator below watches every namespace; the baseline objects must not distract it.
        let baseline_trs: Api<TokenRequest> = Api::namespaced(self.client.clone(), &baseline_ns);
        baseline_trs
            .delete_collection(&Default::default(), &ListParams::default())
            .await?;

        if self.args.unrelated_secrets > 0 {
            let noise_ns = create_namespace(&self.client, "noise").await?;
            let t = Instant::now();
            self.create_unrelated_secrets(&noise_ns, self.args.unrelated_secrets)
                .await?;
            row(
                "unrelated Secrets in the cluster",
                format!("{} (created in {:.0?})", self.args.unrelated_secrets, t.elapsed()),
            );
        }

        let cold_ns = create_namespace(&self.client, "cold").await?;
        let caller = self.caller_token().await?;
        self.put_caller(&cold_ns, &caller).await?;
        self.create_token_requests(&cold_ns, n).await?;
        // All namespaces, so the unrelated Secrets are in its view and only the label selector
        // keeps them out of its cache.
        let namespaces = Vec::new();
        let writes_before = self.writes().await?;
        let calls_before = self.google.calls(Endpoint::GenerateAccessToken);
        let t = Instant::now();
        let mut operator = self.operator(&namespaces, 1)?;
        self.wait_all_ready(&cold_ns, n).await?;
        let cold = t.elapsed();
        let writes = self.writes().await?.since(writes_before);
        let calls = self.google.calls(Endpoint::GenerateAccessToken) - calls_before;
        row(
            &format!("cold start: {n} TokenRequests to Ready"),
            format!("{:.1} s", cold.as_secs_f64()),
        );
        row(
            "cold start / apiserver-only limit",
            format!("{:.2}x", cold.as_secs_f64() / baseline.as_secs_f64()),
        );
        row(
            "Google calls per TokenRequest",
            format!("{:.2}", calls as f64 / n as f64),
        );
        row(
            "Secret creates per TokenRequest",
            format!("{:.2}", writes.secret_creates / n as f64),
        );
        row(
            "Secret applies per TokenRequest",
            format!("{:.2}", writes.secrets / n as f64),
        );
        row(
            "status patches per TokenRequest",
            format!("{:.2}", writes.statuses / n as f64),
        );
        row(
            "event writes per TokenRequest",
            format!("{:.2}", writes.events / n as f64),
        );
        row(&format!("peak RSS after cold start (N = {n})"), rss(&operator));

        // Restart with N valid tokens: nothing to do but resync.
        operator.kill();
        let writes_before = self.writes().await?;
        let calls_before = self.google.requests().len();
        let t = Instant::now();
        let operator = self.operator(&namespaces, 2)?;
        operator
            .wait_ready(Duration::from_secs(600))
            .await
            .map_err(anyhow::Error::msg)?;
        let resync = t.elapsed();
        // Everything synced is reconciled within moments; give it a few seconds to misbehave.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let writes = self.writes().await?.since(writes_before);
        row(
            "restart: time to resync (readyz)",
            format!("{:.1} s", resync.as_secs_f64()),
        );
        row(
            "restart: Google calls",
            format!("{}", self.google.requests().len() - calls_before),
        );
        row(
            "restart: Secret creates + applies + status patches",
            format!("{}", writes.secret_creates + writes.secrets + writes.statuses),
        );
        row(&format!("peak RSS after restart (N = {n})"), rss(&operator));
        drop(operator);

        let steady = self.steady_state().await?;
        rows.extend(steady);

        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut table = format!(
            "| {:width$} | value |\n|{}|-------|\n",
            "measure",
            "-".repeat(width + 2)
        );
        for (k, v) in rows {
            table.push_str(&format!("| {k:width$} | {v} |\n"));
        }
        Ok(table)
    }

    /// Short-lived tokens refreshing continuously: refreshes per second and CPU per refresh.
    async fn steady_state(&self) -> anyhow::Result<Vec<(String, String)>> {
        let m = self.args.steady_count;
        let ns = create_namespace(&self.client, "steady").await?;
        self.google.set_lifetime(
            Endpoint::GenerateAccessToken,
            Duration::from_secs(self.args.steady_lifetime),
        );
        let caller = self.caller_token().await?;
        self.put_caller(&ns, &caller).await?;
        self.create_token_requests(&ns, m).await?;
        let operator = self.operator(std::slice::from_ref(&ns), 3)?;
        self.wait_all_ready(&ns, m).await?;
        // A refresh is a new token in a Secret: counted as Secret writes.
        let writes_before = self.writes().await?;
        let cpu_before = operator.cpu_seconds().unwrap_or_default();
        let window = Duration::from_secs(self.args.steady_window);
        tokio::time::sleep(window).await;
        let refreshes = self.writes().await?.since(writes_before).secrets;
        let cpu = operator.cpu_seconds().unwrap_or_default() - cpu_before;
        let ready = self.count_ready(&ns).await?;
        Ok(vec![
            (
                format!("steady state: {m} TokenRequests, {}s tokens", self.args.steady_lifetime),
                format!("{:.1} refreshes/s", refreshes / window.as_secs_f64()),
            ),
            (
                "CPU per refresh".into(),
                format!("{:.2} ms", 1000.0 * cpu / refreshes.max(1.0)),
            ),
            ("Ready at the end of the window".into(), format!("{ready}/{m}")),
        ])
    }

    fn operator(&self, namespaces: &[String], run: usize) -> anyhow::Result<OperatorProcess> {
        let concurrency = self.args.parallelism.to_string();
        Ok(OperatorProcess::spawn(OperatorOptions {
            binary: Path::new(env!("CARGO_BIN_EXE_gcp-token-operator")),
            kubeconfig: self.control_plane.kubeconfig_path(),
            namespaces,
            google: &self.google.base_url(),
            log_path: self.logs.path().join(format!("operator-{run}.log")),
            log_filter: "warn",
            extra_args: &common::unthrottled_operator_args(&concurrency),
        })?)
    }

    async fn caller_token(&self) -> anyhow::Result<String> {
        self.google
            .set_metadata_service_account("caller@proj.iam.gserviceaccount.com");
        let url = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            self.google.base_url()
        );
        let body: serde_json::Value = reqwest::Client::new()
            .get(url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await?
            .json()
            .await?;
        body["access_token"]
            .as_str()
            .map(String::from)
            .context("no access_token from the metadata server")
    }

    async fn put_caller(&self, ns: &str, token: &str) -> anyhow::Result<()> {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "caller"}, "stringData": {"token": token},
        }))?;
        Api::<Secret>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }

    async fn create_token_requests(&self, ns: &str, n: usize) -> anyhow::Result<()> {
        self.create_many::<TokenRequest>(ns, n, |i| {
            json!({
                "apiVersion": "gcptoken.dev/v1alpha1", "kind": "TokenRequest",
                "metadata": {"name": format!("tr-{i}")},
                "spec": {
                    "flow": {"impersonation": {"serviceAccount": service_account(i), "scopes": [CLOUD_PLATFORM]}},
                    "source": {"secret": {"name": "caller", "key": "token"}},
                },
            })
        })
        .await
    }

    async fn create_unrelated_secrets(&self, ns: &str, n: usize) -> anyhow::Result<()> {
        self.create_many::<Secret>(
            ns,
            n,
            |i| json!({"metadata": {"name": format!("unrelated-{i}")}, "stringData": {"data": "x".repeat(256)}}),
        )
        .await
    }

    /// Creates `n` objects `object(0..n)`, as many at once as the operator's concurrency.
    async fn create_many<K>(
        &self,
        ns: &str,
        n: usize,
        object: impl Fn(usize) -> serde_json::Value,
    ) -> anyhow::Result<()>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        stream::iter(0..n)
            .map(|i| {
                let (api, value) = (api.clone(), object(i));
                async move {
                    let object: K = serde_json::from_value(value)?;
                    api.create(&PostParams::default(), &object).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(self.args.parallelism)
            .try_collect::<()>()
            .await
    }

    /// N Secret applies and N status patches, as the operator makes them, without the operator.
    async fn apiserver_only(&self, ns: &str, n: usize) -> anyhow::Result<Duration> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let trs: Api<TokenRequest> = Api::namespaced(self.client.clone(), ns);
        let params = PatchParams::apply("benchmark").force();
        let params = Arc::new(params);
        let t = Instant::now();
        stream::iter(0..n)
            .map(|i| {
                let (secrets, trs, params) = (secrets.clone(), trs.clone(), params.clone());
                async move {
                    let name = format!("tr-{i}");
                    let secret = json!({
                        "apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "benchmark"}},
                        "data": {"token": "eWEyOS5iZW5jaG1hcms=", "expires_at": "MjAzMC0wMS0wMVQwMDowMDowMFo=", "token_type": "QmVhcmVy"},
                    });
                    secrets.patch(&name, &params, &Patch::Apply(&secret)).await?;
                    let status = json!({
                        "apiVersion": "gcptoken.dev/v1alpha1", "kind": "TokenRequest",
                        "status": {"flow": "impersonation", "conditions": [{
                            "type": "Ready", "status": "True", "reason": "Issued", "message": "benchmark",
                            "lastTransitionTime": "2030-01-01T00:00:00Z"}]},
                    });
                    trs.patch_status(&name, &params, &Patch::Apply(&status)).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(self.args.parallelism)
            .try_collect::<()>()
            .await?;
        Ok(t.elapsed())
    }

    async fn count_ready(&self, ns: &str) -> anyhow::Result<usize> {
        let list = Api::<TokenRequest>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default())
            .await?;
        Ok(list
            .items
            .iter()
            .filter(|tr| tr.ready_condition().is_some_and(|c| c.status == "True"))
            .count())
    }

    /// Follows the TokenRequests with a watch (polling LISTs of thousands of objects would load
    /// the apiserver the operator is being measured against) until all `n` are Ready.
    async fn wait_all_ready(&self, ns: &str, n: usize) -> anyhow::Result<()> {
        let api: Api<TokenRequest> = Api::namespaced(self.client.clone(), ns);
        let mut ready = std::collections::HashSet::new();
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let mut events = std::pin::pin!(events);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
        while ready.len() < n {
            let next = tokio::time::timeout_at(deadline, events.next()).await;
            let tr = match next {
                Err(_) => bail!("only {} of {n} TokenRequests became Ready", ready.len()),
                Ok(None) => bail!("the watch ended"),
                Ok(Some(event)) => event?,
            };
            if tr.ready_condition().is_some_and(|c| c.status == "True") {
                ready.insert(tr.metadata.name.unwrap_or_default());
            }
        }
        Ok(())
    }

    /// Write counters from the apiserver's `/metrics`.
    async fn writes(&self) -> anyhow::Result<Writes> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = self.client.request_text(request).await?;
        let sum = |verb: &str, resource: &str, subresource: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with("apiserver_request_total{"))
                .filter(|l| {
                    l.contains(&format!("verb=\"{verb}\""))
                        && l.contains(&format!("resource=\"{resource}\""))
                        && l.contains(&format!("subresource=\"{subresource}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        // Server-side apply is counted under the verb APPLY, other patches under PATCH.
        let patches = |resource, subresource| sum("APPLY", resource, subresource) + sum("PATCH", resource, subresource);
        Ok(Writes {
            secret_creates: sum("POST", "secrets", ""),
            secrets: patches("secrets", ""),
            statuses: patches("tokenrequests", "status"),
            events: sum("POST", "events", "") + sum("PATCH", "events", ""),
        })
    }
}

impl Writes {
    fn since(self, before: Writes) -> Writes {
        Writes {
            secret_creates: self.secret_creates - before.secret_creates,
            secrets: self.secrets - before.secrets,
            statuses: self.statuses - before.statuses,
            events: self.events - before.events,
        }
    }
}

fn rss(operator: &OperatorProcess) -> String {
    operator
        .peak_rss_kib()
        .map_or_else(|| "n/a".into(), |kib| format!("{:.1} MiB", kib as f64 / 1024.0))
}
