//! The release image, built as CI builds it (`scripts/image.sh`: the Dockerfile users build, with
//! its two public inputs made offline) and run under podman as the chart runs it: the chart's
//! ServiceAccount with the chart's RBAC (a real `helm install`), the pod spec the API server
//! stored for the chart's Deployment (security context, args, environment, limits), and the
//! in-cluster configuration a pod gets. The Google endpoints are reached by host name over HTTPS,
//! signed by a test CA: the operator trusts it only once it is in the CA bundle the chart's
//! `google.caBundle` mounts.

#[path = "support/helm.rs"]
#[allow(dead_code)] // install, objects and object; tests/chart.rs uses the rest
mod helm;
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use gcp_token_operator_testkit::container::{self, PodContainer, PodOptions};
use gcp_token_operator_testkit::control_plane::{mint_token, wait_for};
use gcp_token_operator_testkit::emulator::Endpoint;
use gcp_token_operator_testkit::examples;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::{Value, json};
use support::{Env, WAIT};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The release and namespace of the chart, with its default names.
const RELEASE: &str = "gcp-token-operator";
/// The names the container reaches Google's STS and IAM Credentials by, in its `/etc/hosts`.
const STS_HOST: &str = "sts.googleapis.test";
const IAM_HOST: &str = "iamcredentials.googleapis.test";
/// The ConfigMap the chart's `google.caBundle` names: as the kubelet would, the test mounts its
/// `ca.crt` where the chart's `SSL_CERT_FILE` says.
const CA_CONFIG_MAP: &str = "google-ca";
/// The examples run: `wif` exchanges the `builder` ServiceAccount's token at STS, `registry`
/// impersonates with the result into a dockerconfigjson Secret.
const EXAMPLES: [&str; 2] = ["sts-serviceaccounttoken.yaml", "dockerconfigjson.yaml"];

/// The Dockerfile's stages as (first line, body).
fn dockerfile_stages() -> Vec<(String, String)> {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    dockerfile
        .split("\nFROM ")
        .skip(1)
        .map(|stage| {
            let (from, body) = stage.split_once('\n').unwrap_or((stage, ""));
            (from.to_owned(), body.to_owned())
        })
        .collect()
}

/// The instructions of a stage, comments and continuation lines left out.
fn instructions(body: &str) -> Vec<String> {
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with(' ') && !line.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_dockerfile_is_what_ci_builds_and_the_readme_documents() {
    let stages = dockerfile_stages();
    let froms: Vec<&str> = stages.iter().map(|(from, _)| from.as_str()).collect();
    // CI replaces exactly the two public inputs; the runtime stage is the same for both.
    assert_eq!(froms[1..], ["${BINARY_FROM} AS binary", "${RUNTIME_BASE}"]);
    // Rust on Debian 12, the runtime's release (scripts/image.sh checks the version against CI's).
    let builder = froms[0]
        .strip_prefix("docker.io/library/")
        .and_then(|from| from.strip_suffix(" AS build"))
        .filter(|image| image.starts_with("rust:") && image.ends_with("-bookworm"))
        .unwrap_or_else(|| panic!("the build stage is {}", froms[0]));
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("\nARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot\n"));
    assert!(dockerfile.contains("\nARG BINARY_FROM=build\n"));
    let runtime = instructions(&stages[2].1);
    assert_eq!(
        runtime,
        [
            "COPY --from=binary /gcp-token-operator /gcp-token-operator",
            "USER 65532:65532",
            "EXPOSE 8080",
            r#"ENTRYPOINT ["/gcp-token-operator"]"#,
            r#"CMD ["run"]"#,
        ]
    );
    assert!(
        instructions(&stages[1].1).is_empty(),
        "the binary stage only names where the binary comes from"
    );

    // The chart runs it as the image's user.
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(Path::new(helm::CHART_DIR).join("values.yaml")).unwrap())
            .unwrap();
    let security = &values["podSecurityContext"];
    assert_eq!(
        runtime[1],
        format!("USER {}:{}", security["runAsUser"], security["runAsGroup"])
    );

    // The README documents the build command (which scripts/image.sh reads from the Dockerfile),
    // the build stage's image, both ways to build, and the base.
    let build = dockerfile
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_suffix(" \\")
                .filter(|l| l.starts_with("cargo build "))
        })
        .expect("the Dockerfile runs cargo build");
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = readme
        .split("\n## Container image\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a README section \"Container image\"");
    for documented in [
        build,
        builder,
        "docker build",
        "scripts/image.sh",
        "gcr.io/distroless/cc-debian12:nonroot",
    ] {
        assert!(
            section.contains(documented),
            "the README's \"Container image\" lacks `{documented}`"
        );
    }
}

#[tokio::test]
async fn the_image_runs_as_the_chart_runs_it() {
    let built = tokio::task::spawn_blocking(|| container::build_image().map(str::to_owned))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let env = Env::new("image").await;
    examples::register(&env.google, &env.namespace);
    let https = env
        .google
        .serve_https(&[STS_HOST, IAM_HOST])
        .await
        .expect("serving the emulator over HTTPS");
    let endpoint = |host: &str| format!("https://{host}:{}", https.port());
    let values = json!({"google": {
        "stsEndpoint": endpoint(STS_HOST),
        "iamCredentialsEndpoint": endpoint(IAM_HOST),
        "caBundle": {"configMapName": CA_CONFIG_MAP},
    }});
    let objects = helm::objects(
        &helm::install(env.control_plane, RELEASE, RELEASE, &values)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    // The chart's default image is the one CI built.
    let rendered = &helm::object(&objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0];
    let reference = rendered["image"].as_str().unwrap();
    assert_eq!(reference, format!("gcp-token-operator:{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(
        container::image_id(reference).unwrap_or_else(|e| panic!("{e}")),
        built,
        "{reference} is not the image scripts/image.sh built"
    );
    // The pod template as the API server stored it, defaults filled in.
    let deployment = Api::<Deployment>::namespaced(env.client.clone(), RELEASE)
        .get(RELEASE)
        .await
        .unwrap();
    let pod = deployment.spec.template.spec.unwrap();
    let grace = Duration::from_secs(pod.termination_grace_period_seconds.unwrap().try_into().unwrap());
    let service_account = pod.service_account_name.clone().unwrap();
    // As the kubelet projects it: the API server's audience, about an hour.
    let (token, _) = mint_token(&env.client, RELEASE, &service_account, &[], 3607)
        .await
        .unwrap();

    let apply = env
        .control_plane
        .kubectl()
        .args(["apply", "--namespace", &env.namespace])
        .args(
            EXAMPLES
                .iter()
                .flat_map(|file| ["--filename".to_owned(), format!("{}/{file}", examples::EXAMPLES_DIR)]),
        )
        .output()
        .await
        .unwrap();
    assert!(apply.status.success(), "{}", String::from_utf8_lossy(&apply.stderr));

    let logs = tempfile::tempdir().unwrap();
    let run = Run {
        env: &env,
        pod: &pod,
        token: &token,
        logs: logs.path(),
    };
    // A bundle without the test CA (another CA's): the handshake fails, and no request reaches
    // Google. The operator is ready all the same, and stops on SIGTERM.
    let other = env.google.serve_https(&[]).await.unwrap();
    let mut untrusting = run.start("untrusting", other.ca().pem());
    run.wait_ready(&mut untrusting).await;
    let log = || untrusting.0.log();
    let wif = wait_for(
        &env.token_requests(),
        "wif",
        WAIT,
        "Ready reason UpstreamUnavailable",
        |tr| support::ready_reason(tr) == Some("UpstreamUnavailable"),
        &log,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let message = &support::ready_condition(&wif).unwrap().message;
    assert!(message.starts_with("sts: request failed"), "{message}");
    assert_eq!(
        env.google.calls(Endpoint::Sts),
        0,
        "a request got through the TLS handshake"
    );
    let untrusting_log = run.stop(untrusting, grace);
    // rustls's verdict: the name resolved and the connection was made; the certificate failed
    // (the other CA has the same name, so its signature is what does not match).
    assert!(
        untrusting_log.contains("invalid peer certificate: BadSignature"),
        "no certificate error logged:\n{untrusting_log}"
    );

    // With the test CA in the chart's bundle (what an admin behind a TLS-intercepting proxy
    // puts there), the same image issues the token.
    let mut trusting = run.start("trusting", https.ca().pem());
    run.wait_ready(&mut trusting).await;
    let log = || trusting.0.log();
    for name in ["wif", "registry"] {
        env.wait_ready_logged(name, &log).await;
    }
    let secret = env
        .wait_secret("registry", "the dockerconfigjson Secret", |s| {
            s.type_.as_deref() == Some("kubernetes.io/dockerconfigjson")
        })
        .await;
    let config = String::from_utf8(secret.data.unwrap()[".dockerconfigjson"].0.clone()).unwrap();
    let issued = env.google.issued_tokens();
    assert!(
        issued.iter().any(|token| config.contains(token)),
        "the Secret holds no token Google issued"
    );
    assert!(env.google.calls(Endpoint::Sts) > 0 && env.google.calls(Endpoint::GenerateAccessToken) > 0);
    let trusting_log = run.stop(trusting, grace);

    let logs = format!("{untrusting_log}{trusting_log}");
    assert!(
        !logs.contains("forbidden"),
        "the API server denied the operator something:\n{logs}"
    );
    // Every token: Google's, and the ServiceAccount token the container authenticated with.
    for secret in issued.iter().chain([&token]) {
        assert!(
            !logs.contains(secret.as_str()),
            "a token appears in the container's log"
        );
    }
    eprintln!("--- the container's log ---\n{logs}");
}

/// One way of running the chart's pod in this test.
struct Run<'a> {
    env: &'a Env<'static>,
    pod: &'a k8s_openapi::api::core::v1::PodSpec,
    token: &'a str,
    logs: &'a Path,
}

impl Run<'_> {
    /// Starts the pod's container, with `ca_pem` as the chart's CA bundle.
    fn start(&self, name: &str, ca_pem: &str) -> (PodContainer, u16) {
        let control_plane = self.env.control_plane;
        let kubeconfig = kube::config::Kubeconfig::read_from(control_plane.kubeconfig_path()).unwrap();
        let cluster = kubeconfig.clusters[0].cluster.clone().unwrap();
        let cluster_ca = base64::engine::general_purpose::STANDARD
            .decode(cluster.certificate_authority_data.unwrap())
            .unwrap();
        let api_server = url::Url::parse(&control_plane.api_server_url()).unwrap();
        let api_server = (
            api_server.host_str().unwrap().parse::<IpAddr>().unwrap(),
            api_server.port().unwrap(),
        );
        // The host's network is shared with the other tests: a free port, on loopback only.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let http_addr = format!("127.0.0.1:{port}");
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        // Readable by the container's user, as a ConfigMap volume's files are (0644).
        let bundle_file = self.logs.join(format!("{name}-ca.crt"));
        std::fs::write(&bundle_file, ca_pem).unwrap();
        std::fs::set_permissions(&bundle_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let container = &self.pod.containers[0];
        let variable = container.env.iter().flatten().find(|v| v.name == "SSL_CERT_FILE");
        let bundle_path = variable
            .and_then(|v| v.value.as_deref())
            .expect("the chart sets SSL_CERT_FILE");
        let mounts = container.volume_mounts.iter().flatten();
        assert!(
            mounts
                .filter(|m| m.name == "ca-bundle")
                .any(|m| bundle_path.starts_with(&m.mount_path)),
            "SSL_CERT_FILE is not in the bundle's volume"
        );
        let bundle = [(bundle_file.as_path(), bundle_path)];
        let container = PodContainer::start(PodOptions {
            pod_name: &format!("{RELEASE}-{name}"),
            namespace: RELEASE,
            pod: self.pod,
            token: self.token,
            cluster_ca: std::str::from_utf8(&cluster_ca).unwrap(),
            api_server,
            env_overrides: &[("GCP_TOKEN_OPERATOR_HTTP_ADDR", &http_addr)],
            hosts: &[(STS_HOST, loopback), (IAM_HOST, loopback)],
            files: &bundle,
            log_path: self.logs.join(format!("{name}.log")),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        (container, port)
    }

    /// Waits until the container's `/readyz` answers 200, as the chart's readiness probe asks.
    async fn wait_ready(&self, (container, port): &mut (PodContainer, u16)) {
        let started = Instant::now();
        let url = format!("http://127.0.0.1:{port}/readyz");
        loop {
            if let Ok(response) = reqwest::get(&url).await
                && response.status() == 200
            {
                return;
            }
            if let Ok(Some(status)) = container.try_wait() {
                panic!("the container exited ({status}):\n{}", container.log());
            }
            assert!(
                started.elapsed() < WAIT,
                "the container was not ready within {WAIT:?}:\n{}",
                container.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, as the kubelet stops a pod: the container exits cleanly within the grace period.
    /// Returns its log.
    fn stop(&self, (mut container, _): (PodContainer, u16), grace: Duration) -> String {
        let (status, took) = container.terminate().unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{}: {status} {took:?} after SIGTERM", container.name());
        let log = container.log();
        assert!(status.success(), "the container exited with {status}:\n{log}");
        assert!(
            took < grace,
            "stopping took {took:?}, over the grace period {grace:?}:\n{log}"
        );
        log
    }
}
