//! What both benchmarks share: how they read their arguments, and the operator with its limits
//! lifted.

use clap::Parser;

/// The benchmark's arguments under `cargo bench` (which passes `--bench`); under `cargo test`,
/// which runs a bench target too (with test-runner flags), the defaults changed by `smoke` into a
/// configuration small enough to run with the tests, so that the benchmark cannot rot.
pub fn args<A: Parser>(name: &str, smoke: impl FnOnce(A) -> A) -> A {
    if std::env::args().any(|a| a == "--bench") {
        A::parse()
    } else {
        smoke(A::parse_from([name]))
    }
}

/// The operator's flags with its limits lifted: the systems it is measured against have none,
/// nor the emulator a quota. With the defaults a cold start of N takes at least N / 100 s by
/// design, and every object is in one namespace, so fairness between namespaces is off too.
pub fn unthrottled_operator_args(concurrency: &str) -> [&str; 10] {
    [
        "--concurrency",
        concurrency,
        "--kube-qps",
        "0",
        "--google-rate-limit",
        "1000000",
        "--namespace-rate-limit",
        "0",
        "--namespace-max-in-flight",
        "0",
    ]
}
