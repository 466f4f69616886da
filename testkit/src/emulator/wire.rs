//! Encoding helpers shared by the handlers: Google's JSON conventions (RFC 3339 timestamps,
//! `"3600s"` durations, proto3-JSON request bodies) and form bodies.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::errors::ApiError;

/// Seconds since the Unix epoch (0 for times before it, which the emulator never produces).
pub(super) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Whole seconds left until `t`, 0 once it has passed.
pub(super) fn secs_until(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs())
}

/// A `google.protobuf.Timestamp` in JSON: RFC 3339, UTC, whole seconds (`2014-10-02T15:01:23Z`).
pub(super) fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An HTTP date (RFC 9110's IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`), as `Date` headers carry.
pub(super) fn http_date(t: SystemTime) -> String {
    // 1970-01-01 was a Thursday.
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = unix_secs(t);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = WEEKDAYS[usize::try_from(days % 7).unwrap_or_default()];
    let month = MONTHS[usize::try_from(month - 1).unwrap_or_default()];
    format!(
        "{weekday}, {day:02} {month} {year:04} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A `google.protobuf.Duration` in JSON: decimal seconds with up to nine fractional digits and
/// an `s` suffix (`"3600s"`, `"1.5s"`). Negative durations are not accepted: no field here takes one.
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let number = text.strip_suffix('s')?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) || fraction.len() > 9 {
        return None;
    }
    if number.ends_with('.') {
        return None;
    }
    let nanos = format!("{fraction:0<9}").parse::<u32>().ok()?;
    Some(Duration::new(whole.parse().ok()?, nanos))
}

/// A stable 21-digit ID for a principal, like Google's numeric client and account IDs.
pub(super) fn numeric_id(principal: &str) -> String {
    let digest = Sha256::digest(principal.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    format!("1{:020}", u64::from_be_bytes(first))
}

/// An `application/x-www-form-urlencoded` body as a map (the last of repeated keys wins).
pub(super) fn form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

/// OAuth scopes are space-delimited.
pub(super) fn scope_list(scope: &str) -> Vec<String> {
    scope.split_whitespace().map(str::to_owned).collect()
}

/// A proto3-JSON request body as Google's front end reads it: an empty body is the empty message,
/// and a field the message does not have is an error rather than ignored.
pub(super) fn json_request(body: &[u8], fields: &[&str]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let object = match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => object,
        Ok(_) => {
            return Err(ApiError::invalid_payload(
                "Invalid JSON payload received. Expected an object.",
            ));
        }
        Err(_) => {
            return Err(ApiError::invalid_payload(
                "Invalid JSON payload received. Unexpected token.",
            ));
        }
    };
    if let Some(unknown) = object.keys().find(|key| !fields.contains(&key.as_str())) {
        return Err(ApiError::invalid_payload(format!(
            "Invalid JSON payload received. Unknown name \"{unknown}\": Cannot find field."
        )));
    }
    Ok(object)
}

/// An optional string field of a proto3-JSON request.
pub(super) fn string_field<'a>(object: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid_value(field, "TYPE_STRING", other)),
    }
}

/// A repeated string field of a proto3-JSON request (absent means empty).
pub(super) fn string_list_field(object: &Map<String, Value>, field: &str) -> Result<Vec<String>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid_value(field, "TYPE_STRING", item))
            })
            .collect(),
        Some(other) => Err(invalid_value(field, "TYPE_STRING", other)),
    }
}

/// An optional bool field of a proto3-JSON request (absent means false).
pub(super) fn bool_field(object: &Map<String, Value>, field: &str) -> Result<bool, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(other) => Err(invalid_value(field, "TYPE_BOOL", other)),
    }
}

fn invalid_value(field: &str, proto_type: &str, value: &Value) -> ApiError {
    ApiError::invalid_payload(format!(
        "Invalid JSON payload received. Invalid value at '{field}' ({proto_type}), {value}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_timestamps_like_google() {
        let t = UNIX_EPOCH + Duration::from_secs(1_412_262_083);
        assert_eq!(rfc3339(t), "2014-10-02T15:01:23Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2024-02-29, a leap day, at the last second.
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
        // RFC 9110's own example.
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn parses_proto_durations() {
        assert_eq!(parse_duration("3600s"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.000000001s"), Some(Duration::from_nanos(1)));
        for bad in ["abc", "3600", "s", "-1s", "1.s", ".5s", "1.0000000001s", "1 s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn json_requests_reject_unknown_fields_and_accept_empty_bodies() {
        assert!(json_request(b"", &[]).unwrap().is_empty());
        assert!(json_request(b"{}", &[]).unwrap().is_empty());
        assert!(json_request(br#"{"scope":"x"}"#, &["scope"]).is_ok());
        assert!(json_request(br#"{"other":1}"#, &["scope"]).is_err());
        assert!(json_request(b"[]", &[]).is_err());
        assert!(json_request(b"{", &[]).is_err());
    }
}
