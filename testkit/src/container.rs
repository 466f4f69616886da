//! The operator's release image under podman: built as CI builds it (`scripts/image.sh`), and run
//! as the kubelet would run a pod's container from its spec, with the pod's in-cluster
//! configuration (the ServiceAccount token, the cluster CA and the namespace at
//! `/var/run/secrets/kubernetes.io/serviceaccount`, `KUBERNETES_SERVICE_HOST`/`PORT`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Where a pod's ServiceAccount credentials are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Label naming the process that started a container, so that a later run removes the containers
/// of runs that died without cleaning up.
const OWNER_LABEL: &str = "dev.gcptoken.test-owner";

/// `bash scripts/image.sh ARGS`: the image build, or podman with the project's configuration.
fn image_script() -> Command {
    let mut command = Command::new("bash");
    command.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh"));
    command
}

/// `podman ARGS` with the configuration and image store `scripts/image.sh` uses.
pub fn podman() -> Command {
    let mut command = image_script();
    command.arg("podman");
    command
}

/// Builds or reuses the release image with `scripts/image.sh`, once per process, and returns its
/// ID. The script's progress, inspection and the image's size go to this process's stderr.
pub fn build_image() -> Result<&'static str, String> {
    static BUILT: OnceLock<Result<String, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let output = image_script()
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|error| format!("running scripts/image.sh: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "scripts/image.sh failed ({}); see its messages above",
                output.status
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    });
    built.as_deref().map_err(Clone::clone)
}

/// The ID of the image `reference` names in the project's image store.
pub fn image_id(reference: &str) -> Result<String, String> {
    let output = podman()
        .args(["image", "inspect", "--format", "{{.Id}}", reference])
        .output()
        .map_err(|error| format!("running podman: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "podman image inspect {reference}: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// What a pod's container gets besides its spec.
pub struct PodOptions<'a> {
    pub pod_name: &'a str,
    pub namespace: &'a str,
    /// The pod's spec; its first container is run.
    pub pod: &'a PodSpec,
    /// A token of the pod's ServiceAccount, as the kubelet projects it.
    pub token: &'a str,
    /// The cluster CA certificate (PEM), `ca.crt` beside the token.
    pub cluster_ca: &'a str,
    /// The API server, for `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`; the container
    /// shares the host's network.
    pub api_server: (IpAddr, u16),
    /// Environment variables replacing the spec's (say, a port free on the shared host network).
    pub env_overrides: &'a [(&'a str, &'a str)],
    /// `/etc/hosts` entries of the container.
    pub hosts: &'a [(&'a str, IpAddr)],
    /// Files mounted read-only over the image's: (host path, container path).
    pub files: &'a [(&'a Path, &'a str)],
    /// The container's stdout and stderr go here.
    pub log_path: PathBuf,
}

/// A running container; removed when dropped.
pub struct PodContainer {
    name: String,
    /// The foreground `podman run`, whose exit status is the container's.
    run: Child,
    log_path: PathBuf,
    _credentials: tempfile::TempDir,
}

impl PodContainer {
    /// Starts the pod's first container from its image, as the kubelet would: its command, args,
    /// environment (plain values and the downward API's pod name and namespace), security context
    /// and resource limits, and the pod's ServiceAccount credentials. Settings this cannot honour
    /// are an error, never ignored.
    pub fn start(options: PodOptions<'_>) -> Result<PodContainer, String> {
        sweep_stale_containers();
        let [container] = options.pod.containers.as_slice() else {
            return Err("the pod must have exactly one container".to_owned());
        };
        let image = container.image.as_deref().ok_or("the container names no image")?;
        let credentials = write_credentials(&options).map_err(|error| format!("writing the credentials: {error}"))?;
        let name = format!("gto-{}-{:08x}", options.pod_name, fastrand::u32(..));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--pull=never".into(),
            format!("--name={name}"),
            format!("--label={OWNER_LABEL}={}", std::process::id()),
            "--network=host".into(),
            format!("--hostname={}", options.pod_name),
            // As on a node: the pod's account, its CA and namespace, read-only.
            format!("--volume={}:{SERVICE_ACCOUNT_DIR}:ro", credentials.path().display()),
        ];
        for (host, ip) in options.hosts {
            args.push(format!("--add-host={host}:{ip}"));
        }
        for (source, target) in options.files {
            args.push(format!("--volume={}:{target}:ro", source.display()));
        }
        args.extend(security_flags(options.pod, container)?);
        args.extend(resource_flags(container)?);
        for (variable, value) in environment(&options, container)? {
            args.push(format!("--env={variable}={value}"));
        }
        if let Some(command) = &container.command {
            args.push(format!(
                "--entrypoint={}",
                serde_json::to_string(command).expect("strings serialize")
            ));
        }
        args.push(image.to_owned());
        args.extend(container.args.iter().flatten().cloned());

        let log = std::fs::File::create(&options.log_path).map_err(|error| format!("creating the log: {error}"))?;
        let run = podman()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|error| error.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|error| format!("running podman: {error}"))?;
        Ok(PodContainer {
            name,
            run,
            log_path: options.log_path,
            _credentials: credentials,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the container (and podman, if it failed to start it) printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How the container ended, if it has.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.run.try_wait()
    }

    /// Sends SIGTERM to the container's process, as the kubelet does to stop a pod, and waits
    /// until it has exited: its exit status, and how long it took.
    pub fn terminate(&mut self) -> Result<(ExitStatus, Duration), String> {
        let asked = Instant::now();
        let status = podman()
            .args(["kill", "--signal=TERM", &self.name])
            .stdout(Stdio::null())
            .status()
            .map_err(|error| format!("running podman kill: {error}"))?;
        if !status.success() {
            return Err(format!("podman kill --signal=TERM {} failed ({status})", self.name));
        }
        let exited = self
            .run
            .wait()
            .map_err(|error| format!("waiting for podman run: {error}"))?;
        Ok((exited, asked.elapsed()))
    }
}

impl Drop for PodContainer {
    fn drop(&mut self) {
        if matches!(self.run.try_wait(), Ok(None)) {
            remove_container(&self.name);
            let _ = self.run.wait();
        }
    }
}

fn remove_container(name: &str) {
    let _ = podman()
        .args(["rm", "--force", "--time=0", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes containers whose starting process is gone: a test killed before its `Drop` ran.
fn sweep_stale_containers() {
    let Ok(output) = podman()
        .args(["ps", "--all", "--filter", &format!("label={OWNER_LABEL}")])
        .args([
            "--format",
            &format!("{{{{.Names}}}} {{{{index .Labels \"{OWNER_LABEL}\"}}}}"),
        ])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some((name, owner)) = line.split_once(' ')
            && !Path::new("/proc").join(owner).exists()
        {
            remove_container(name);
        }
    }
}

/// The files of the pod's ServiceAccount volume, readable by any user as the kubelet makes them
/// (mode 0644 without an fsGroup).
fn write_credentials(options: &PodOptions<'_>) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("gto-serviceaccount-").tempdir()?;
    for (file, contents) in [
        ("token", options.token),
        ("ca.crt", options.cluster_ca),
        ("namespace", options.namespace),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, contents)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// The container's environment as the kubelet sets it: the service variables, then the spec's
/// variables (plain values and the downward API's pod name and namespace), then the overrides.
fn environment(options: &PodOptions<'_>, container: &Container) -> Result<BTreeMap<String, String>, String> {
    let (host, port) = options.api_server;
    let mut variables = BTreeMap::from([
        ("KUBERNETES_SERVICE_HOST".to_owned(), host.to_string()),
        ("KUBERNETES_SERVICE_PORT".to_owned(), port.to_string()),
    ]);
    if container.env_from.is_some() {
        return Err("envFrom is not supported".to_owned());
    }
    for variable in container.env.iter().flatten() {
        let value = match (&variable.value, &variable.value_from) {
            (value, None) => value.clone().unwrap_or_default(),
            (None, Some(source)) => match source.field_ref.as_ref().map(|field| field.field_path.as_str()) {
                Some("metadata.name") => options.pod_name.to_owned(),
                Some("metadata.namespace") => options.namespace.to_owned(),
                _ => return Err(format!("the source of {} is not supported: {source:?}", variable.name)),
            },
            (Some(_), Some(_)) => return Err(format!("{} has both a value and a source", variable.name)),
        };
        variables.insert(variable.name.clone(), value);
    }
    for (variable, value) in options.env_overrides {
        variables.insert((*variable).to_owned(), (*value).to_owned());
    }
    Ok(variables)
}

/// The pod's and the container's security context as podman flags. Seccomp `RuntimeDefault` is
/// podman's default profile.
fn security_flags(pod: &PodSpec, container: &Container) -> Result<Vec<String>, String> {
    let pod_context = pod.security_context.clone().unwrap_or_default();
    let context = container.security_context.clone().unwrap_or_default();
    let user = context.run_as_user.or(pod_context.run_as_user);
    let group = context.run_as_group.or(pod_context.run_as_group);
    let non_root = context.run_as_non_root.or(pod_context.run_as_non_root) == Some(true);
    let seccomp = context.seccomp_profile.or(pod_context.seccomp_profile);
    let mut flags = Vec::new();
    match (user, group) {
        (Some(user), Some(group)) => flags.push(format!("--user={user}:{group}")),
        (Some(user), None) => flags.push(format!("--user={user}")),
        // The image's USER, which runAsNonRoot would need to check by name.
        (None, _) => return Err("runAsUser is not set; only numeric users are supported".to_owned()),
    }
    if non_root && user == Some(0) {
        return Err("runAsNonRoot with runAsUser 0: the kubelet refuses to start this".to_owned());
    }
    if let Some(profile) = seccomp
        && profile.type_ != "RuntimeDefault"
    {
        return Err(format!("seccomp profile {} is not supported", profile.type_));
    }
    if context.read_only_root_filesystem == Some(true) {
        // Without podman's tmpfs on /tmp, /var/tmp and /run: Kubernetes mounts none.
        flags.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if context.privileged == Some(true) {
        flags.push("--privileged".into());
    }
    if context.allow_privilege_escalation == Some(false) {
        flags.push("--security-opt=no-new-privileges".into());
    }
    if let Some(capabilities) = context.capabilities {
        for capability in capabilities.drop.iter().flatten() {
            flags.push(format!("--cap-drop={capability}"));
        }
        for capability in capabilities.add.iter().flatten() {
            flags.push(format!("--cap-add={capability}"));
        }
    }
    Ok(flags)
}

/// The container's CPU and memory limits as podman flags.
fn resource_flags(container: &Container) -> Result<Vec<String>, String> {
    let limits = container
        .resources
        .as_ref()
        .and_then(|resources| resources.limits.clone())
        .unwrap_or_default();
    let mut flags = Vec::new();
    for (resource, Quantity(quantity)) in limits {
        match resource.as_str() {
            "cpu" => {
                let cores = match quantity.strip_suffix('m') {
                    Some(millicores) => millicores.parse::<f64>().map(|m| m / 1000.0),
                    None => quantity.parse::<f64>(),
                }
                .map_err(|_| format!("CPU limit {quantity}"))?;
                flags.push(format!("--cpus={cores}"));
            }
            "memory" => {
                let (number, unit) =
                    quantity.split_at(quantity.find(|c: char| !c.is_ascii_digit()).unwrap_or(quantity.len()));
                let scale: u64 = match unit {
                    "" => 1,
                    "Ki" => 1 << 10,
                    "Mi" => 1 << 20,
                    "Gi" => 1 << 30,
                    _ => return Err(format!("memory limit {quantity}: only Ki, Mi and Gi are supported")),
                };
                let bytes = number.parse::<u64>().map_err(|_| format!("memory limit {quantity}"))? * scale;
                flags.push(format!("--memory={bytes}b"));
            }
            other => return Err(format!("limits of {other} are not supported")),
        }
    }
    Ok(flags)
}
