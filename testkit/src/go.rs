//! The Go toolchain, for the parts of the test substrate written in Go (the fidelity program, the
//! benchmark's peers).

use std::path::PathBuf;
use std::process::Command;

/// `go` from PATH, or where Go's installer puts it (as scripts/test.sh looks for it); `None` when
/// neither runs.
pub fn toolchain() -> Option<PathBuf> {
    ["go", "/usr/local/go/bin/go"]
        .into_iter()
        .map(PathBuf::from)
        .find(|go| {
            Command::new(go)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}
