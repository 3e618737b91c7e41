//! Opaque refresh tokens: minting, hashing for storage, and the rotation decision.
//!
//! Refresh tokens rotate: every use spends the presented token and mints a successor in the
//! same *family*. Presenting a spent (or revoked) token again means a copy leaked, so the whole
//! family is revoked. A family lives at most [`REFRESH_ABSOLUTE_TTL`] from its first login, and
//! each token dies after [`REFRESH_IDLE_TTL`] unused.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// How long a refresh token stays valid unused, counted from when it was minted.
pub const REFRESH_IDLE_TTL: chrono::Duration = chrono::Duration::days(7);
/// How long a family of refresh tokens lives at most, counted from the login that began it.
pub const REFRESH_ABSOLUTE_TTL: chrono::Duration = chrono::Duration::days(30);
/// Random bytes per token: 256 bits, beyond guessing, and enough that an unsalted fast hash is a
/// safe thing to store.
const TOKEN_BYTES: usize = 32;

/// A freshly minted opaque refresh token: 32 random bytes from the OS, base64url without padding
/// (43 characters).
///
/// The plaintext goes to the client once; only [`RefreshToken::hash`] is stored. `Debug` shows
/// the hash, never the plaintext.
pub struct RefreshToken {
    plaintext: String,
}

impl RefreshToken {
    /// Mints a new token.
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_BYTES];
        OsRng.fill_bytes(&mut bytes);
        Self {
            plaintext: URL_SAFE_NO_PAD.encode(bytes),
        }
    }

    /// The plaintext token, to hand to the client (once).
    pub fn as_str(&self) -> &str {
        &self.plaintext
    }

    /// The value to store: [`hash_refresh_token`] of the plaintext.
    pub fn hash(&self) -> String {
        hash_refresh_token(&self.plaintext)
    }
}

impl fmt::Debug for RefreshToken {
    // By hand: the plaintext is a bearer credential. The hash is what the database holds anyway,
    // and lets a log line be matched with a row.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshToken")
            .field("hash", &self.hash())
            .finish_non_exhaustive()
    }
}

/// Lowercase hex SHA-256 of the token text: all the database ever stores.
///
/// A plain fast hash suffices because tokens are 256-bit random values, not human secrets; and
/// since lookup is by this hash, a stolen database yields no usable tokens. No constant-time
/// comparison is needed: the store finds the row by hash, and timing of that lookup reveals
/// nothing about a preimage.
pub fn hash_refresh_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What the store knows about a presented refresh token (the row found by its hash).
#[derive(Debug, Clone)]
pub struct RefreshRecord {
    /// When this token was minted; idle expiry counts from here.
    pub created_at: DateTime<Utc>,
    /// When the family began (the login); absolute expiry counts from here.
    pub family_created_at: DateTime<Utc>,
    /// When the token (or its family) was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether the token was already rotated, i.e. spent.
    pub replaced: bool,
}

/// What to do with a presented refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshDecision {
    /// Valid: mark it replaced, mint a successor in the same family, issue an access token.
    Rotate,
    /// A spent or revoked token was presented: assume theft and revoke the whole family.
    Reuse,
    /// Past its idle or absolute expiry: refuse; the user must log in again.
    Expired,
}

/// Decides what to do with a presented refresh token. Pure: the caller applies the decision.
///
/// Order matters: a spent or revoked token is [`RefreshDecision::Reuse`] even when it has also
/// expired, so replaying an old stolen token still revokes its family. A revoked token's family
/// is normally revoked already; revoking again is harmless. A token is expired from the instant
/// [`expires_at`] returns, inclusive.
pub fn decide(record: &RefreshRecord, now: DateTime<Utc>) -> RefreshDecision {
    if record.replaced || record.revoked_at.is_some() {
        return RefreshDecision::Reuse;
    }
    if now >= expires_at(record.created_at, record.family_created_at) {
        return RefreshDecision::Expired;
    }
    RefreshDecision::Rotate
}

/// When a token minted at `now`, in a family begun at `family_created_at`, expires: its idle
/// expiry, capped by the family's absolute expiry.
pub fn expires_at(now: DateTime<Utc>, family_created_at: DateTime<Utc>) -> DateTime<Utc> {
    std::cmp::min(
        now + REFRESH_IDLE_TTL,
        family_created_at + REFRESH_ABSOLUTE_TTL,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use std::collections::HashSet;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
    }

    fn record(created_at: DateTime<Utc>, family_created_at: DateTime<Utc>) -> RefreshRecord {
        RefreshRecord {
            created_at,
            family_created_at,
            revoked_at: None,
            replaced: false,
        }
    }

    #[test]
    fn generated_tokens_are_distinct_43_char_base64url() {
        let tokens: Vec<RefreshToken> = (0..100).map(|_| RefreshToken::generate()).collect();
        let distinct: HashSet<&str> = tokens.iter().map(RefreshToken::as_str).collect();
        assert_eq!(distinct.len(), tokens.len());
        for t in &tokens {
            assert_eq!(t.as_str().len(), 43, "{}", t.as_str());
            assert_eq!(URL_SAFE_NO_PAD.decode(t.as_str()).unwrap().len(), 32);
            assert!(t
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }

    #[test]
    fn hash_is_stable_lowercase_hex_sha256() {
        let token = RefreshToken::generate();
        let h = token.hash();
        assert_eq!(h.len(), 64);
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(h, token.hash());
        assert_eq!(h, hash_refresh_token(token.as_str()));
        assert_ne!(h, RefreshToken::generate().hash());
        // Known answer, so the stored format cannot drift silently.
        assert_eq!(
            hash_refresh_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn debug_hides_plaintext() {
        let token = RefreshToken::generate();
        let debug = format!("{token:?}");
        assert!(!debug.contains(token.as_str()), "{debug}");
        assert!(debug.contains(&token.hash()), "{debug}");
    }

    #[test]
    fn fresh_token_rotates() {
        let r = record(t0(), t0());
        assert_eq!(decide(&r, t0()), RefreshDecision::Rotate);
        assert_eq!(
            decide(&r, t0() + Duration::days(3)),
            RefreshDecision::Rotate
        );
    }

    #[test]
    fn idle_expiry_boundary() {
        let r = record(t0(), t0());
        let edge = t0() + REFRESH_IDLE_TTL;
        assert_eq!(
            decide(&r, edge - Duration::seconds(1)),
            RefreshDecision::Rotate
        );
        assert_eq!(decide(&r, edge), RefreshDecision::Expired);
        assert_eq!(
            decide(&r, edge + Duration::seconds(1)),
            RefreshDecision::Expired
        );
    }

    #[test]
    fn absolute_expiry_boundary() {
        // Minted recently (idle is fine), but the family is about to reach 30 days.
        let family = t0();
        let minted = family + Duration::days(29);
        let r = record(minted, family);
        let edge = family + REFRESH_ABSOLUTE_TTL;
        assert!(minted + REFRESH_IDLE_TTL > edge);
        assert_eq!(
            decide(&r, edge - Duration::seconds(1)),
            RefreshDecision::Rotate
        );
        assert_eq!(decide(&r, edge), RefreshDecision::Expired);
    }

    #[test]
    fn replaced_token_is_reuse_even_when_expired() {
        let mut r = record(t0(), t0());
        r.replaced = true;
        assert_eq!(decide(&r, t0()), RefreshDecision::Reuse);
        assert_eq!(
            decide(&r, t0() + Duration::days(365)),
            RefreshDecision::Reuse
        );
    }

    #[test]
    fn revoked_token_is_reuse_even_when_expired() {
        let mut r = record(t0(), t0());
        r.revoked_at = Some(t0() + Duration::hours(1));
        assert_eq!(
            decide(&r, t0() + Duration::hours(2)),
            RefreshDecision::Reuse
        );
        assert_eq!(
            decide(&r, t0() + Duration::days(60)),
            RefreshDecision::Reuse
        );
        r.replaced = true;
        assert_eq!(decide(&r, t0()), RefreshDecision::Reuse);
    }

    #[test]
    fn expires_at_is_idle_until_the_absolute_cap() {
        let family = t0();
        // Early in the family: the idle window.
        assert_eq!(expires_at(family, family), family + Duration::days(7));
        let day10 = family + Duration::days(10);
        assert_eq!(expires_at(day10, family), day10 + Duration::days(7));
        // Exactly where the two meet.
        let day23 = family + Duration::days(23);
        assert_eq!(expires_at(day23, family), family + Duration::days(30));
        // Late in the family: capped at 30 days from its start.
        let day28 = family + Duration::days(28);
        assert_eq!(expires_at(day28, family), family + Duration::days(30));
        // A token minted after the cap already expired at mint time.
        let day31 = family + Duration::days(31);
        assert!(expires_at(day31, family) < day31);
    }

    #[test]
    fn decide_agrees_with_expires_at() {
        let family = t0();
        for minted_day in [0, 5, 22, 23, 24, 29] {
            let minted = family + Duration::days(minted_day);
            let r = record(minted, family);
            let exp = expires_at(minted, family);
            assert_eq!(
                decide(&r, exp - Duration::milliseconds(1)),
                RefreshDecision::Rotate
            );
            assert_eq!(decide(&r, exp), RefreshDecision::Expired);
        }
    }
}
