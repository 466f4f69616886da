//! The local demo as a newcomer runs it (`cargo run -p gcp-token-operator-testkit --bin dev-env --
//! demo`): every example shows Ready in its table, and Ctrl-C tears down the control plane, the
//! emulator and the operator.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use gcp_token_operator_testkit::examples;
use kube::ResourceExt;

/// The operator binary, built beside `dev-env` by `cargo test --workspace` (a test cannot name
/// another package's binary).
fn operator_binary() -> std::path::PathBuf {
    let binary = Path::new(env!("CARGO_BIN_EXE_dev-env")).with_file_name("gcp-token-operator");
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build it first)",
        binary.display()
    );
    binary
}

/// The demo as a newcomer runs it: every example shows Ready in its table, and Ctrl-C tears down
/// the control plane, the emulator and the operator.
#[test]
fn demo_shows_every_example_ready_and_cleans_up_on_ctrl_c() {
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_dev-env"))
            .args(["demo", "--interval", "1s"])
            .arg("--operator")
            .arg(operator_binary())
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
