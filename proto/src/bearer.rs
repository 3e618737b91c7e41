//! The shared agent token on the wire, both ways: [`BearerAuth`] checks it on a server
//! (HostAgent on agents, AgentRegistry on the control plane), [`BearerToken`] adds it on a
//! client. The presented token and the expected one are both hashed with SHA-256 and the
//! digests compared in constant time, so neither the content nor the length of the token
//! leaks through timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// Shortest agent token accepted, in bytes.
///
/// Why a floor, and why 16: this module hashes the presented and the expected token with
/// SHA-256 and compares the digests in constant time, so timing reveals neither content nor
/// length; what is left to an attacker who reaches the agent's (or the control plane's) gRPC
/// port is guessing online. 16 random visible-ASCII bytes (what `head -c 32 /dev/urandom |
/// base64` gives, twice over) are ~96 bits, far beyond that; below 16 bytes sit the words people
/// type by hand ("secret", "change-me"), which a guesser tries first. The token is one
/// long-lived secret shared by every host, so a weak one opens them all.
pub const MIN_TOKEN_BYTES: usize = 16;

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
        header
            .strip_prefix(b"Bearer ")
            .is_some_and(|presented| self.is_token(presented))
    }

    /// Whether `presented` (the token itself, without "Bearer ") is the token.
    pub fn is_token(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.expected).into()
    }

    /// The token a call presented (`authorization: Bearer <token>`), if any.
    pub fn presented<T>(request: &Request<T>) -> Option<&str> {
        request
            .metadata()
            .get("authorization")?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
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

/// A tonic client interceptor that adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// The token cannot be sent in a header (it holds characters outside visible ASCII).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidToken;

impl std::fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the agent token must be visible ASCII to travel in a gRPC header")
    }
}

impl std::error::Error for InvalidToken {}

impl BearerToken {
    /// An interceptor presenting `token`.
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(BearerToken(value))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
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

    #[test]
    fn the_client_side_presents_what_the_server_side_admits() {
        use tonic::service::Interceptor;
        let mut token = BearerToken::new("s3cret").unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
        let request = token.call(Request::new(())).unwrap();
        let header = request.metadata().get("authorization").unwrap();
        assert!(BearerAuth::new("s3cret").admits(header.as_bytes()));
        assert!(BearerToken::new("bad\ntoken").is_err());
    }
}
