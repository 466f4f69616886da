//! `kubectl gtr`: the kubectl plugin for TokenRequests (`list`, `status`, `refresh`).
//!
//! It talks to the API server with the caller's kubeconfig and RBAC only (never the operator's),
//! reads TokenRequests and Events, patches one annotation, never reads a Secret and prints no
//! token: only fingerprints. The pure formatting lives in [`format`].

pub mod format;

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand};
use k8s_openapi::{api::core::v1::Event, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::crd::{REFRESH_REQUESTED_ANNOTATION, TokenRequest};

const EXAMPLES: &str = "\
Examples:
  # Every TokenRequest of the current namespace, or of all namespaces
  kubectl gtr list
  kubectl gtr list -A

  # Why is this token unhealthy? When does it expire? What does it depend on?
  kubectl gtr status registry-token -n ci

  # A new token now (for example after fixing an IAM grant), waiting for it
  kubectl gtr refresh registry-token -n ci --wait

  # Refresh every TokenRequest labelled team=payments, in every namespace
  kubectl gtr refresh -l team=payments -A --wait --timeout 2m";

/// Look after the Google tokens that gcp-token-operator keeps in Secrets.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl gtr",
    bin_name = "kubectl gtr",
    version,
    about = "Look after the Google tokens that gcp-token-operator keeps in Secrets",
    long_about = "Look after the Google tokens that gcp-token-operator keeps in Secrets.\n\n\
        `kubectl gtr` lists TokenRequests, explains the state of one (its Ready condition, when \
        its token expires and is refreshed next, what it is minted from, its Events) and asks the \
        operator for a new token at once.\n\n\
        It uses your kubeconfig and your permissions, never the operator's: `list` and `status` \
        need get/list on tokenrequests.gcptoken.dev (and list on events for the Events), \
        `refresh` needs patch. It never reads a Secret and never prints a token, only its \
        fingerprint (the first 12 hex digits of its SHA-256).",
    after_help = EXAMPLES,
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: Command,
}

/// Where to connect, as kubectl's flags of the same names.
#[derive(Debug, Args)]
pub struct Connection {
    /// The kubeconfig file to use (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List TokenRequests: flow, readiness, when the token expires and is refreshed next.
    #[command(
        after_help = "Examples:\n  kubectl gtr list\n  kubectl gtr list -n ci -l team=payments\n  kubectl gtr list -A"
    )]
    List {
        /// List the TokenRequests of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Only those whose labels match, e.g. `team=payments,tier!=dev`.
        #[arg(short = 'l', long, value_name = "SELECTOR")]
        selector: Option<String>,
    },
    /// Explain one TokenRequest: its condition, expiry, failures, source chain and Events.
    #[command(after_help = "Examples:\n  kubectl gtr status registry-token\n  kubectl gtr status registry-token -n ci")]
    Status {
        /// The TokenRequest's name.
        name: String,
    },
    /// Ask the operator for a new token at once (bypasses the backoff of failed attempts).
    #[command(
        long_about = "Ask the operator for a new token at once.\n\n\
            Sets the annotation gcptoken.dev/refresh-requested-at to a new value; the operator \
            mints once per distinct value (not sooner than 10 s after its previous mint of that \
            object, and within the namespace's and Google's budgets), bypassing the backoff of \
            failed attempts, and records the value in status.lastHandledRefreshRequest. With \
            --wait, waits for that and prints the new token's fingerprint, or why it failed; the \
            exit status is non-zero if any refresh failed or did not finish in time.",
        group(ArgGroup::new("which").required(true).args(["name", "selector", "all"])),
        after_help = "Examples:\n  kubectl gtr refresh registry-token --wait\n  \
            kubectl gtr refresh -l team=payments -n ci\n  kubectl gtr refresh --all -A --wait --timeout 2m"
    )]
    Refresh {
        /// The TokenRequest's name.
        name: Option<String>,
        /// Every TokenRequest whose labels match, e.g. `team=payments`.
        #[arg(short = 'l', long, value_name = "SELECTOR")]
        selector: Option<String>,
        /// Every TokenRequest of the namespace (of all namespaces with -A).
        #[arg(long)]
        all: bool,
        /// With -l or --all: in every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,
        /// Wait until the operator has handled the request, and print the outcome.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, e.g. `90s`, `2m`.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Kube(String),
    /// Every outcome already printed; only the exit status remains.
    #[error("{0}")]
    Failed(String),
}

fn kube_error(doing: &str, e: kube::Error) -> Error {
    match e {
        kube::Error::Api(status) if status.is_forbidden() => Error::Kube(format!(
            "{doing}: forbidden: {}\nYour kubeconfig's user lacks the permission; check with \
             `kubectl auth can-i` and ask for it (the plugin never uses the operator's).",
            status.message
        )),
        kube::Error::Api(status) if status.is_not_found() => Error::Kube(format!("{doing}: {}", status.message)),
        kube::Error::Api(status) => Error::Kube(format!("{doing}: {} ({})", status.message, status.reason)),
        other => Error::Kube(format!("{doing}: {other}")),
    }
}

/// The client and default namespace, from the caller's kubeconfig as kubectl finds it.
async fn connect(connection: &Connection) -> Result<(Client, String), Error> {
    let options = KubeConfigOptions {
        context: connection.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &connection.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("reading kubeconfig {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await
        }
        None => Config::from_kubeconfig(&options).await,
    };
    let config = match config {
        Ok(config) => config,
        // As kubectl in a Pod: its ServiceAccount, when there is no kubeconfig at all.
        Err(kubeconfig) if connection.kubeconfig.is_none() && connection.context.is_none() => Config::infer()
            .await
            .map_err(|_| Error::Config(format!("no usable kubeconfig: {kubeconfig}")))?,
        Err(e) => return Err(Error::Config(format!("loading the kubeconfig: {e}"))),
    };
    let namespace = connection
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| Error::Config(format!("building a client: {e}")))?;
    Ok((client, namespace))
}

/// Runs the command, printing to stdout; an error (or a failed refresh) is for a non-zero exit.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let (client, namespace) = connect(&cli.connection).await?;
    let mut out = String::new();
    let result = match cli.command {
        Command::List {
            all_namespaces,
            selector,
        } => list(&client, &namespace, all_namespaces, selector.as_deref(), &mut out).await,
        Command::Status { name } => status(&client, &namespace, &name, &mut out).await,
        Command::Refresh {
            name,
            selector,
            all: _,
            all_namespaces,
            wait,
            timeout,
        } => {
            let target = match (&name, &selector) {
                (Some(name), _) => Target::Name(name.clone()),
                (None, Some(selector)) => Target::Selector(selector.clone()),
                (None, None) => Target::All,
            };
            let scope = if all_namespaces { None } else { Some(namespace.as_str()) };
            return refresh(&client, scope, &target, wait.then_some(timeout)).await;
        }
    };
    print!("{out}");
    result
}

async fn list(
    client: &Client,
    namespace: &str,
    all_namespaces: bool,
    selector: Option<&str>,
    out: &mut String,
) -> Result<(), Error> {
    let api: Api<TokenRequest> = if all_namespaces {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), namespace)
    };
    let mut params = ListParams::default();
    if let Some(selector) = selector {
        params = params.labels(selector);
    }
    let mut items = api
        .list(&params)
        .await
        .map_err(|e| kube_error("listing TokenRequests", e))?
        .items;
    if items.is_empty() {
        if all_namespaces {
            eprintln!("No TokenRequests found.");
        } else {
            eprintln!("No TokenRequests found in namespace {namespace}.");
        }
        return Ok(());
    }
    items.sort_by_key(|tr| (tr.namespace(), tr.name_any()));
    let now = Timestamp::now();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|tr| format::list_row(tr, all_namespaces, now))
        .collect();
    out.push_str(&format::table(
        &format::list_headers(all_namespaces),
        &rows,
        format::TABLE_WIDTH,
        &format::list_cut_first(all_namespaces),
    ));
    Ok(())
}

fn time_line(time: Option<&Time>, now: Timestamp) -> String {
    time.map(|t| format::local_and_relative(t.0, now))
        .unwrap_or_else(|| "-".into())
}

async fn status(client: &Client, namespace: &str, name: &str, out: &mut String) -> Result<(), Error> {
    let api: Api<TokenRequest> = Api::namespaced(client.clone(), namespace);
    let tr = api
        .get(name)
        .await
        .map_err(|e| kube_error(&format!("reading TokenRequest {namespace}/{name}"), e))?;
    let now = Timestamp::now();
    let status = tr.status.clone().unwrap_or_default();
    let dash = |v: Option<&str>| v.unwrap_or("-").to_string();
    let _ = writeln!(out, "Name:             {name}");
    let _ = writeln!(out, "Namespace:        {namespace}");
    let _ = writeln!(out, "Flow:             {}", dash(status.flow.as_deref()));
    let _ = writeln!(out, "Source:           {}", format::source_kind(&tr));
    let _ = writeln!(out, "Secret:           {}", tr.secret_name());
    match tr.ready_condition() {
        Some(c) => {
            let _ = writeln!(out, "Ready:            {} ({})", c.status, c.reason);
            let _ = writeln!(out, "  Message:        {}", c.message);
            let _ = writeln!(
                out,
                "  Since:          {}",
                format::local_and_relative(c.last_transition_time.0, now)
            );
        }
        None => {
            let _ = writeln!(out, "Ready:            Unknown (the operator has not reported yet)");
        }
    }
    let _ = writeln!(
        out,
        "Expires:          {}",
        time_line(status.expiration_time.as_ref(), now)
    );
    let _ = writeln!(
        out,
        "Next refresh:     {}",
        time_line(status.next_refresh_time.as_ref(), now)
    );
    let _ = writeln!(
        out,
        "Last refresh:     {}",
        time_line(status.last_refresh_time.as_ref(), now)
    );
    let _ = writeln!(out, "Failed attempts:  {}", status.failed_attempts.unwrap_or(0));
    let _ = writeln!(
        out,
        "Last failure:     {}",
        time_line(status.last_failure_time.as_ref(), now)
    );
    if let Some(expiry) = &status.expiration_time {
        if expiry.0 > now {
            let _ = writeln!(
                out,
                "If refreshes keep failing, the token expires at {}.",
                format::local_and_relative(expiry.0, now)
            );
        } else {
            let _ = writeln!(
                out,
                "The token in the Secret has expired: at {}.",
                format::local_and_relative(expiry.0, now)
            );
        }
    }
    let _ = writeln!(out, "Fingerprint:      {}", dash(status.token_fingerprint.as_deref()));
    let _ = writeln!(out, "Username:         {}", dash(status.username.as_deref()));
    let wanted = &tr.spec.secret.attach_to_service_accounts;
    if !wanted.is_empty() || !status.attached_service_accounts.is_empty() {
        let attached: Vec<&str> = status
            .attached_service_accounts
            .iter()
            .map(|a| a.service_account.as_str())
            .collect();
        let pending: Vec<&str> = wanted
            .iter()
            .map(String::as_str)
            .filter(|w| !attached.contains(w))
            .collect();
        let _ = writeln!(
            out,
            "Attached to:      {}",
            if attached.is_empty() {
                "-".into()
            } else {
                attached.join(", ")
            }
        );
        if !pending.is_empty() {
            let _ = writeln!(
                out,
                "  Not yet:        {} (see the AttachFailed Events)",
                pending.join(", ")
            );
        }
    }
    if let Some(handled) = &status.last_handled_refresh_request {
        let _ = writeln!(out, "Last refresh request handled: {handled}");
    }
    if let Some(pending) = tr.pending_refresh_request() {
        let _ = writeln!(out, "Refresh requested, not yet handled: {pending}");
    }

    if tr.spec.source.token_request.is_some() {
        let upstreams = match api.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                let _ = writeln!(
                    out,
                    "Source chain:     (cannot list TokenRequests: {})",
                    kube_error("listing", e)
                );
                Vec::new()
            }
        };
        let by_name: BTreeMap<String, &TokenRequest> = upstreams.iter().map(|u| (u.name_any(), u)).collect();
        let links = format::chain(&tr, |n| by_name.get(n).copied());
        let _ = writeln!(out, "Source chain:");
        let _ = writeln!(out, "  {name}   {}", format::ready(&tr));
        for link in links {
            let _ = match link {
                format::Link::Found { name, ready } => {
                    let source = by_name.get(&name).map(|u| format::source_kind(u)).unwrap_or_default();
                    writeln!(out, "  <- {name}   {ready}   source: {source}")
                }
                format::Link::Missing { name } => writeln!(out, "  <- {name}   not found"),
                format::Link::Cycle { name } => writeln!(out, "  <- {name}   (a cycle: already in the chain)"),
            };
        }
    }

    let _ = writeln!(out, "Events:");
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let selector = format!(
        "involvedObject.kind=TokenRequest,involvedObject.name={name},involvedObject.uid={}",
        tr.uid().unwrap_or_default()
    );
    match events.list(&ListParams::default().fields(&selector)).await {
        Ok(list) if list.items.is_empty() => {
            let _ = writeln!(out, "  <none>");
        }
        Ok(list) => {
            let mut items: Vec<(Timestamp, Event)> = list.items.into_iter().map(|e| (event_time(&e), e)).collect();
            items.sort_by_key(|(t, _)| *t);
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|(t, e)| {
                    let count = e.series.as_ref().and_then(|s| s.count).or(e.count).filter(|c| *c > 1);
                    let age = match count {
                        Some(count) => format!("{} (x{count})", format::relative(*t, now)),
                        None => format::relative(*t, now),
                    };
                    vec![
                        age,
                        e.type_.clone().unwrap_or_default(),
                        e.reason.clone().unwrap_or_default(),
                        e.message.clone().unwrap_or_default().replace('\n', " "),
                    ]
                })
                .collect();
            let table = format::table(&["LAST SEEN", "TYPE", "REASON", "MESSAGE"], &rows, usize::MAX, &[]);
            for line in table.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  (cannot list Events: {})", kube_error("listing Events", e));
        }
    }
    Ok(())
}

/// When an Event last happened, whichever API wrote it.
fn event_time(event: &Event) -> Timestamp {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or(event.last_timestamp.as_ref().map(|t| t.0))
        .or(event.event_time.as_ref().map(|t| t.0))
        .or(event.first_timestamp.as_ref().map(|t| t.0))
        .or(event.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

enum Target {
    Name(String),
    Selector(String),
    All,
}

/// One TokenRequest asked to refresh: where, what it held, and the value written.
struct Requested {
    namespace: String,
    name: String,
    fingerprint: Option<String>,
    value: String,
}

async fn refresh(client: &Client, scope: Option<&str>, target: &Target, wait: Option<Duration>) -> Result<(), Error> {
    let (names, show_namespace): (Vec<(String, String)>, bool) = match target {
        Target::Name(name) => (vec![(scope.unwrap_or_default().to_string(), name.clone())], false),
        Target::Selector(_) | Target::All => {
            let api: Api<TokenRequest> = match scope {
                Some(namespace) => Api::namespaced(client.clone(), namespace),
                None => Api::all(client.clone()),
            };
            let mut params = ListParams::default();
            if let Target::Selector(selector) = target {
                params = params.labels(selector);
            }
            let list = api
                .list(&params)
                .await
                .map_err(|e| kube_error("listing TokenRequests", e))?;
            let mut names: Vec<(String, String)> = list
                .items
                .iter()
                .map(|tr| (tr.namespace().unwrap_or_default(), tr.name_any()))
                .collect();
            names.sort();
            (names, scope.is_none())
        }
    };
    if names.is_empty() {
        return Err(Error::Failed("no TokenRequest matched: nothing to refresh".into()));
    }
    let label = |namespace: &str, name: &str| {
        if show_namespace {
            format!("{namespace}/{name}")
        } else {
            name.to_string()
        }
    };

    let mut rng = fastrand::Rng::new();
    let mut requested = Vec::new();
    let mut failures = 0usize;
    for (namespace, name) in names {
        let value = format::refresh_value(Timestamp::now(), &mut rng);
        let patch = serde_json::json!({"metadata": {"annotations": {REFRESH_REQUESTED_ANNOTATION: value}}});
        let api: Api<TokenRequest> = Api::namespaced(client.clone(), &namespace);
        match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(tr) => {
                println!(
                    "{}: refresh requested ({REFRESH_REQUESTED_ANNOTATION}={value})",
                    label(&namespace, &name)
                );
                requested.push(Requested {
                    namespace,
                    name,
                    fingerprint: tr.status.and_then(|s| s.token_fingerprint),
                    value,
                });
            }
            Err(e) => {
                failures += 1;
                eprintln!(
                    "error: {}",
                    kube_error(&format!("patching TokenRequest {namespace}/{name}"), e)
                );
            }
        }
    }

    if let Some(timeout) = wait {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending = requested;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for request in pending {
                let api: Api<TokenRequest> = Api::namespaced(client.clone(), &request.namespace);
                let who = label(&request.namespace, &request.name);
                let tr = match api.get(&request.name).await {
                    Ok(tr) => tr,
                    Err(e) => {
                        failures += 1;
                        eprintln!("error: {}", kube_error(&format!("reading TokenRequest {who}"), e));
                        continue;
                    }
                };
                let status = tr.status.clone().unwrap_or_default();
                if status.last_handled_refresh_request.as_deref() != Some(request.value.as_str()) {
                    still.push(request);
                    continue;
                }
                match tr.ready_condition() {
                    Some(c) if c.status == "True" => {
                        let new = status.token_fingerprint.clone().unwrap_or_else(|| "-".into());
                        let change = match &request.fingerprint {
                            Some(old) if *old == new => format!("unchanged, was {old}"),
                            Some(old) => format!("changed, was {old}"),
                            None => "new".into(),
                        };
                        println!("{who}: refreshed, fingerprint {new} ({change})");
                    }
                    condition => {
                        failures += 1;
                        let (reason, message) = condition
                            .map(|c| (c.reason.as_str(), c.message.as_str()))
                            .unwrap_or(("Unknown", ""));
                        println!(
                            "{who}: refresh failed: {reason}: {message} (failed attempts: {})",
                            status.failed_attempts.unwrap_or(0)
                        );
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                for request in &pending {
                    failures += 1;
                    println!(
                        "{}: timed out after {} waiting for the operator to handle the request",
                        label(&request.namespace, &request.name),
                        humantime::format_duration(timeout)
                    );
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    if failures > 0 {
        return Err(Error::Failed(format!("{failures} refresh(es) did not succeed")));
    }
    Ok(())
}
