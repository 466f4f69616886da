//! Command line: `run` (the default) and `crd`.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use clap::{Args, CommandFactory, Parser, Subcommand};
use url::Url;

use crate::{
    controller::InitialList,
    fairness::FairnessLimits,
    google::Endpoints,
    leader::{Timing, TimingError},
    ratelimit::{GoogleLimits, Rate, RateSetting},
    source::Ambient,
    telemetry::LogFormat,
    validation::{Policy, ServiceAccountRef},
};

#[derive(Parser, Debug)]
#[command(
    name = "gcp-token-operator",
    version,
    about = "Keeps short-lived Google access tokens fresh in Kubernetes Secrets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `run` options, accepted without the subcommand name.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator (default).
    Run(Box<RunArgs>),
    /// Print the TokenRequest CustomResourceDefinition as YAML.
    Crd,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Namespace to watch; repeat for several. Default: all namespaces.
    #[arg(long = "namespace", env = "GCP_TOKEN_OPERATOR_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// TokenRequests reconciled at once (per watched namespace).
    #[arg(long, env = "GCP_TOKEN_OPERATOR_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// Requests per second to each Google endpoint: `N` for all, `API=N` for one of sts,
    /// iamcredentials, developerconnect, discoveryengine, oauth2, metadata. Repeatable.
    #[arg(
        long = "google-rate-limit",
        env = "GCP_TOKEN_OPERATOR_GOOGLE_RATE_LIMIT",
        value_delimiter = ',',
        default_value = "100"
    )]
    pub google_rate_limits: Vec<RateSetting>,
    /// Requests each Google endpoint may receive at once above its rate. Default: one second's worth.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_GOOGLE_BURST")]
    pub google_burst: Option<NonZeroU32>,
    /// Kubernetes API requests per second (watches included); 0 turns the limit off.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_KUBE_QPS", default_value_t = 100)]
    pub kube_qps: u32,
    /// Kubernetes API requests allowed at once above `--kube-qps`.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_KUBE_BURST", default_value_t = NonZeroU32::new(200).expect("not 0"))]
    pub kube_burst: NonZeroU32,
    /// Mints one namespace may start per second (burst: one second's worth); 0 turns the
    /// per-namespace rate off.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_NAMESPACE_RATE_LIMIT", default_value_t = 100)]
    pub namespace_rate_limit: u32,
    /// Mints one namespace may have in flight while no other namespace mints (fewer while others
    /// do); 0 turns the cap off. Default: half of `--concurrency`.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_NAMESPACE_MAX_IN_FLIGHT")]
    pub namespace_max_in_flight: Option<u32>,
    /// Refreshes found overdue when the operator starts or takes over (e.g. after downtime) are
    /// spread over this window, never later than halfway to the token's expiry.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_REFRESH_SPREAD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub refresh_spread: Duration,
    /// How the watches fetch what exists when they start: `streaming` (a watch whose first
    /// events are the objects, the least memory; needs the apiserver's WatchList feature, on by
    /// default since Kubernetes 1.34), `paged` (lists of pages), or `auto` (streaming where the
    /// apiserver serves it, asked once at start).
    #[arg(long, env = "GCP_TOKEN_OPERATOR_INITIAL_LIST", value_enum, default_value_t = InitialList::Auto)]
    pub initial_list: InitialList,
    /// Address of the health and metrics server.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    #[arg(long, env = "GCP_TOKEN_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Elect a leader among replicas with a Lease; only the leader reconciles.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the Lease used for leader election.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_LEASE_NAME", default_value = "gcp-token-operator")]
    pub lease_name: String,
    /// Namespace of the Lease. Default: the operator's own namespace in a cluster, else the
    /// kubeconfig context's.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a standby waits after it last saw the Lease change before taking it over: the
    /// longest a dead leader delays its successor. Whole seconds, 2s to 1h.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// The leader stops leading once it has not renewed its Lease for `--lease-duration` minus
    /// this, so it stops at least this long before a standby can take over. Whole seconds, at
    /// least 1s, less than `--lease-duration`.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_LEASE_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_grace: Duration,
    /// Security Token Service base URL.
    #[arg(
        long,
        env = "GCP_TOKEN_OPERATOR_STS_ENDPOINT",
        default_value = "https://sts.googleapis.com"
    )]
    pub sts_endpoint: Url,
    /// IAM Credentials base URL.
    #[arg(
        long,
        env = "GCP_TOKEN_OPERATOR_IAM_CREDENTIALS_ENDPOINT",
        default_value = "https://iamcredentials.googleapis.com"
    )]
    pub iam_credentials_endpoint: Url,
    /// Developer Connect base URL.
    #[arg(
        long,
        env = "GCP_TOKEN_OPERATOR_DEVELOPER_CONNECT_ENDPOINT",
        default_value = "https://developerconnect.googleapis.com"
    )]
    pub developer_connect_endpoint: Url,
    /// Discovery Engine base URL. Default: Google's, with the us/eu multi-region hosts chosen from
    /// the data connector's location.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_DISCOVERY_ENGINE_ENDPOINT")]
    pub discovery_engine_endpoint: Option<Url>,
    /// OAuth 2.0 base URL (`/token`, `/tokeninfo`).
    #[arg(
        long,
        env = "GCP_TOKEN_OPERATOR_OAUTH2_ENDPOINT",
        default_value = "https://oauth2.googleapis.com"
    )]
    pub oauth2_endpoint: Url,
    /// GCE metadata server base URL. An address by default, as Google's libraries use: the name
    /// `metadata.google.internal` would go through the pod's DNS search path first.
    #[arg(
        long,
        env = "GCP_TOKEN_OPERATOR_METADATA_ENDPOINT",
        default_value = "http://169.254.169.254"
    )]
    pub metadata_endpoint: Url,
    /// Namespace whose TokenRequests may use the operator's own Google identity
    /// (`source.ambient`); repeat for several. Default: none.
    #[arg(
        long = "ambient-namespace",
        env = "GCP_TOKEN_OPERATOR_AMBIENT_NAMESPACES",
        value_delimiter = ','
    )]
    pub ambient_namespaces: Vec<String>,
    /// The operator's own Google identity as a service_account or authorized_user file, as
    /// Application Default Credentials read it. Default: the metadata server.
    #[arg(long, env = "GOOGLE_APPLICATION_CREDENTIALS")]
    pub ambient_credentials_file: Option<PathBuf>,
    /// The operator's own ServiceAccount, NAMESPACE/NAME: never a source for a TokenRequest.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_SERVICE_ACCOUNT")]
    pub operator_service_account: Option<ServiceAccountRef>,
    /// Let TokenRequests attach their pull Secret to ServiceAccounts of their namespace
    /// (`spec.secret.attachToServiceAccounts`); needs `get` and `patch` on serviceaccounts.
    #[arg(long, env = "GCP_TOKEN_OPERATOR_SERVICE_ACCOUNT_ATTACHMENT")]
    pub service_account_attachment: bool,
}

impl Cli {
    /// Parses the command line, exiting with a usage error also when flags disagree with each
    /// other, which clap cannot check flag by flag.
    pub fn parse_checked() -> Cli {
        Self::try_parse_checked_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    pub fn try_parse_checked_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Self::try_parse_from(args)?;
        let run = match &cli.command {
            Some(Command::Run(run)) => Some(&**run),
            Some(Command::Crd) => None,
            None => Some(&cli.run),
        };
        if let Some(run) = run {
            run.lease_timing()
                .map_err(|e| Cli::command().error(clap::error::ErrorKind::ValueValidation, e))?;
        }
        Ok(cli)
    }
}

impl RunArgs {
    pub fn lease_timing(&self) -> Result<Timing, TimingError> {
        Timing::new(self.lease_duration, self.lease_grace)
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            sts: self.sts_endpoint.clone(),
            iam_credentials: self.iam_credentials_endpoint.clone(),
            developer_connect: self.developer_connect_endpoint.clone(),
            discovery_engine: self.discovery_engine_endpoint.clone(),
            oauth2: self.oauth2_endpoint.clone(),
            metadata: self.metadata_endpoint.clone(),
        }
    }

    pub fn google_limits(&self) -> GoogleLimits {
        let default = NonZeroU32::new(100).expect("not 0");
        GoogleLimits::new(&self.google_rate_limits, default, self.google_burst)
    }

    /// The client-side limit of Kubernetes API requests, if any.
    pub fn kube_rate(&self) -> Option<Rate> {
        NonZeroU32::new(self.kube_qps).map(|per_second| Rate {
            per_second,
            burst: self.kube_burst,
        })
    }

    /// Per-namespace fairness; `controllers` is how many controllers share the slots' budget.
    pub fn fairness_limits(&self, controllers: usize) -> FairnessLimits {
        // `--concurrency 0` is kube-runtime's "unbounded": no slots to share, so no default cap.
        let (slots, half) = match u32::from(self.concurrency) {
            0 => (u32::MAX, 0),
            n => (
                n.saturating_mul(u32::try_from(controllers).unwrap_or(u32::MAX)),
                (n / 2).max(1),
            ),
        };
        FairnessLimits {
            rate: NonZeroU32::new(self.namespace_rate_limit).map(|per_second| Rate {
                per_second,
                burst: per_second,
            }),
            max_in_flight: NonZeroU32::new(self.namespace_max_in_flight.unwrap_or(half)),
            slots,
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            ambient_namespaces: self.ambient_namespaces.iter().cloned().collect(),
            own_service_account: self.operator_service_account.clone(),
            service_account_attachment: self.service_account_attachment,
        }
    }

    pub fn ambient(&self) -> Ambient {
        self.ambient_credentials_file
            .clone()
            .map_or(Ambient::MetadataServer, Ambient::File)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default_and_flags_parse() {
        let cli = Cli::parse_from([
            "gcp-token-operator",
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--sts-endpoint",
            "http://127.0.0.1:9000",
            "--log-format",
            "json",
            "--leader-elect",
            "--lease-duration",
            "20s",
            "--ambient-namespace",
            "team-a,team-b",
            "--operator-service-account",
            "ops/gcp-token-operator",
            "--google-rate-limit",
            "20,sts=5",
            "--kube-qps",
            "0",
        ]);
        let limits = cli.run.google_limits();
        assert_eq!(limits.rate(crate::google::Api::Sts).per_second.get(), 5);
        assert_eq!(limits.rate(crate::google::Api::OAuth2).per_second.get(), 20);
        assert_eq!(cli.run.kube_rate(), None);
        let defaults = Cli::parse_from(["gcp-token-operator"]).run;
        assert_eq!(
            defaults.google_limits().rate(crate::google::Api::Sts).per_second.get(),
            100
        );
        assert_eq!(
            defaults.kube_rate().map(|r| (r.per_second.get(), r.burst.get())),
            Some((100, 200))
        );
        assert_eq!(defaults.refresh_spread, Duration::from_secs(30));
        assert_eq!(defaults.endpoints().metadata.as_str(), "http://169.254.169.254/");
        let fair = defaults.fairness_limits(1);
        assert_eq!(fair.rate.map(|r| (r.per_second.get(), r.burst.get())), Some((100, 100)));
        assert_eq!(fair.max_in_flight.map(NonZeroU32::get), Some(8), "half the concurrency");
        assert_eq!(fair.slots, 16);
        assert_eq!(
            defaults.fairness_limits(3).slots,
            48,
            "one controller per watched namespace"
        );
        let off = Cli::parse_from([
            "gcp-token-operator",
            "--namespace-rate-limit",
            "0",
            "--namespace-max-in-flight",
            "0",
        ])
        .run
        .fairness_limits(1);
        assert_eq!((off.rate, off.max_in_flight), (None, None));
        let one = Cli::parse_from(["gcp-token-operator", "--concurrency", "1"]).run;
        assert_eq!(one.fairness_limits(1).max_in_flight.map(NonZeroU32::get), Some(1));
        let unbounded = Cli::parse_from(["gcp-token-operator", "--concurrency", "0"]).run;
        assert_eq!(unbounded.fairness_limits(1).max_in_flight, None);
        let capped = Cli::parse_from([
            "gcp-token-operator",
            "--concurrency",
            "0",
            "--namespace-max-in-flight",
            "5",
        ])
        .run;
        assert_eq!(capped.fairness_limits(1).max_in_flight.map(NonZeroU32::get), Some(5));
        let policy = cli.run.policy();
        assert_eq!(
            policy.ambient_namespaces.iter().collect::<Vec<_>>(),
            ["team-a", "team-b"]
        );
        assert_eq!(
            policy.own_service_account,
            Some(ServiceAccountRef {
                namespace: "ops".into(),
                name: "gcp-token-operator".into()
            })
        );
        assert!(Cli::try_parse_from(["gcp-token-operator", "--operator-service-account", "no-slash"]).is_err());
        assert!(cli.run.leader_elect);
        assert_eq!(cli.run.lease_duration, Duration::from_secs(20));
        assert_eq!(cli.run.lease_grace, Duration::from_secs(5));
        assert_eq!(
            cli.run.lease_timing().map(Timing::renew_deadline),
            Ok(Duration::from_secs(15))
        );
        assert!(cli.command.is_none());
        assert_eq!(cli.run.namespaces, vec!["a", "b"]);
        assert_eq!(cli.run.endpoints().sts.as_str(), "http://127.0.0.1:9000/");
        assert_eq!(cli.run.endpoints().discovery_engine, None);
        assert_eq!(cli.run.log_format, LogFormat::Json);
    }

    #[test]
    fn lease_flags_that_disagree_are_usage_errors() {
        let parse = |args: &[&str]| {
            let all = ["gcp-token-operator"].iter().chain(args).copied().collect::<Vec<_>>();
            Cli::try_parse_checked_from(all)
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--lease-duration", "2s", "--lease-grace", "1s"]).is_ok());
        assert!(parse(&["run", "--lease-duration", "1h", "--lease-grace", "59m"]).is_ok());
        for (args, message) in [
            (&["--lease-grace", "15s"][..], "must be shorter than --lease-duration"),
            (&["--lease-duration", "10s", "--lease-grace", "20s"], "must be shorter"),
            (&["--lease-duration", "500ms"], "whole seconds"),
            (&["--lease-grace", "1500ms"], "whole seconds"),
            (&["--lease-duration", "1s", "--lease-grace", "1s"], "from 2s to 3600s"),
            (&["--lease-duration", "2h"], "from 2s to 3600s"),
            (&["--lease-grace", "0s"], "at least 1s"),
            (&["run", "--lease-grace", "30s"], "must be shorter"),
        ] {
            let error = parse(args).expect_err(&format!("{args:?} is rejected"));
            assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation, "{args:?}");
            assert!(error.to_string().contains(message), "{args:?}: {error}");
        }
        // `crd` takes no lease flags, so nothing to check.
        assert!(parse(&["crd"]).is_ok());
    }
}
