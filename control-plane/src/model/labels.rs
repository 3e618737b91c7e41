//! Machine labels (issue 15): key/value pairs a tenant puts on its machines to find them
//! again (`GET /machines?label=env=prod`). The rules are Kubernetes' in spirit, kept short.

use std::collections::BTreeMap;

/// Most labels one machine carries.
pub const MAX_LABELS: usize = 64;

/// Longest key and longest value.
pub const MAX_KEY: usize = 63;
pub const MAX_VALUE: usize = 63;

/// Keys: 1–63 of `[a-z0-9._/-]`, starting and ending with a letter or digit.
pub fn is_key(key: &str) -> bool {
    let edge = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (1..=MAX_KEY).contains(&key.len())
        && edge(key.bytes().next())
        && edge(key.bytes().last())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b))
}

/// Values: 0–63 of `[A-Za-z0-9._-]`.
pub fn is_value(value: &str) -> bool {
    value.len() <= MAX_VALUE
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Checks a machine's labels; the error names the first label that breaks a rule.
pub fn validate(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels"));
    }
    for (key, value) in labels {
        let shown: String = key.chars().take(MAX_KEY + 1).collect();
        if !is_key(key) {
            return Err(format!(
                "label key '{}' must be 1 to {MAX_KEY} of a-z, 0-9, '.', '_', '/', '-', starting \
                 and ending with a letter or digit",
                shown.escape_debug()
            ));
        }
        if !is_value(value) {
            return Err(format!(
                "label '{shown}': its value must be at most {MAX_VALUE} of A-Z, a-z, 0-9, '.', \
                 '_', '-'"
            ));
        }
    }
    Ok(())
}

/// A list filter, `KEY=VALUE`.
pub fn parse_filter(filter: &str) -> Result<(String, String), String> {
    let bad = || {
        format!(
            "label filter must be KEY=VALUE with a valid key and value, not '{}'",
            filter.chars().take(140).collect::<String>().escape_debug()
        )
    };
    let (key, value) = filter.split_once('=').ok_or_else(bad)?;
    if is_key(key) && is_value(value) {
        Ok((key.to_owned(), value.to_owned()))
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_follow_the_rules() {
        for ok in ["env", "team.io/owner", "a", "a-b_c.d", &"k".repeat(63)] {
            assert!(is_key(ok), "{ok}");
        }
        for bad in ["", "Env", "-env", "env-", "e v", "é", &"k".repeat(64)] {
            assert!(!is_key(bad), "{bad}");
        }
        for ok in ["", "prod", "Prod-1.2_x"] {
            assert!(is_value(ok), "{ok}");
        }
        for bad in ["a b", "a/b", &"v".repeat(64)] {
            assert!(!is_value(bad), "{bad}");
        }
    }

    #[test]
    fn a_machine_carries_at_most_so_many_and_errors_name_the_label() {
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(validate(&many).unwrap_err().contains("at most 64"));
        let bad = BTreeMap::from([("env".to_owned(), "a b".to_owned())]);
        assert!(validate(&bad).unwrap_err().contains("'env'"));
    }

    #[test]
    fn filters_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_filter("env=prod"),
            Ok(("env".to_owned(), "prod".to_owned()))
        );
        assert_eq!(parse_filter("env="), Ok(("env".to_owned(), String::new())));
        assert!(parse_filter("env").is_err());
        assert!(parse_filter("env=a=b").is_err());
        assert!(parse_filter("=prod").is_err());
    }
}
