//! A Git-over-HTTP server behind HTTP basic auth, for proving that the credentials the operator
//! renders (a git credential-store file, a basic-auth Secret, a `.netrc`) work with the real `git`
//! and `curl`.
//!
//! Repositories under `/git/` are served by `git http-backend` run as a CGI program per request;
//! `/check` answers `ok` to any credentials granted read access, for `curl --netrc-file`. Who may
//! do what is decided by a test's closure, typically backed by the Google emulator.

use std::ffi::OsString;
use std::fmt;
use std::future::IntoFuture as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The content of `README` in the one commit of every repository [`GitServer::create_repository`]
/// creates.
pub const README: &str = "A repository served by the gcp-token-operator test kit.\n";

/// Far above what a test pushes, yet a bound on what a client can make the server buffer.
const MAX_BODY: usize = 64 << 20;

/// A fixed identity and date: the initial commit is the same on every run, and no user or global
/// configuration is consulted.
const COMMIT_IDENTITY: [(&str, &str); 6] = [
    ("GIT_AUTHOR_NAME", "Test Kit"),
    ("GIT_AUTHOR_EMAIL", "testkit@example.com"),
    ("GIT_AUTHOR_DATE", "1704067200 +0000"),
    ("GIT_COMMITTER_NAME", "Test Kit"),
    ("GIT_COMMITTER_EMAIL", "testkit@example.com"),
    ("GIT_COMMITTER_DATE", "1704067200 +0000"),
];

/// The user name and password of an HTTP basic `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What a check grants a set of credentials; ordered from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Answered with 401, as for wrong credentials.
    Denied,
    /// Clone and fetch (`git-upload-pack`), and `/check`.
    Read,
    /// Also push (`git-receive-pack`).
    ReadWrite,
}

/// One request as the server judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// `None` when the request had no (well-formed) basic `Authorization` header.
    pub username: Option<String>,
    /// Path and query, e.g. `/git/demo.git/info/refs?service=git-upload-pack`.
    pub path: String,
    /// Whether the credentials were granted the access the request needs.
    pub granted: bool,
}

type Check = dyn Fn(&Credentials) -> Access + Send + Sync;

struct Shared {
    check: Box<Check>,
    attempts: Mutex<Vec<Attempt>>,
    /// `GIT_PROJECT_ROOT`: the bare repositories.
    repositories: PathBuf,
    /// `HOME` of every git process, so nothing of the user's is read.
    home: PathBuf,
}

/// A running server on a random port of 127.0.0.1. It runs on a thread of its own, so tests may
/// block on `git` or `curl` from any context. Dropping it shuts it down and removes its repositories.
pub struct GitServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    // Dropped after `thread` is joined: no backend is left using it.
    _root: tempfile::TempDir,
}

impl GitServer {
    /// Starts the server; `check` decides what each request's credentials may do.
    pub fn start(check: impl Fn(&Credentials) -> Access + Send + Sync + 'static) -> io::Result<GitServer> {
        let root = tempfile::Builder::new().prefix("git-server-").tempdir()?;
        let repositories = root.path().join("repositories");
        std::fs::create_dir(&repositories)?;
        let shared = Arc::new(Shared {
            check: Box::new(check),
            attempts: Mutex::default(),
            repositories,
            home: root.path().to_owned(),
        });

        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared))
            .into_make_service_with_connect_info::<SocketAddr>();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("git-server".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    // Not a graceful shutdown: a client's idle keep-alive connection must not hold up
                    // the drop. Dropping the runtime cancels the connections and kills their backends.
                    tokio::select! {
                        _ = axum::serve(listener, app).into_future() => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(GitServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
            _root: root,
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1`: the `machine` of a `.netrc` line and the host of a credential-store line.
    pub fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// Creates the bare repository `NAME.git` with one commit on `main` holding `README` (content
    /// [`README`]), open to pushes, and returns its clone URL `http://127.0.0.1:PORT/git/NAME.git`.
    /// `name` is letters, digits, `-`, `_` and `.`, not starting with `.`; an existing name is an
    /// error.
    pub fn create_repository(&self, name: &str) -> io::Result<String> {
        let valid = name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if name.is_empty() || name.starts_with('.') || !valid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid repository name {name:?}"),
            ));
        }
        let repository = self.shared.repositories.join(format!("{name}.git"));
        // Fails if the name is taken, where `git init` would quietly reinitialize.
        std::fs::create_dir(&repository)?;
        let git = |args: &[&str], input: Option<&[u8]>| self.git(&repository, args, input);
        git(&["-c", "init.defaultBranch=main", "init", "--bare"], None)?;
        // Plumbing rather than a work tree and a clone: one repository, nothing to clean up.
        let blob = git(&["hash-object", "-w", "--stdin"], Some(README.as_bytes()))?;
        let tree = git(&["mktree"], Some(format!("100644 blob {blob}\tREADME\n").as_bytes()))?;
        let commit = git(&["commit-tree", &tree, "-m", "Initial commit"], None)?;
        git(&["update-ref", "refs/heads/main", &commit], None)?;
        // http-backend only allows pushes by an authenticated REMOTE_USER unless told so.
        git(&["config", "http.receivepack", "true"], None)?;
        Ok(format!("{}/git/{name}.git", self.url()))
    }

    /// Every request so far, oldest first.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.shared
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs git in `dir` (a bare repository is found there) to completion; returns its trimmed stdout.
    fn git(&self, dir: &Path, args: &[&str], input: Option<&[u8]>) -> io::Result<String> {
        let mut child = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env_clear()
            .envs(git_env(&self.shared.home))
            .envs(COMMIT_IDENTITY)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
            // Small enough for the pipe: git cannot be blocked writing stdout meanwhile.
            io::Write::write_all(&mut stdin, input)?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "git {args:?}: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // A panic there already failed whatever request hit it; nothing to add here.
            thread.join().ok();
        }
    }
}

/// The environment of every git process: the host's `PATH` and nothing else of the host's.
fn git_env(home: &Path) -> Vec<(&'static str, OsString)> {
    vec![
        ("PATH", std::env::var_os("PATH").unwrap_or_default()),
        ("HOME", home.into()),
        ("GIT_CONFIG_GLOBAL", "/dev/null".into()),
        ("GIT_CONFIG_NOSYSTEM", "1".into()),
    ]
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let needed = if is_push(&parts.uri) {
        Access::ReadWrite
    } else {
        Access::Read
    };
    let credentials = basic_credentials(&parts.headers);
    let access = credentials
        .as_ref()
        .map_or(Access::Denied, |credentials| (shared.check)(credentials));
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str()).to_owned();
    let attempt = Attempt {
        username: credentials.as_ref().map(|credentials| credentials.username.clone()),
        path,
        granted: access >= needed,
    };
    shared
        .attempts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(attempt);

    let Some(credentials) = credentials.filter(|_| access > Access::Denied) else {
        return challenge();
    };
    if access < needed {
        return (StatusCode::FORBIDDEN, "push requires write access\n").into_response();
    }
    let path = parts.uri.path();
    if path == "/check" {
        return "ok\n".into_response();
    }
    let Some(path_info) = path.strip_prefix("/git").filter(|rest| rest.starts_with('/')) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large or cut off\n").into_response();
    };
    match http_backend(&shared, &parts, path_info, &credentials.username, peer, body).await {
        Ok(response) => response,
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("git http-backend: {error}\n"),
        )
            .into_response(),
    }
}

/// git sends credentials only once challenged (curl sends basic credentials up front).
fn challenge() -> Response {
    let challenge = [(header::WWW_AUTHENTICATE, r#"Basic realm="git""#)];
    (StatusCode::UNAUTHORIZED, challenge, "authentication required\n").into_response()
}

/// Both steps of a push: the ref advertisement and the pack upload.
fn is_push(uri: &Uri) -> bool {
    uri.path().ends_with("/git-receive-pack")
        || uri
            .query()
            .is_some_and(|query| query.split('&').any(|pair| pair == "service=git-receive-pack"))
}

fn basic_credentials(headers: &HeaderMap) -> Option<Credentials> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// Runs one CGI request through `git http-backend` (RFC 3875 variables, body on stdin).
async fn http_backend(
    shared: &Shared,
    parts: &Parts,
    path_info: &str,
    username: &str,
    peer: SocketAddr,
    body: Bytes,
) -> io::Result<Response> {
    let mut command = tokio::process::Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .envs(git_env(&shared.home))
        .env("GIT_PROJECT_ROOT", &shared.repositories)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", parts.uri.query().unwrap_or_default())
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", username)
        .env("REMOTE_ADDR", peer.ip().to_string());
    for (name, value) in &parts.headers {
        let value = std::ffi::OsStr::from_bytes(value.as_bytes());
        match *name {
            // CGI leaves the credentials to the server, which has checked them.
            header::AUTHORIZATION => {}
            header::CONTENT_TYPE => {
                command.env("CONTENT_TYPE", value);
            }
            // Set from the body as read, which is what the backend gets.
            header::CONTENT_LENGTH => {}
            _ => {
                // The backend reads e.g. HTTP_CONTENT_ENCODING for gzipped requests.
                let variable = format!("HTTP_{}", name.as_str().to_ascii_uppercase().replace('-', "_"));
                command.env(variable, value);
            }
        }
        // http-backend takes the protocol version only from GIT_PROTOCOL, as a web server's
        // configuration would set it.
        if name.as_str() == "git-protocol" {
            command.env("GIT_PROTOCOL", value);
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A client that hangs up drops this future: the backend goes with it.
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // The backend may answer (an error) without reading it all; its answer still stands.
            stdin.write_all(&body).await.ok();
        }
    };
    let ((), output) = tokio::join!(feed, child.wait_with_output());
    let output = output?;
    if !output.stderr.is_empty() {
        tracing::debug!(stderr = %String::from_utf8_lossy(&output.stderr), "git http-backend");
    }
    Ok(cgi_response(Bytes::from(output.stdout)).unwrap_or_else(|| {
        let message = format!("git http-backend ({}) gave no valid CGI response\n", output.status);
        (StatusCode::BAD_GATEWAY, message).into_response()
    }))
}

/// Splits CGI output into its header lines (`Status:` sets the code) and the body.
fn cgi_response(output: Bytes) -> Option<Response> {
    let mut response = Response::builder();
    let mut offset = 0;
    loop {
        let length = output[offset..].iter().position(|&byte| byte == b'\n')?;
        let line = &output[offset..offset + length];
        offset += length + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let (name, value) = std::str::from_utf8(line).ok()?.split_once(':')?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next()?.parse().ok()?;
            response = response.status(StatusCode::from_u16(code).ok()?);
        } else {
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            response = response.header(name, HeaderValue::from_str(value).ok()?);
        }
    }
    response.body(Body::from(output.slice(offset..))).ok()
}
