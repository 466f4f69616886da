//! Processes and working directories of control planes, arranged so that nothing outlives the
//! process that started them: children get a parent-death signal, and working directories carry the
//! owner's pid so a later run can remove those whose owner died without cleaning up.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::thread;
use std::time::Duration;

const DIR_PREFIX: &str = "gto-control-plane-";

/// Creates `$TMPDIR/gto-control-plane-<pid>-<random>`. The pid is in the name, not in a file inside,
/// so there is no moment at which a directory exists without a recorded owner.
pub(super) fn create_dir() -> io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
}

/// Removes working directories left by earlier runs whose owning process is gone (killed, or
/// exited without its cleanup running), and returns them. Their processes are already dead: they
/// had a parent-death signal.
pub fn sweep_stale_dirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let owner = path
                .file_name()?
                .to_str()?
                .strip_prefix(DIR_PREFIX)?
                .split_once('-')?
                .0
                .parse::<u32>()
                .ok()?;
            // Directories of other users fail to be removed; they are theirs to sweep.
            let owner_alive = Path::new("/proc").join(owner.to_string()).exists();
            (!owner_alive && fs::remove_dir_all(&path).is_ok()).then_some(path)
        })
        .collect()
}

/// Starts `program` with its stdout and stderr appended to `log`, killed by the kernel when this
/// process dies however it dies.
pub(super) fn spawn(program: &Path, args: &[OsString], log: &Path) -> io::Result<Child> {
    let log = OpenOptions::new().create(true).append(true).open(log)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // functions may be called; prctl and getppid are, and the error paths do not allocate.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the parent died before prctl, the signal will never come: give up instead.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    spawn_from_long_lived_thread(command)
}

/// The parent-death signal fires when the *thread* that forked the child exits, not the process. A
/// child forked by a test thread, or by a runtime's worker, would be killed when that thread ends,
/// so every child is forked by one thread that lives as long as the process.
fn spawn_from_long_lived_thread(command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, received) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("control-plane-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in received {
                    // The requester waits for the reply, so it cannot be gone.
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the control-plane spawner thread");
        requests
    });
    let gone = || io::Error::other("the control-plane spawner thread is gone");
    let (reply, replied) = mpsc::channel();
    spawner.send((command, reply)).map_err(|_| gone())?;
    replied.recv().map_err(|_| gone())?
}

/// Sends SIGTERM, waits up to `grace` for the process to exit, then kills it.
pub(super) async fn terminate(mut child: Child, grace: Duration) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: plain syscall; `child` has not been reaped yet, so the pid still names it.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill()?;
    child.wait().map(drop)
}

/// Kills with SIGKILL and reaps: the control plane's state is thrown away, so there is nothing to
/// shut down gracefully.
pub(super) fn kill(child: &mut Child) {
    // Errors mean the process has already exited, which is the goal.
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `lines` lines of a log file, for error messages.
pub(super) fn log_tail(log: &Path, lines: usize) -> String {
    match fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", log.display()),
    }
}
