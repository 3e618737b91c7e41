//! API tokens for automation (issue 15): long-lived bearer secrets a tenant mints and names.
//! They look like `sgt_` and 43 base64url characters (256 random bits), so they are told apart
//! from access tokens (JWTs) at a glance and by secret scanners; only their SHA-256 is stored.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// What every API token starts with.
pub const PREFIX: &str = "sgt_";

/// A freshly minted API token. `Debug` never shows the secret.
pub struct ApiToken {
    plaintext: String,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken { .. }")
    }
}

impl ApiToken {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        Self {
            plaintext: format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)),
        }
    }

    /// The secret, to show its owner once.
    pub fn as_str(&self) -> &str {
        &self.plaintext
    }

    /// What is stored.
    pub fn hash(&self) -> String {
        hash_api_token(&self.plaintext)
    }
}

/// Whether a bearer value is meant as an API token (rather than an access token).
pub fn is_api_token(bearer: &str) -> bool {
    bearer.starts_with(PREFIX)
}

/// The stored form of a presented token: its SHA-256, hex. 256 random bits need no salt or
/// slow hash.
pub fn hash_api_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hashed_alike() {
        let a = ApiToken::generate();
        let b = ApiToken::generate();
        assert!(is_api_token(a.as_str()));
        assert_eq!(a.as_str().len(), PREFIX.len() + 43);
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.hash(), hash_api_token(a.as_str()));
        assert!(!format!("{a:?}").contains(&a.as_str()[4..]));
        assert!(!is_api_token("eyJhbGciOi..."));
    }
}
