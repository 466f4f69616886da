//! The plugin's pure parts: relative and local times, the table of `list`, the walk of a chain of
//! `tokenRequest` sources over objects already fetched, and the value a refresh request writes.

use std::collections::BTreeSet;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::TokenRequest;

/// The width `list` keeps its lines within.
pub const TABLE_WIDTH: usize = 100;
const GAP: &str = "  ";

/// `at` relative to `now`, as a person reads it: `in 42m`, `3m ago`, `now`; two units at most
/// (`in 1h5m`, `2d3h ago`), seconds only under ten minutes.
pub fn relative(at: Timestamp, now: Timestamp) -> String {
    let delta: SignedDuration = at.duration_since(now);
    let seconds = delta.as_secs();
    if seconds == 0 {
        return "now".into();
    }
    let span = span(seconds.unsigned_abs());
    if seconds > 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// A positive number of seconds in at most two units.
fn span(seconds: u64) -> String {
    let (days, hours, minutes, secs) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60, seconds % 60);
    match seconds {
        0..60 => format!("{secs}s"),
        60..600 if secs > 0 => format!("{minutes}m{secs}s"),
        60..3_600 => format!("{minutes}m"),
        3_600..86_400 if minutes > 0 => format!("{hours}h{minutes}m"),
        3_600..86_400 => format!("{hours}h"),
        _ if hours > 0 => format!("{days}d{hours}h"),
        _ => format!("{days}d"),
    }
}

/// `at` in the local time zone (the `TZ` variable, else the system's), to the second, with its
/// offset, then in relative form: `2026-05-01 14:03:12 +02:00 (in 42m)`.
pub fn local_and_relative(at: Timestamp, now: Timestamp) -> String {
    let zoned = at.to_zoned(jiff::tz::TimeZone::system());
    format!("{} ({})", zoned.strftime("%Y-%m-%d %H:%M:%S %:z"), relative(at, now))
}

/// A left-aligned table, columns two spaces apart, with no trailing spaces. When the lines
/// would be wider than `width`, cells are cut (ending in `…`) until they fit: first those of the
/// columns in `cut_first` (the widest first, none below 12 characters), then any column's (none
/// below its header's width).
pub fn table(headers: &[&str], rows: &[Vec<String>], width: usize, cut_first: &[usize]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header_floor: Vec<usize> = headers.iter().map(|h| h.chars().count().max(4)).collect();
    let first_floor: Vec<usize> = (0..columns)
        .map(|i| {
            if cut_first.contains(&i) {
                header_floor[i].max(12)
            } else {
                usize::MAX
            }
        })
        .collect();
    let total = |widths: &[usize]| widths.iter().sum::<usize>() + GAP.len() * columns.saturating_sub(1);
    for floor in [&first_floor, &header_floor] {
        while total(&widths) > width {
            let Some((widest, _)) = widths
                .iter()
                .enumerate()
                .filter(|(i, w)| **w > floor[*i])
                .max_by_key(|(_, w)| **w)
            else {
                break;
            };
            widths[widest] -= 1;
        }
    }
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i > 0 {
                line.push_str(GAP);
            }
            line.push_str(&fit(cell, *w));
            let pad = w - fit(cell, *w).chars().count();
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `text` cut to `width` characters, the last one `…` when cut.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.into();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The Ready column and line: `True (Refreshed)`, `False (PermissionDenied)`, `Unknown` when the
/// operator has not written a condition yet.
pub fn ready(tr: &TokenRequest) -> String {
    match tr.ready_condition() {
        Some(c) if c.reason.is_empty() => c.status.clone(),
        Some(c) => format!("{} ({})", c.status, c.reason),
        None => "Unknown".into(),
    }
}

/// One row of `list`: NAMESPACE (when `with_namespace`), NAME, FLOW, READY, EXPIRES, NEXT
/// REFRESH, FAILURES.
pub fn list_row(tr: &TokenRequest, with_namespace: bool, now: Timestamp) -> Vec<String> {
    let status = tr.status.as_ref();
    let time = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.map(|t| relative(t.0, now)).unwrap_or_else(|| "-".into())
    };
    let mut row = Vec::with_capacity(7);
    if with_namespace {
        row.push(tr.metadata.namespace.clone().unwrap_or_default());
    }
    row.extend([
        tr.metadata.name.clone().unwrap_or_default(),
        status.and_then(|s| s.flow.clone()).unwrap_or_else(|| "-".into()),
        ready(tr),
        time(status.and_then(|s| s.expiration_time.as_ref())),
        time(status.and_then(|s| s.next_refresh_time.as_ref())),
        status.and_then(|s| s.failed_attempts).unwrap_or(0).to_string(),
    ]);
    row
}

/// The columns of `list` cut first when too wide: NAMESPACE and NAME.
pub fn list_cut_first(with_namespace: bool) -> Vec<usize> {
    if with_namespace { vec![0, 1] } else { vec![0] }
}

pub fn list_headers(with_namespace: bool) -> Vec<&'static str> {
    let all = [
        "NAMESPACE",
        "NAME",
        "FLOW",
        "READY",
        "EXPIRES",
        "NEXT REFRESH",
        "FAILURES",
    ];
    all[usize::from(!with_namespace)..].to_vec()
}

/// One step up a chain of `tokenRequest` sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// An upstream TokenRequest that exists, with its Ready (as `ready` renders it).
    Found { name: String, ready: String },
    /// Named as a source but not found (or not readable).
    Missing { name: String },
    /// Named as a source though already met on the way: the walk stops.
    Cycle { name: String },
}

/// The upstream TokenRequests of `start`, nearest first, through `spec.source.tokenRequest`, as
/// far as `lookup` (name to object, of `start`'s namespace) finds them; stops at a source that is
/// not a TokenRequest, a missing one, or one already met.
pub fn chain<'a>(start: &'a TokenRequest, lookup: impl Fn(&str) -> Option<&'a TokenRequest>) -> Vec<Link> {
    let mut seen = BTreeSet::from([start.metadata.name.clone().unwrap_or_default()]);
    let mut links = Vec::new();
    let mut current = start;
    while let Some(upstream) = current.spec.source.token_request.as_ref() {
        let name = upstream.name.clone();
        if !seen.insert(name.clone()) {
            links.push(Link::Cycle { name });
            break;
        }
        match lookup(&name) {
            Some(next) => {
                links.push(Link::Found {
                    name,
                    ready: ready(next),
                });
                current = next;
            }
            None => {
                links.push(Link::Missing { name });
                break;
            }
        }
    }
    links
}

/// The kind of source a TokenRequest authenticates with, as the CRD names it.
pub fn source_kind(tr: &TokenRequest) -> String {
    let source = &tr.spec.source;
    if let Some(s) = &source.service_account_token {
        format!("serviceAccountToken (ServiceAccount {})", s.service_account_name)
    } else if let Some(s) = &source.secret {
        format!("secret (Secret {}, key {})", s.name, s.key)
    } else if let Some(s) = &source.token_request {
        format!("tokenRequest ({})", s.name)
    } else if source.ambient.is_some() {
        "ambient (the operator's own identity)".into()
    } else {
        "-".into()
    }
}

/// A new, unique value for the refresh annotation: the time to the second (RFC 3339, UTC) and a
/// short random suffix, so two requests in one second still differ.
pub fn refresh_value(now: Timestamp, rng: &mut fastrand::Rng) -> String {
    let suffix: String = std::iter::repeat_with(|| rng.alphanumeric().to_ascii_lowercase())
        .take(5)
        .collect();
    let seconds = Timestamp::from_second(now.as_second()).unwrap_or(now);
    format!("{seconds}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn tr(name: &str, upstream: Option<&str>, ready: Option<(&str, &str)>) -> TokenRequest {
        let mut spec = serde_json::json!({"flow": {"impersonation": {"serviceAccount": "a@b.iam.gserviceaccount.com", "scopes": ["s"]}},
            "source": {"secret": {"name": "caller", "key": "token"}}});
        if let Some(upstream) = upstream {
            spec["source"] = serde_json::json!({"tokenRequest": {"name": upstream}});
        }
        let mut object = serde_json::json!({"apiVersion": "gcptoken.dev/v1alpha1", "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": "team"}, "spec": spec});
        if let Some((status, reason)) = ready {
            object["status"] = serde_json::json!({"flow": "impersonation", "failedAttempts": 2,
                "expirationTime": "2027-01-15T08:40:00Z",
                "conditions": [{"type": "Ready", "status": status, "reason": reason, "message": "m",
                    "lastTransitionTime": "2027-01-15T08:00:00Z"}]});
        }
        serde_json::from_value(object).unwrap()
    }

    #[test]
    fn relative_times_read_as_a_person_says_them() {
        let now = at(0);
        for (offset, expected) in [
            (0, "now"),
            (1, "in 1s"),
            (59, "in 59s"),
            (-59, "59s ago"),
            (60, "in 1m"),
            (90, "in 1m30s"),
            (-180, "3m ago"),
            (600, "in 10m"),
            (42 * 60 + 17, "in 42m"),
            (3_600, "in 1h"),
            (3_900, "in 1h5m"),
            (-7_260, "2h1m ago"),
            (86_400, "in 1d"),
            (-(2 * 86_400 + 3 * 3_600 + 59), "2d3h ago"),
        ] {
            assert_eq!(relative(at(offset), now), expected, "offset {offset}s");
        }
    }

    #[test]
    fn local_time_shows_the_offset_and_the_relative_form() {
        let text = local_and_relative(at(120), at(0));
        assert!(text.ends_with(" (in 2m)"), "{text}");
        let (clock, _) = text.split_once(" (").unwrap();
        // `YYYY-MM-DD HH:MM:SS ±HH:MM`
        assert_eq!(clock.len(), 26, "{clock}");
        assert!(clock.starts_with("2027-01-1"), "{clock}");
    }

    #[test]
    fn a_table_aligns_columns_and_fits_its_width() {
        let rows = vec![
            vec!["a".to_string(), "True (Refreshed)".to_string(), "0".to_string()],
            vec!["longer-name".to_string(), "False".to_string(), "12".to_string()],
        ];
        let text = table(&["NAME", "READY", "FAILURES"], &rows, 100, &[0]);
        assert_eq!(
            text,
            "NAME         READY             FAILURES\n\
             a            True (Refreshed)  0\n\
             longer-name  False             12\n"
        );

        let long = "x".repeat(80);
        let rows = vec![vec![long.clone(), "False (SourceUnavailable)".into(), "in 42m".into()]];
        let text = table(&["NAME", "READY", "EXPIRES"], &rows, 60, &[0]);
        for line in text.lines() {
            assert!(line.chars().count() <= 60, "{line:?} is {} wide", line.chars().count());
        }
        assert!(text.contains('…'), "{text}");
        assert!(text.contains("in 42m"), "{text}");
        assert!(
            text.contains("False (SourceUnavailable)"),
            "the name is cut first: {text}"
        );
    }

    #[test]
    fn list_rows_fit_a_terminal_even_with_long_names() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let mut long = tr(&"n".repeat(120), None, Some(("False", "PermissionDenied")));
        long.metadata.namespace = Some("a-namespace-with-a-long-name".into());
        let ok = tr("tok", None, Some(("True", "Refreshed")));
        let rows = vec![list_row(&long, true, now), list_row(&ok, true, now)];
        let text = table(&list_headers(true), &rows, TABLE_WIDTH, &list_cut_first(true));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE"), "{text}");
        assert!(lines[0].contains("NEXT REFRESH"), "{text}");
        for line in &lines {
            assert!(line.chars().count() <= TABLE_WIDTH, "{line:?}");
        }
        assert!(lines[2].contains("True (Refreshed)"), "{text}");
        assert!(lines[1].contains("False (PermissionDenied)"), "{text}");
        assert_eq!(list_headers(false)[0], "NAME");
        let row = list_row(&ok, false, now);
        assert_eq!(row[0], "tok");
        assert_eq!(row[1], "impersonation");
        assert_eq!(row[5], "2");
        let none = tr("new", None, None);
        assert_eq!(list_row(&none, false, now)[1..], ["-", "Unknown", "-", "-", "0"]);
    }

    #[test]
    fn a_chain_is_walked_upstream_and_stops_on_missing_and_cycles() {
        let objects = [
            tr("c", Some("b"), Some(("True", "Refreshed"))),
            tr("b", Some("a"), Some(("False", "SourceUnavailable"))),
            tr("a", None, Some(("True", "Refreshed"))),
            tr("x", Some("y"), None),
            tr("y", Some("x"), None),
            tr("lost", Some("gone"), None),
            tr("self", Some("self"), None),
        ];
        let lookup = |name: &str| objects.iter().find(|o| o.metadata.name.as_deref() == Some(name));
        assert_eq!(
            chain(&objects[0], lookup),
            [
                Link::Found {
                    name: "b".into(),
                    ready: "False (SourceUnavailable)".into()
                },
                Link::Found {
                    name: "a".into(),
                    ready: "True (Refreshed)".into()
                },
            ]
        );
        assert_eq!(chain(&objects[2], lookup), []);
        assert_eq!(
            chain(&objects[3], lookup),
            [
                Link::Found {
                    name: "y".into(),
                    ready: "Unknown".into()
                },
                Link::Cycle { name: "x".into() }
            ]
        );
        assert_eq!(chain(&objects[5], lookup), [Link::Missing { name: "gone".into() }]);
        assert_eq!(chain(&objects[6], lookup), [Link::Cycle { name: "self".into() }]);
        assert_eq!(source_kind(&objects[0]), "tokenRequest (b)");
        assert_eq!(source_kind(&objects[2]), "secret (Secret caller, key token)");
    }

    #[test]
    fn refresh_values_are_the_time_and_a_suffix_and_differ() {
        let mut rng = fastrand::Rng::with_seed(7);
        let now = "2027-01-15T08:00:00.123456Z".parse().unwrap();
        let first = refresh_value(now, &mut rng);
        let second = refresh_value(now, &mut rng);
        assert!(first.starts_with("2027-01-15T08:00:00Z-"), "{first}");
        assert_eq!(first.len(), "2027-01-15T08:00:00Z-".len() + 5);
        assert_ne!(first, second);
        assert!(first.len() <= crate::crd::bound::ANNOTATION_VALUE as usize);
    }
}
