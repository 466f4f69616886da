//! The operator binary as a child process pointed at a control plane and a Google emulator: how the
//! integration tests, the benchmark and the demo run it.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// Where and how to run the operator.
pub struct OperatorOptions<'a> {
    pub binary: &'a Path,
    pub kubeconfig: &'a Path,
    /// Namespaces to watch; empty means all.
    pub namespaces: &'a [String],
    /// Base URL of the Google emulator, used for every Google endpoint.
    pub google: &'a str,
    /// stdout and stderr go here.
    pub log_path: PathBuf,
    /// `RUST_LOG` of the operator.
    pub log_filter: &'a str,
    pub extra_args: &'a [&'a str],
}

/// A running operator process; killed when dropped.
pub struct OperatorProcess {
    child: Child,
    pub http_addr: SocketAddr,
    pub log_path: PathBuf,
}

impl OperatorProcess {
    pub fn spawn(options: OperatorOptions<'_>) -> std::io::Result<OperatorProcess> {
        let http_addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = std::fs::File::create(&options.log_path)?;
        let google = options.google;
        let mut command = Command::new(options.binary);
        command.args(["run", "--http-addr", &http_addr.to_string()]);
        for namespace in options.namespaces {
            command.args(["--namespace", namespace]);
        }
        let child = command
            .args(["--sts-endpoint", google, "--iam-credentials-endpoint", google])
            .args([
                "--developer-connect-endpoint",
                google,
                "--discovery-engine-endpoint",
                google,
            ])
            .args(["--oauth2-endpoint", google, "--metadata-endpoint", google])
            .args(options.extra_args)
            .env("KUBECONFIG", options.kubeconfig)
            .env("RUST_LOG", options.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(OperatorProcess {
            child,
            http_addr,
            log_path: options.log_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET on the operator's HTTP server: status and body.
    pub async fn get(&self, path: &str) -> reqwest::Result<(u16, String)> {
        let response = reqwest::get(format!("http://{}{path}", self.http_addr)).await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// Waits until `/readyz` answers 200 (the caches have synced).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if matches!(self.get("/readyz").await, Ok((200, _))) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "the operator was not ready within {timeout:?}; its log:\n{}",
            self.log()
        ))
    }

    /// Peak resident set size (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.memory_kib("VmHWM:")
    }

    /// Resident set size now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.memory_kib("VmRSS:")
    }

    fn memory_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// CPU time used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (per_second > 0).then(|| ticks as f64 / per_second as f64)
    }

    /// Asks the process to stop (SIGTERM, as Kubernetes does) and waits until it has.
    pub fn terminate(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let pid = libc::pid_t::try_from(self.pid()).map_err(std::io::Error::other)?;
        // SAFETY: sends a signal to our own child process.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.child.wait()
    }

    /// How the process ended, if it has.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills the process at once (SIGKILL), as a crash or an eviction would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
