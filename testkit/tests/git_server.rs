//! The Git-over-HTTP server against the real git and curl: the credential files the operator
//! renders are accepted exactly when the check grants them enough.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gcp_token_operator_testkit::git_server::{Access, Credentials, GitServer, README};

const WRITER: (&str, &str) = ("x-access-token", "s3cret");
const READER: (&str, &str) = ("reader", "r");

fn server() -> GitServer {
    GitServer::start(
        |credentials: &Credentials| match (credentials.username.as_str(), credentials.password.as_str()) {
            WRITER => Access::ReadWrite,
            READER => Access::Read,
            _ => Access::Denied,
        },
    )
    .unwrap()
}

/// git as a user with nothing configured but a credential-store file.
struct GitUser {
    home: tempfile::TempDir,
}

impl GitUser {
    fn new(server: &GitServer, credentials: (&str, &str)) -> GitUser {
        let user = GitUser {
            home: tempfile::tempdir().unwrap(),
        };
        user.store(server, credentials);
        user
    }

    /// Replaces the stored credentials, as the operator does when it renews a token.
    fn store(&self, server: &GitServer, (username, password): (&str, &str)) {
        let authority = server.url().replace("http://", "");
        let line = format!("http://{username}:{password}@{authority}\n");
        std::fs::write(self.credential_file(), line).unwrap();
    }

    fn credential_file(&self) -> PathBuf {
        self.home.path().join("git-credentials")
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }

    fn git(&self, dir: &Path, args: &[&str]) -> Output {
        let helper = format!("credential.helper=store --file={}", self.credential_file().display());
        Command::new("git")
            .args(["-c", &helper])
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .envs([
                ("GIT_AUTHOR_NAME", "Tester"),
                ("GIT_AUTHOR_EMAIL", "tester@example.com"),
                ("GIT_COMMITTER_NAME", "Tester"),
                ("GIT_COMMITTER_EMAIL", "tester@example.com"),
            ])
            .output()
            .unwrap()
    }

    fn clone(&self, url: &str) -> Output {
        self.git(self.home.path(), &["clone", url, "clone"])
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn assert_success(output: &Output) {
    assert!(output.status.success(), "{}: {}", output.status, stderr(output));
}

/// git and curl only authenticate once challenged; the challenge must never let them in.
fn assert_no_anonymous_grant(server: &GitServer) {
    let attempts = server.attempts();
    assert!(
        attempts
            .iter()
            .all(|attempt| attempt.username.is_some() || !attempt.granted),
        "{attempts:#?}"
    );
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn clone_with_a_credential_store_file_fetches_the_readme() {
    let server = server();
    let url = server.create_repository("demo").unwrap();
    assert_eq!(url, format!("{}/git/demo.git", server.url()));
    let user = GitUser::new(&server, WRITER);

    assert_success(&user.clone(&url));
    assert_eq!(std::fs::read_to_string(user.dir("clone/README")).unwrap(), README);
    let branch = user.git(&user.dir("clone"), &["branch", "--show-current"]);
    assert_eq!(stdout(&branch), "main");

    let attempts = server.attempts();
    assert_eq!(attempts[0].username, None, "{attempts:#?}");
    assert!(!attempts[0].granted);
    assert!(
        attempts
            .iter()
            .any(|attempt| attempt.granted && attempt.path.ends_with("/git-upload-pack")),
        "{attempts:#?}"
    );
    assert_no_anonymous_grant(&server);
}

#[test]
fn clone_with_wrong_credentials_fails_with_authentication_failed() {
    let server = server();
    let url = server.create_repository("demo").unwrap();
    let user = GitUser::new(&server, ("x-access-token", "expired"));

    let output = user.clone(&url);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("Authentication failed"), "{}", stderr(&output));

    let attempts = server.attempts();
    assert!(attempts.iter().all(|attempt| !attempt.granted), "{attempts:#?}");
    assert!(
        attempts
            .iter()
            .any(|attempt| attempt.username.as_deref() == Some("x-access-token")),
        "{attempts:#?}"
    );
    assert!(!user.dir("clone").exists());
}

#[test]
fn a_reader_clones_but_only_a_writer_pushes() {
    let server = server();
    let url = server.create_repository("demo").unwrap();
    let user = GitUser::new(&server, READER);
    assert_success(&user.clone(&url));
    assert_eq!(std::fs::read_to_string(user.dir("clone/README")).unwrap(), README);

    let work = user.dir("clone");
    std::fs::write(work.join("CHANGE"), "pushed\n").unwrap();
    assert_success(&user.git(&work, &["add", "CHANGE"]));
    assert_success(&user.git(&work, &["commit", "-q", "-m", "Change"]));
    let refused = user.git(&work, &["push", "origin", "main"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("403"), "{}", stderr(&refused));

    user.store(&server, WRITER);
    assert_success(&user.git(&work, &["push", "origin", "main"]));
    let remote = user.git(&work, &["ls-remote", "origin", "refs/heads/main"]);
    let local = user.git(&work, &["rev-parse", "HEAD"]);
    assert_eq!(stdout(&remote), format!("{}\trefs/heads/main", stdout(&local)));

    let attempts = server.attempts();
    let pushes_by = |username: &str| {
        attempts
            .iter()
            .filter(|attempt| attempt.username.as_deref() == Some(username) && attempt.path.contains("receive-pack"))
            .map(|attempt| attempt.granted)
            .collect::<Vec<_>>()
    };
    assert_eq!(pushes_by("reader"), [false], "{attempts:#?}");
    assert!(
        !pushes_by("x-access-token").is_empty() && pushes_by("x-access-token").iter().all(|&granted| granted),
        "{attempts:#?}"
    );
    assert_no_anonymous_grant(&server);
}

#[test]
fn curl_with_a_netrc_file_passes_the_check_only_with_the_right_password() {
    let server = server();
    let check = format!("{}/check", server.url());
    let netrc = tempfile::NamedTempFile::new().unwrap();
    let curl_with = |(login, password): (&str, &str)| {
        let line = format!("machine {} login {login} password {password}\n", server.host());
        std::fs::write(netrc.path(), line).unwrap();
        curl(&["--fail", "--netrc-file", netrc.path().to_str().unwrap(), &check])
    };

    let output = curl_with(WRITER);
    assert_success(&output);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");
    assert_success(&curl_with(READER));
    assert_eq!(curl_with(("x-access-token", "wrong")).status.code(), Some(22));

    let attempts = server.attempts();
    let granted: Vec<_> = attempts.iter().map(|attempt| attempt.granted).collect();
    assert_eq!(granted, [true, true, false], "{attempts:#?}");
    assert!(attempts.iter().all(|attempt| attempt.path == "/check"));
}

#[test]
fn requests_without_valid_authorization_are_challenged_and_never_granted() {
    let server = server();
    let url = server.create_repository("demo").unwrap();
    let refs = format!("{url}/info/refs?service=git-upload-pack");
    for extra in [
        &[][..],
        &["--header", "Authorization: Basic !!!"],
        &["--header", "Authorization: Bearer s3cret"],
        // No colon between user and password.
        &["--header", "Authorization: Basic eC1hY2Nlc3MtdG9rZW4="],
    ] {
        for target in [&refs, &format!("{}/check", server.url())] {
            let output = curl(&[&["--include", target.as_str()][..], extra].concat());
            let response = String::from_utf8_lossy(&output.stdout).to_ascii_lowercase();
            assert!(response.starts_with("http/1.1 401"), "{extra:?}: {response}");
            assert!(response.contains("www-authenticate: basic realm=\"git\""), "{response}");
        }
    }
    let attempts = server.attempts();
    assert_eq!(attempts.len(), 8);
    assert!(
        attempts
            .iter()
            .all(|attempt| attempt.username.is_none() && !attempt.granted),
        "{attempts:#?}"
    );
}

/// git 2.39 asks for protocol v2 in this header, which the backend only sees via GIT_PROTOCOL.
#[test]
fn the_git_protocol_header_reaches_the_backend() {
    let server = server();
    let url = server.create_repository("demo").unwrap();
    let refs = format!("{url}/info/refs?service=git-upload-pack");
    let output = curl(&[
        "--fail",
        "--user",
        "reader:r",
        "--header",
        "Git-Protocol: version=2",
        &refs,
    ]);
    assert_success(&output);
    let advertisement = String::from_utf8_lossy(&output.stdout);
    assert!(advertisement.contains("version 2"), "{advertisement}");
}

#[test]
fn credentials_debug_hides_the_password() {
    let credentials = Credentials {
        username: WRITER.0.to_owned(),
        password: WRITER.1.to_owned(),
    };
    let debug = format!("{credentials:?}");
    assert!(debug.contains("x-access-token") && !debug.contains("s3cret"), "{debug}");
}

#[test]
fn repository_names_are_checked() {
    let server = server();
    for name in ["", "../escape", ".hidden", "a/b", "a b"] {
        let error = server.create_repository(name).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{name:?}");
    }
    server.create_repository("twice").unwrap();
    assert_eq!(
        server.create_repository("twice").unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );
}

#[test]
fn dropping_the_server_closes_its_port() {
    let server = server();
    let authority = server.url().replace("http://", "");
    std::net::TcpStream::connect(&authority).unwrap();
    drop(server);
    assert!(std::net::TcpStream::connect(&authority).is_err());
}
