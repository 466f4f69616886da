//! The chart's alerts, checked and unit-tested with Prometheus's own `promtool`: the PrometheusRule
//! renders only when enabled, `promtool check rules` accepts it as rendered, `promtool test rules`
//! runs tests/alerts/alerts.test.yaml (a firing and a non-firing case for every alert) against it,
//! and every alert links to its section of docs/runbooks.md.

#[path = "support/helm.rs"]
#[allow(dead_code)] // this test uses some of the helpers
mod helm;

use std::{collections::BTreeSet, path::Path, process::Command};

use gcp_token_operator_testkit::control_plane::ControlPlane;
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ALERTS: [&str; 5] = [
    "GcpTokenExpiresBeforeRefresh",
    "GcpTokenRefreshFailing",
    "GcpTokenExpired",
    "GcpTokenGoogleThrottled",
    "GcpTokenNoLeader",
];

/// Runs `promtool ARGS` in `dir`; what it printed, or a panic quoting it.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("running promtool failed ({e}): the alert tests need it; install Debian's `prometheus` package (scripts/test.sh does)")
        });
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {} failed ({}):\n{printed}",
        args.join(" "),
        output.status
    );
    printed
}

async fn render(values: &Value) -> Vec<Value> {
    let manifest = helm::template(ControlPlane::shared(), "monitoring", "alerts", values)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    helm::objects(&manifest)
}

/// Chart values with the rule enabled and `settings` in `metrics.prometheusRule`.
fn rule_values(settings: Value) -> Value {
    let mut rule = json!({"enabled": true});
    rule.as_object_mut()
        .unwrap()
        .extend(settings.as_object().unwrap().clone());
    json!({"metrics": {"prometheusRule": rule}})
}

/// The one PrometheusRule the chart renders with `settings`.
async fn rule(settings: Value) -> Value {
    let objects = render(&rule_values(settings)).await;
    let rules: Vec<_> = objects.iter().filter(|o| o["kind"] == "PrometheusRule").collect();
    assert_eq!(rules.len(), 1, "{:?}", helm::names(&objects));
    rules[0].clone()
}

fn alerts(rule: &Value) -> Vec<&Value> {
    rule["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .collect()
}

fn alert<'a>(rule: &'a Value, name: &str) -> &'a Value {
    alerts(rule)
        .into_iter()
        .find(|a| a["alert"] == name)
        .unwrap_or_else(|| panic!("no alert {name}"))
}

/// A rule file of `rule`'s spec (JSON is YAML) in a fresh directory, with the unit tests beside it.
fn rule_dir(rule: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rule["spec"].to_string()).unwrap();
    std::fs::copy(
        Path::new(ROOT).join("tests/alerts/alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn no_rule_unless_enabled() {
    for values in [json!({}), json!({"metrics": {"prometheusRule": {"enabled": false}}})] {
        let objects = render(&values).await;
        assert!(
            objects.iter().all(|o| o["kind"] != "PrometheusRule"),
            "{values}: {:?}",
            helm::names(&objects)
        );
    }
}

#[tokio::test]
async fn promtool_checks_the_rules_and_every_alert_fires_and_stays_quiet_as_tested() {
    let rule = rule(json!({})).await;
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let names: Vec<_> = alerts(&rule).iter().map(|a| a["alert"].as_str().unwrap()).collect();
    assert_eq!(names, ALERTS);

    // Each alert has a test where it fires and one where it does not.
    let tests: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("tests/alerts/alerts.test.yaml")).unwrap(),
    )
    .expect("the unit tests are YAML");
    let cases: Vec<(&str, bool)> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .map(|c| {
            let fires = !c["exp_alerts"].as_array().unwrap().is_empty();
            (c["alertname"].as_str().unwrap(), fires)
        })
        .collect();
    for name in ALERTS {
        for fires in [true, false] {
            assert!(
                cases.contains(&(name, fires)),
                "no case where {name} {}",
                if fires { "fires" } else { "stays quiet" }
            );
        }
    }

    let dir = rule_dir(&rule);
    let checked = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
    let tested = promtool(dir.path(), &["test", "rules", "alerts.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[tokio::test]
async fn settings_reach_the_rules() {
    let rule = rule(json!({
        "labels": {"release": "prometheus"},
        "runbookBaseUrl": "https://git.example/ops/runbooks/gcp-token-operator.md",
        "selector": r#"job="alerts-gcp-token-operator-metrics""#,
        "expiresBeforeRefresh": {"withinSeconds": 1800, "severity": "page"},
        "refreshFailing": {"for": "30m"},
        "expired": {"for": "2m"},
        "googleThrottled": {"for": "1h"},
        "noLeader": {"for": "10m", "severity": "warning"},
    }))
    .await;
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(rule["metadata"]["namespace"], "monitoring");
    for alert in alerts(&rule) {
        let expr = alert["expr"].as_str().unwrap();
        // Every selector of every expression is scoped, none left out.
        assert_eq!(
            expr.matches("gcp_token_operator_").count(),
            expr.matches(r#"{job="alerts-gcp-token-operator-metrics"}"#).count(),
            "{expr}"
        );
        let runbook = alert["annotations"]["runbook_url"].as_str().unwrap();
        assert!(
            runbook.starts_with("https://git.example/ops/runbooks/gcp-token-operator.md#"),
            "{runbook}"
        );
    }
    let expires = alert(&rule, "GcpTokenExpiresBeforeRefresh");
    assert!(expires["expr"].as_str().unwrap().contains("- time() < 1800"));
    assert_eq!(expires["labels"]["severity"], "page");
    for (name, duration) in [
        ("GcpTokenRefreshFailing", "30m"),
        ("GcpTokenExpired", "2m"),
        ("GcpTokenGoogleThrottled", "1h"),
        ("GcpTokenNoLeader", "10m"),
    ] {
        assert_eq!(alert(&rule, name)["for"], duration, "{name}");
    }
    assert_eq!(alert(&rule, "GcpTokenNoLeader")["labels"]["severity"], "warning");
    assert_eq!(alert(&rule, "GcpTokenRefreshFailing")["labels"]["severity"], "warning");
    let dir = rule_dir(&rule);
    promtool(dir.path(), &["check", "rules", "rules.yaml"]);
}

#[tokio::test]
async fn wrong_settings_fail_the_render() {
    for (settings, expected) in [
        (
            json!({"expiresBeforeRefresh": {"withinSeconds": "10m"}}),
            "at '/metrics/prometheusRule/expiresBeforeRefresh/withinSeconds'",
        ),
        (
            json!({"refreshFailing": {"for": "15 minutes"}}),
            "at '/metrics/prometheusRule/refreshFailing/for'",
        ),
        (
            json!({"selector": r#"{job="x"}"#}),
            "at '/metrics/prometheusRule/selector'",
        ),
        (
            json!({"runbookBaseUrl": "docs/runbooks.md#top"}),
            "at '/metrics/prometheusRule/runbookBaseUrl'",
        ),
        (
            json!({"interval": "1m"}),
            "additional properties 'interval' not allowed",
        ),
    ] {
        let values = rule_values(settings);
        match helm::template(ControlPlane::shared(), "monitoring", "alerts", &values).await {
            Ok(_) => panic!("rendering with {values} succeeded"),
            Err(error) => assert!(error.contains(expected), "{values}: {error}"),
        }
    }
}

/// GitHub's anchor of a Markdown heading: lower case, punctuation other than `-` dropped, spaces
/// turned into `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[tokio::test]
async fn every_alert_links_to_its_runbook_section() {
    let runbooks = std::fs::read_to_string(Path::new(ROOT).join("docs/runbooks.md")).unwrap();
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(anchor)
        .collect();
    let rule = rule(json!({})).await;
    for alert in alerts(&rule) {
        let name = alert["alert"].as_str().unwrap();
        let url = alert["annotations"]["runbook_url"].as_str().unwrap();
        let (document, section) = url.split_once('#').unwrap_or_else(|| panic!("{name}: {url}"));
        assert_eq!(document, "docs/runbooks.md", "{name}");
        assert_eq!(section, anchor(name), "{name}: the section is named after the alert");
        assert!(
            anchors.contains(section),
            "{name}: docs/runbooks.md has no section #{section}"
        );
        for annotation in ["summary", "description"] {
            assert!(alert["annotations"][annotation].is_string(), "{name}: no {annotation}");
        }
        assert!(alert["labels"]["severity"].is_string(), "{name}: no severity");
    }
}
