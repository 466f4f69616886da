//! `examples/` holds one TokenRequest per flow and per source kind, each reaching Ready when applied
//! with kubectl against the control plane, the Google emulator and the operator; and the local
//! demo (`dev-env demo`) runs them and tears everything down on Ctrl-C.

mod support;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use gcp_token_operator::{crd::TokenRequest, render::fingerprint, testkit::examples};
use kube::{CustomResourceExt, ResourceExt};
use serde_json::Value;
use support::{Env, fingerprint as status_fingerprint};

/// The single key of a one-of object such as `spec.flow`.
fn chosen(one_of: &impl serde::Serialize) -> String {
    let value = serde_json::to_value(one_of).unwrap();
    let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 1, "exactly one of {value}");
    keys[0].clone()
}

/// The property names of a one-of object in the CRD schema: every flow, every source kind.
fn schema_choices(field: &str) -> BTreeSet<String> {
    let crd = serde_json::to_value(TokenRequest::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    spec["properties"][field]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn every_flow_and_source_kind_has_an_example() {
    let examples = examples::token_requests();
    let pairs: BTreeSet<(String, String)> = examples
        .iter()
        .map(|tr| (chosen(&tr.spec.flow), chosen(&tr.spec.source)))
        .collect();
    let flows: BTreeSet<String> = pairs.iter().map(|(flow, _)| flow.clone()).collect();
    let sources: BTreeSet<String> = pairs.iter().map(|(_, source)| source.clone()).collect();
    assert_eq!(flows, schema_choices("flow"), "add an example for each flow");
    assert_eq!(sources, schema_choices("source"), "add an example for each source kind");
    for (flow, source) in [
        ("impersonation", "ambient"),
        ("sts", "serviceAccountToken"),
        ("impersonation", "tokenRequest"),
        ("impersonation", "secret"),
        ("developerConnect", "tokenRequest"),
        ("discoveryEngine", "secret"),
    ] {
        assert!(
            pairs.contains(&(flow.to_owned(), source.to_owned())),
            "no {flow} + {source} example"
        );
    }
    let image_pulls = examples.iter().filter(|tr| {
        let secret = serde_json::to_value(&tr.spec.secret).unwrap();
        secret["type"] == "kubernetes.io/dockerconfigjson"
    });
    assert_eq!(image_pulls.count(), 1, "one dockerconfigjson example");
    let names: BTreeSet<String> = examples.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names.len(), examples.len(), "example names are unique");
}

#[tokio::test]
async fn every_example_reaches_ready_when_applied_with_kubectl() {
    let mut env = Env::new("examples").await;
    examples::register(&env.google, &env.namespace);
    let namespace = env.namespace.clone();
    env.operator = Some(env.spawn_operator(&examples::operator_args(&namespace)));
    let applied = examples::apply(env.control_plane.kubeconfig_path(), &env.namespace)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for tr in examples::token_requests() {
        let name = tr.name_any();
        assert!(
            applied.contains(&format!("tokenrequest.gcptoken.dev/{name} created")),
            "{applied}"
        );
        let ready = env.wait_ready(&name).await;
        // The Secret holds the token whose fingerprint the status shows, in the layout asked for.
        let secret = env.secret(&tr.secret_name()).await;
        let data = secret.data.as_ref().expect("Secret data");
        let secret_spec = serde_json::to_value(&tr.spec.secret).unwrap();
        let token = if secret_spec["type"] == "kubernetes.io/dockerconfigjson" {
            assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
            let config: Value = serde_json::from_slice(&data[".dockerconfigjson"].0).unwrap();
            let auths = config["auths"].as_object().unwrap();
            let registries = secret_spec["registries"].as_array().unwrap();
            assert_eq!(auths.len(), registries.len(), "{config}");
            for registry in registries {
                assert!(auths.contains_key(registry.as_str().unwrap()), "{registry} missing");
            }
            let (_, auth) = auths.iter().next().unwrap();
            auth["password"].as_str().unwrap().to_owned()
        } else {
            let key = secret_spec["tokenKey"].as_str().unwrap_or("token");
            String::from_utf8(data[key].0.clone()).unwrap()
        };
        assert_eq!(Some(fingerprint(&token)), status_fingerprint(&ready), "{name}");
        for (label, value) in secret_spec["labels"].as_object().into_iter().flatten() {
            assert_eq!(
                secret.labels().get(label),
                value.as_str().map(str::to_owned).as_ref(),
                "{name}"
            );
        }
    }
    env.assert_no_token_leaked().await;
}

/// The demo as a newcomer runs it: every example shows Ready in its table, and Ctrl-C tears down
/// the control plane, the emulator and the operator.
#[test]
fn demo_shows_every_example_ready_and_cleans_up_on_ctrl_c() {
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_dev-env"))
            .args(["demo", "--interval", "1s"])
            .args(["--operator", env!("CARGO_BIN_EXE_gcp-token-operator")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dev-env demo"),
    );
    let lines = demo.lines();
    let examples: BTreeSet<String> = examples::token_requests().iter().map(ResourceExt::name_any).collect();
    let mut ready = BTreeSet::new();
    let mut output = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.len() < examples.len() {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("not every example showed Ready in time; the demo printed:\n{output}"));
        output += &line;
        output.push('\n');
        // A row of the table: NAME FLOW READY ...
        let columns: Vec<&str> = line.split_whitespace().collect();
        if let [name, _flow, status, ..] = columns.as_slice()
            && examples.contains(*name)
        {
            if *status == "True" {
                ready.insert(name.to_string());
            } else {
                ready.remove(*name);
            }
        }
    }
    let dir = output
        .lines()
        .find_map(|l| l.split_once("logs in ").map(|(_, dir)| dir.trim().to_owned()))
        .expect("the demo names its directory");
    assert!(std::path::Path::new(&dir).exists());

    let interrupt = Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the demo exited with {status}; it printed:\n{output}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} was not removed");
}

/// The demo process, killed if the test fails before it stops.
struct Demo(Child);

impl Demo {
    /// Its stdout and stderr lines, interleaved as they come.
    fn lines(&mut self) -> mpsc::Receiver<String> {
        let (sender, receiver) = mpsc::channel();
        let stdout = self
            .0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = self
            .0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        receiver
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
