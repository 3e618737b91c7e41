//! Machine hostnames: one RFC 1123 label, so the name is valid as a DNS label and a guest hostname.

use serde::Serialize;
use std::fmt;

/// A validated hostname: 1–63 characters of `[a-z0-9-]`, neither starting nor ending with `-`.
///
/// Upper-case letters are refused rather than folded: a tenant who asked for `Web` and sees
/// `web` would be surprised, and hostnames compare case-insensitively in DNS anyway.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Hostname(String);

/// Why a string is not a hostname; the message is shown to the tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    #[error("hostname must be 1 to 63 characters long")]
    Length,
    #[error("hostname may contain only lowercase letters, digits and '-'")]
    Character,
    #[error("hostname must not start or end with '-'")]
    Hyphen,
}

impl Hostname {
    /// Validates `s` as an RFC 1123 label.
    pub fn parse(s: &str) -> Result<Self, HostnameError> {
        if s.is_empty() || s.len() > 63 {
            return Err(HostnameError::Length);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(HostnameError::Character);
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(HostnameError::Hyphen);
        }
        Ok(Self(s.to_owned()))
    }

    /// The hostname as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_rfc1123_labels() {
        for ok in ["a", "web-1", "0day", "x".repeat(63).as_str(), "a1-b2"] {
            assert_eq!(Hostname::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        assert_eq!(Hostname::parse(""), Err(HostnameError::Length));
        assert_eq!(Hostname::parse(&"x".repeat(64)), Err(HostnameError::Length));
        assert_eq!(Hostname::parse("Web"), Err(HostnameError::Character));
        assert_eq!(Hostname::parse("web_1"), Err(HostnameError::Character));
        assert_eq!(
            Hostname::parse("web.example"),
            Err(HostnameError::Character)
        );
        assert_eq!(Hostname::parse("wéb"), Err(HostnameError::Character));
        assert_eq!(Hostname::parse("a b"), Err(HostnameError::Character));
        assert_eq!(Hostname::parse("-web"), Err(HostnameError::Hyphen));
        assert_eq!(Hostname::parse("web-"), Err(HostnameError::Hyphen));
    }
}
