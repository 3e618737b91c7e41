//! Bearer-token authentication of every HostAgent call. The presented token and the agent's
//! are both hashed with SHA-256 and the digests compared in constant time, so neither the
//! content nor the length of the token leaks through timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// A tonic interceptor that admits requests carrying `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerAuth {
    expected: [u8; 32],
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(<redacted>)")
    }
}

impl BearerAuth {
    /// Admits callers presenting `token`.
    pub fn new(token: &str) -> Self {
        BearerAuth {
            expected: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `header` (the raw `authorization` value) carries the token.
    pub fn admits(&self, header: &[u8]) -> bool {
        let Some(presented) = header.strip_prefix(b"Bearer ") else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.expected).into()
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get("authorization") {
            Some(v) if self.admits(v.as_bytes()) => Ok(request),
            // One answer for missing and wrong, like the REST API's 401.
            _ => Err(Status::unauthenticated(
                "missing or wrong bearer token in the authorization metadata",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_only_the_exact_token() {
        let auth = BearerAuth::new("s3cret");
        assert!(auth.admits(b"Bearer s3cret"));
        assert!(!auth.admits(b"Bearer s3cret "));
        assert!(!auth.admits(b"Bearer s3cre"));
        assert!(!auth.admits(b"bearer s3cret"));
        assert!(!auth.admits(b"s3cret"));
        assert!(!auth.admits(b""));
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
