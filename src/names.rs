//! Values derived from object names where Kubernetes allows fewer characters than a name may have
//! (label values and the name part of annotation keys: 63). Pure functions.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

/// The longest label value, and the longest name part of a label or annotation key.
pub const MAX_NAME_PART: usize = 63;

/// `name` itself when it fits in 63 characters, else its head and a hash of the whole name: still
/// valid as a label value or key name part (a DNS subdomain starts and ends alphanumeric, and the
/// head is trimmed to end so too), distinct for distinct names, and the same in every process.
pub fn fit_63(name: &str) -> Cow<'_, str> {
    fit(name, MAX_NAME_PART)
}

/// As [`fit_63`], for a limit of `max` characters (at least 13).
pub fn fit(name: &str, max: usize) -> Cow<'_, str> {
    if name.len() <= max {
        return Cow::Borrowed(name);
    }
    let hash = hex::encode(&Sha256::digest(name.as_bytes())[..6]);
    // Names are ASCII (DNS subdomains), but a byte index must never split a character.
    let mut end = max.saturating_sub(hash.len() + 1);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let head = name[..end].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    Cow::Owned(if head.is_empty() {
        hash
    } else {
        format!("{head}-{hash}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_and_long_ones_hashed() {
        assert_eq!(fit_63("registry"), "registry");
        let exact = "a".repeat(63);
        assert_eq!(fit_63(&exact), exact);
        let long = format!("{}.b-{}", "a".repeat(50), "c".repeat(200));
        let fitted = fit_63(&long);
        assert!(fitted.len() <= 63, "{fitted}");
        assert!(fitted.starts_with(&"a".repeat(50)));
        assert_ne!(fit_63(&long), fit_63(&format!("{long}x")));
        // A head that would end in a dot or dash is trimmed to end alphanumeric.
        let dotted = format!("{}.{}", "a".repeat(49), "b".repeat(100));
        let fitted = fit_63(&dotted);
        let (head, hash) = fitted.rsplit_once('-').unwrap();
        assert_eq!((head, hash.len()), ("a".repeat(49).as_str(), 12));
    }
}
