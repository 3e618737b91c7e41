//! Host credentials: what an agent presents once it has joined, derived from the server secret
//! so that no replica stores one (the hosts table keeps only a generation per host).
//!
//! `credential = base64url(HMAC-SHA256(key, "<host id>:<generation>"))` with a key derived
//! from the secret the access tokens are signed with. Every replica shares that secret, so
//! each can check a credential, and a reset (the generation goes up) retires the old one.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Derives and checks host credentials.
#[derive(Clone)]
pub struct HostCredentials {
    key: [u8; 32],
}

impl std::fmt::Debug for HostCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostCredentials { .. }")
    }
}

fn mac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().into()
}

impl HostCredentials {
    /// Keys derived from the server `secret`, apart from the other keys derived from it.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: mac(secret, b"skygate host credential v1"),
        }
    }

    /// The credential of `host_id` at `generation`.
    pub fn credential(&self, host_id: &str, generation: i64) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.key, format!("{host_id}:{generation}").as_bytes()))
    }

    /// Whether `presented` is that credential (compared in constant time).
    pub fn verify(&self, presented: &str, host_id: &str, generation: i64) -> bool {
        let expected = self.credential(host_id, generation);
        expected.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_bound_to_its_host_generation_and_secret() {
        let c = HostCredentials::new(b"0123456789abcdef0123456789abcdef");
        let cred = c.credential("host-a", 0);
        assert_eq!(cred.len(), 43);
        assert!(c.verify(&cred, "host-a", 0));
        assert!(!c.verify(&cred, "host-b", 0));
        assert!(!c.verify(&cred, "host-a", 1), "a reset retires it");
        assert!(!c.verify(&cred[..42], "host-a", 0));
        assert!(!c.verify("", "host-a", 0));
        let other = HostCredentials::new(b"another secret, thirty-two bytes");
        assert!(!other.verify(&cred, "host-a", 0));
    }
}
