//! A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, built from the
//! published Go modules by `substrate.sh`) on loopback, for integration tests and the local demo.
//!
//! Tests share one instance per test binary ([`ControlPlane::shared`]) and each works in a namespace
//! of its own ([`create_namespace`]). Every process is torn down with the test binary, also when it
//! is killed: see the `process` module.

mod helpers;
mod pki;
mod process;

use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Mutex, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Api, Client, Config};

pub use helpers::{apply_crds, create_namespace, create_service_account, mint_token, wait_for, wait_for_deletion};
pub use process::sweep_stale_dirs;

/// How long each component may take to become ready. Start-up takes a few seconds on an idle
/// machine; the margin is for loaded CI machines running several control planes at once.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long kube-apiserver gets to shut down gracefully before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of a component's log quoted in errors.
const LOG_TAIL_LINES: usize = 40;
/// Issuer and audience of ServiceAccount tokens, as on a real cluster.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";

/// Why a control plane could not be started or restarted. Each variant names the failed step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("locating the control-plane binaries: {0}")]
    Binaries(String),
    #[error("{step}: {source}")]
    Files {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("generating keys and certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("loading the admin kubeconfig: {0}")]
    Kubeconfig(#[from] KubeconfigError),
    #[error("building a client: {0}")]
    Client(#[from] kube::Error),
    #[error("starting {component}: {source}")]
    Spawn {
        component: Component,
        #[source]
        source: io::Error,
    },
    #[error("{component} exited during start-up ({status}); last lines of its log:\n{tail}")]
    Exited {
        component: Component,
        status: ExitStatus,
        tail: String,
    },
    #[error("{component} not ready within {timeout:?} (waiting for {what}); last lines of its log:\n{tail}")]
    NotReady {
        component: Component,
        what: &'static str,
        timeout: Duration,
        tail: String,
    },
    #[error("stopping kube-apiserver: {0}")]
    Stop(#[source] io::Error),
}

/// The processes of a control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Etcd,
    ApiServer,
    ControllerManager,
}

impl Component {
    const ALL: [Component; 3] = [Component::Etcd, Component::ApiServer, Component::ControllerManager];

    fn binary(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::ApiServer => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.binary())
    }
}

struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    api_server: u16,
}

impl Ports {
    /// Ports the OS just handed out; all listeners are held until each has one so they differ.
    fn pick() -> io::Result<Ports> {
        let listeners = (0..3)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<io::Result<Vec<_>>>()?;
        let port = |i: usize| listeners[i].local_addr().map(|address| address.port());
        Ok(Ports {
            etcd_client: port(0)?,
            etcd_peer: port(1)?,
            api_server: port(2)?,
        })
    }
}

/// A running control plane. Dropping it kills its processes and removes its directory.
pub struct ControlPlane {
    binaries: PathBuf,
    ports: Ports,
    /// Admin client configuration, read back from the kubeconfig file that it was written to.
    config: Config,
    kubeconfig: PathBuf,
    /// Running processes, in start order.
    processes: Mutex<Vec<(Component, Child)>>,
    /// Flags kube-apiserver gets besides the harness's own (`--name=value`).
    api_server_flags: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager in a fresh temporary directory and
    /// waits until they serve: `/readyz` answers and the `default` ServiceAccount exists (proving
    /// that the controllers run).
    pub async fn start() -> Result<ControlPlane, Error> {
        Self::start_with_api_server_flags(&[]).await
    }

    /// As [`Self::start`], with more kube-apiserver flags, e.g. `("feature-gates",
    /// "WatchList=false")` for an apiserver as an older or differently configured cluster runs it.
    pub async fn start_with_api_server_flags(flags: &[(&str, &str)]) -> Result<ControlPlane, Error> {
        let started = Instant::now();
        sweep_stale_dirs();
        let binaries = locate_binaries().await?;
        let dir = process::create_dir().map_err(files("creating the working directory"))?;
        let ports = Ports::pick().map_err(files("picking free ports"))?;
        let kubeconfig = write_files(dir.path(), ports.api_server)?;
        let config =
            Config::from_custom_kubeconfig(Kubeconfig::read_from(&kubeconfig)?, &KubeConfigOptions::default()).await?;
        // From here on, an early return drops `control_plane`, which kills what was started.
        let control_plane = ControlPlane {
            binaries,
            ports,
            config,
            kubeconfig,
            processes: Mutex::new(Vec::new()),
            api_server_flags: flags.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
            dir,
        };
        control_plane.spawn(Component::Etcd)?;
        control_plane.start_api_server().await?;
        control_plane.spawn(Component::ControllerManager)?;
        control_plane.wait_for_controllers().await?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis(),
            dir = %control_plane.dir.path().display(),
            "control plane ready"
        );
        Ok(control_plane)
    }

    /// The control plane shared by all tests of this test binary, started on first use.
    ///
    /// Tests run on threads of their own, each with its own tokio runtime, so start-up runs once on
    /// a runtime of its own; callers wait for it. Its processes are killed and its directory removed
    /// when the process exits. Panics if it failed to start.
    pub fn shared() -> &'static ControlPlane {
        let started = SHARED.get_or_init(|| {
            // A thread of its own, because the caller may be inside a runtime, where block_on panics.
            let started = std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| error.to_string())?
                    .block_on(ControlPlane::start())
                    .map_err(|error| error.to_string())
            })
            .join()
            .unwrap_or_else(|_| Err("start-up panicked".to_owned()));
            if started.is_ok() {
                // Statics are never dropped: clean up at exit instead.
                // SAFETY: registers a plain `extern "C" fn` that does not unwind.
                unsafe { libc::atexit(tear_down_shared) };
            }
            started
        });
        match started {
            Ok(control_plane) => control_plane,
            Err(error) => panic!("the shared control plane did not start: {error}"),
        }
    }

    /// An admin kubeconfig (group `system:masters`) with the CA embedded.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Where each component appends its output (`etcd.log`, `kube-apiserver.log`, ...).
    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The substrate's `kubectl`, of the same version as the server, as the admin of this control
    /// plane.
    pub fn kubectl(&self) -> tokio::process::Command {
        self.tool("kubectl")
    }

    /// The substrate's `helm` CLI pointed at this control plane, with configuration, cache and data
    /// directories of its own (never the caller's `~/.config/helm`).
    pub fn helm(&self) -> tokio::process::Command {
        let mut command = self.tool("helm");
        let home = self.dir.path().join("helm");
        for (variable, dir) in [
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_DATA_HOME", "data"),
        ] {
            command.env(variable, home.join(dir));
        }
        command
    }

    fn tool(&self, name: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.binaries.join(name));
        command.env("KUBECONFIG", &self.kubeconfig).kill_on_drop(true);
        command
    }

    /// `https://127.0.0.1:PORT`.
    pub fn api_server_url(&self) -> String {
        self.config.cluster_url.to_string().trim_end_matches('/').to_owned()
    }

    /// A new admin client. Build one per test: a client must not outlive the runtime it was built
    /// in, and each `#[tokio::test]` has its own.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("the admin configuration already built a client during start-up")
    }

    /// A new client that authenticates as ServiceAccount `namespace/name` with a token from the
    /// TokenRequest API, so it has exactly the permissions RBAC grants that account.
    pub async fn client_as_service_account(&self, namespace: &str, name: &str) -> anyhow::Result<Client> {
        let admin = self.client().await;
        let (token, _expiration) = mint_token(&admin, namespace, name, &[], 3600).await?;
        let mut config = self.config.clone();
        config.auth_info = AuthInfo {
            token: Some(token.into()),
            ..AuthInfo::default()
        };
        Ok(Client::try_from(config)?)
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL after a grace period), leaving etcd and
    /// kube-controller-manager running. Does nothing if it is not running. Not for the shared
    /// instance: other tests are using it.
    pub async fn stop_api_server(&self) -> Result<(), Error> {
        let running = {
            let mut processes = self.lock_processes();
            let index = processes
                .iter()
                .position(|(component, _)| *component == Component::ApiServer);
            index.map(|index| processes.remove(index).1)
        };
        match running {
            Some(child) => process::terminate(child, STOP_GRACE).await.map_err(Error::Stop),
            None => Ok(()),
        }
    }

    /// Starts kube-apiserver on the same port and etcd (after [`Self::stop_api_server`]) and waits
    /// until it is ready; if it is running, only waits.
    pub async fn start_api_server(&self) -> Result<(), Error> {
        let running = self
            .lock_processes()
            .iter()
            .any(|(component, _)| *component == Component::ApiServer);
        if !running {
            self.spawn(Component::ApiServer)?;
        }
        let client = self.probe_client()?;
        self.wait_until(Component::ApiServer, "/readyz", async || {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request is valid");
            client.request_text(request).await.is_ok()
        })
        .await
    }

    async fn wait_for_controllers(&self) -> Result<(), Error> {
        let accounts = Api::<ServiceAccount>::namespaced(self.probe_client()?, "default");
        self.wait_until(Component::ControllerManager, "the default ServiceAccount", async || {
            matches!(accounts.get_opt("default").await, Ok(Some(_)))
        })
        .await
    }

    /// An admin client for polling: it fails fast instead of retrying or hanging.
    fn probe_client(&self) -> Result<Client, Error> {
        let mut config = self.config.clone();
        config.default_retry = false;
        config.read_timeout = Some(Duration::from_secs(5));
        Ok(Client::try_from(config)?)
    }

    /// Polls `ready` until it holds, failing early if any process has exited.
    async fn wait_until(
        &self,
        component: Component,
        what: &'static str,
        ready: impl AsyncFn() -> bool,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_running()?;
            if ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    component,
                    what,
                    timeout: READY_TIMEOUT,
                    tail: self.log_tail(component),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_running(&self) -> Result<(), Error> {
        for (component, child) in self.lock_processes().iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Exited {
                    component: *component,
                    status,
                    tail: self.log_tail(*component),
                });
            }
        }
        Ok(())
    }

    fn spawn(&self, component: Component) -> Result<(), Error> {
        let child = process::spawn(
            &self.binaries.join(component.binary()),
            &self.args(component),
            &self.log_path(component),
        )
        .map_err(|source| Error::Spawn { component, source })?;
        self.lock_processes().push((component, child));
        Ok(())
    }

    fn args(&self, component: Component) -> Vec<OsString> {
        let dir = self.dir.path();
        let file = |name: &str| dir.join(name).into_os_string();
        let Ports {
            etcd_client,
            etcd_peer,
            api_server,
        } = self.ports;
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut args: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            let mut arg = OsString::from(format!("--{name}="));
            arg.push(value);
            args.push(arg);
        };
        match component {
            Component::Etcd => {
                flag("data-dir", file("etcd"));
                flag("listen-client-urls", etcd_url.clone().into());
                flag("advertise-client-urls", etcd_url.into());
                flag("listen-peer-urls", peer_url.clone().into());
                flag("initial-advertise-peer-urls", peer_url.clone().into());
                flag("initial-cluster", format!("default={peer_url}").into());
                // Test data is short-lived: never wait for the disk. The quota is etcd's default:
                // 10,000 objects refreshing between two of the apiserver's five-minutely
                // compactions outgrow 256 MiB; the file only grows as far as it is used.
                flag("quota-backend-bytes", "2147483648".into());
                flag("snapshot-count", "5000".into());
                flag("unsafe-no-fsync", "true".into());
            }
            Component::ApiServer => {
                flag("etcd-servers", etcd_url.into());
                flag("bind-address", "127.0.0.1".into());
                flag("advertise-address", "127.0.0.1".into());
                flag("secure-port", api_server.to_string().into());
                flag("cert-dir", file("apiserver-certs"));
                flag("tls-cert-file", file("serving.crt"));
                flag("tls-private-key-file", file("serving.key"));
                flag("client-ca-file", file("ca.crt"));
                flag("token-auth-file", file("tokens.csv"));
                flag("authorization-mode", "RBAC".into());
                flag("service-account-issuer", SERVICE_ACCOUNT_ISSUER.into());
                flag("api-audiences", SERVICE_ACCOUNT_ISSUER.into());
                flag("service-account-key-file", file("service-account.pub"));
                flag("service-account-signing-key-file", file("service-account.key"));
                flag("service-cluster-ip-range", "10.0.0.0/24".into());
                // The endpoints of the `kubernetes` Service cannot be a loopback address.
                flag("endpoint-reconciler-type", "none".into());
                // Its bootstrap objects slow start-up, and tests never saturate the server.
                flag("enable-priority-and-fairness", "false".into());
                for (name, value) in &self.api_server_flags {
                    flag(name, value.into());
                }
            }
            Component::ControllerManager => {
                flag("kubeconfig", file("kubeconfig"));
                // Namespace deletion, ownerReference garbage collection, the `default`
                // ServiceAccount of each namespace (and tokens of Secrets that ask for one),
                // Deployments with their ReplicaSets (a rolling restart shows as a new ReplicaSet;
                // no node runs the pods), and the type check of ValidatingAdmissionPolicies
                // (written to their status).
                flag(
                    "controllers",
                    "garbage-collector-controller,namespace-controller,serviceaccount-controller,\
                     serviceaccount-token-controller,deployment-controller,replicaset-controller,\
                     validatingadmissionpolicy-status-controller"
                        .into(),
                );
                flag("service-account-private-key-file", file("service-account.key"));
                flag("root-ca-file", file("ca.crt"));
                flag("use-service-account-credentials", "false".into());
                flag("leader-elect", "false".into());
                // No serving port, so parallel control planes cannot collide on it.
                flag("secure-port", "0".into());
            }
        }
        args
    }

    fn log_path(&self, component: Component) -> PathBuf {
        self.dir.path().join(format!("{component}.log"))
    }

    fn log_tail(&self, component: Component) -> String {
        process::log_tail(&self.log_path(component), LOG_TAIL_LINES)
    }

    fn lock_processes(&self) -> std::sync::MutexGuard<'_, Vec<(Component, Child)>> {
        // A panic while holding the lock leaves the list intact.
        self.processes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let processes = self.processes.get_mut().unwrap_or_else(PoisonError::into_inner);
        kill_all(processes);
    }
}

/// Kills the newest first, so nothing sees its dependencies vanish while it still runs.
fn kill_all(processes: &mut Vec<(Component, Child)>) {
    while let Some((_, mut child)) = processes.pop() {
        process::kill(&mut child);
    }
}

extern "C" fn tear_down_shared() {
    let Some(Ok(control_plane)) = SHARED.get() else {
        return;
    };
    // Never block at exit: if another thread holds the lock, the parent-death signal still kills
    // the processes, and a later run sweeps the directory.
    match control_plane.processes.try_lock() {
        Ok(mut processes) => kill_all(&mut processes),
        Err(TryLockError::Poisoned(poisoned)) => kill_all(&mut poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => return,
    }
    let _ = fs::remove_dir_all(control_plane.dir.path());
}

fn files(step: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Files { step, source }
}

/// The command-line tools tests run beside the control plane.
const TOOLS: [&str; 2] = ["kubectl", "helm"];

/// `$KUBEBUILDER_ASSETS` if it holds the three binaries and the tools (envtest's assets lack
/// kube-controller-manager and helm), else whatever `substrate.sh` prints; it builds and caches them on
/// first use. Located once per process, so parallel start-ups never build twice.
async fn locate_binaries() -> Result<PathBuf, Error> {
    static LOCATED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    tokio::task::spawn_blocking(|| LOCATED.get_or_init(run_locate_script).clone())
        .await
        .map_err(|error| Error::Binaries(error.to_string()))?
        .map_err(Error::Binaries)
}

fn run_locate_script() -> Result<PathBuf, String> {
    if let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from)
        && Component::ALL
            .iter()
            .map(|component| component.binary())
            .chain(TOOLS)
            .all(|binary| assets.join(binary).is_file())
    {
        return Ok(assets);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("substrate.sh");
    // Its progress goes to our stderr: a first build takes minutes and should say so.
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|error| format!("running {}: {error}", script.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed: {}", script.display(), output.status));
    }
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Ok(PathBuf::from(dir))
}

/// Writes keys, certificates, the static token file and the admin kubeconfig; returns the
/// kubeconfig's path.
fn write_files(dir: &Path, api_server_port: u16) -> Result<PathBuf, Error> {
    let pki = pki::generate()?;
    let admin_token: String = std::iter::repeat_with(fastrand::alphanumeric).take(32).collect();
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "gto-test",
            "cluster": {
                "server": format!("https://127.0.0.1:{api_server_port}"),
                "certificate-authority-data":
                    base64::engine::general_purpose::STANDARD.encode(&pki.ca_cert),
            },
        }],
        "users": [{"name": "admin", "user": {"token": admin_token}}],
        "contexts": [{"name": "gto-test", "context": {"cluster": "gto-test", "user": "admin"}}],
        "current-context": "gto-test",
    });
    let kubeconfig = serde_saphyr::to_string(&kubeconfig).expect("a JSON value always serializes to YAML");
    let contents = [
        ("ca.crt", pki.ca_cert),
        ("serving.crt", pki.serving_cert),
        ("serving.key", pki.serving_key),
        ("service-account.key", pki.service_account_key),
        ("service-account.pub", pki.service_account_public_key),
        // token,user,uid,"groups": system:masters bypasses RBAC.
        ("tokens.csv", format!("{admin_token},admin,admin,\"system:masters\"\n")),
        ("kubeconfig", kubeconfig),
    ];
    for (name, text) in contents {
        fs::write(dir.join(name), text).map_err(files("writing the configuration files"))?;
    }
    Ok(dir.join("kubeconfig"))
}
