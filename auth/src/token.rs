//! JWT access tokens (HS256): the signing secret, issuing, and verification.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::rngs::OsRng;
use rand::RngCore;
use uuid::Uuid;

use crate::{AuthError, Role};

/// How long an access token is valid after issue. Short, because access tokens are not
/// revocable one by one: a password change (session version bump) or this expiry ends them.
pub const ACCESS_TOKEN_TTL: chrono::Duration = chrono::Duration::minutes(15);
/// Clock skew tolerated between issuer and verifier, in seconds.
pub const LEEWAY_SECS: u64 = 30;
/// Shortest acceptable HS256 secret: 256 bits, the size of the HMAC-SHA256 output.
pub const MIN_SECRET_BYTES: usize = 32;
/// Size of a newly generated secret.
const GENERATED_SECRET_BYTES: usize = 64;
/// The `typ` claim of every access token; tells them apart from any other JWT we might sign.
const ACCESS_TYP: &str = "access";
/// Claims checked for presence by jsonwebtoken itself. `iat`, `jti` and `typ` are enforced by
/// deserialisation, as they are non-optional fields of [`AccessClaims`].
const REQUIRED_SPEC_CLAIMS: [&str; 4] = ["exp", "iss", "aud", "sub"];

/// Loads the HS256 secret from `path`, creating it on first start.
///
/// A missing file is created with mode 0600 holding 64 random bytes from the OS, hex-encoded.
/// The file is written in full under a temporary name and then hard-linked into place, which
/// fails if `path` already exists: two processes racing here never clobber each other, and the
/// loser reads the winner's complete file rather than a half-written one.
///
/// When reading, surrounding whitespace is trimmed and the content is hex-decoded if it is valid
/// hex; otherwise the raw bytes are the secret.
///
/// # Errors
/// [`AuthError::SecretFile`] on I/O failure; [`AuthError::WeakSecret`] if the secret is shorter
/// than [`MIN_SECRET_BYTES`] after decoding.
pub fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, AuthError> {
    let file_err = |source: io::Error| AuthError::SecretFile {
        path: path.to_path_buf(),
        source,
    };
    let raw = match fs::read(path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_secret_file(path).map_err(file_err)?;
            fs::read(path).map_err(file_err)?
        }
        Err(e) => return Err(file_err(e)),
    };
    let secret = decode_secret(&raw);
    if secret.len() < MIN_SECRET_BYTES {
        return Err(AuthError::WeakSecret { len: secret.len() });
    }
    Ok(secret)
}

/// Trims whitespace, then hex-decodes if possible, else takes the bytes as they are.
fn decode_secret(raw: &[u8]) -> Vec<u8> {
    let trimmed = raw.trim_ascii();
    hex::decode(trimmed).unwrap_or_else(|_| trimmed.to_vec())
}

/// Publishes a fresh secret at `path`, unless some other process got there first (then `Ok`).
fn create_secret_file(path: &Path) -> io::Result<()> {
    let mut secret = [0u8; GENERATED_SECRET_BYTES];
    OsRng.fill_bytes(&mut secret);

    let mut suffix = [0u8; 8];
    OsRng.fill_bytes(&mut suffix);
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = PathBuf::from(tmp_name);

    let result = write_new_private_file(&tmp, hex::encode(secret).as_bytes()).and_then(|()| {
        match fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        }
    });
    // Best effort: the temporary name is never read, and a leftover is harmless.
    let _ = fs::remove_file(&tmp);
    result
}

/// Creates `path` (which must not exist) readable by the owner only, writes `contents`, syncs.
fn write_new_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// The claims of a SkyGate access token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccessClaims {
    /// Issuer: the control plane's configured name.
    pub iss: String,
    /// Audience: who the token is for.
    pub aud: String,
    /// Subject: the user's UUID, as text.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds. SkyGate never sets it; typed here so that a token carrying it
    /// in any other form than a number is refused (the library skips one it cannot parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Unique token id (UUID v4), for audit logs.
    pub jti: String,
    /// Token type; always `"access"`.
    pub typ: String,
    /// The user's role when the token was issued.
    pub role: Role,
    /// The user's session version when the token was issued. It is bumped on password change,
    /// so comparing it with the stored value kills every older access token at once.
    pub sv: i64,
}

impl AccessClaims {
    /// The user id from `sub`.
    ///
    /// # Errors
    /// [`AuthError::InvalidToken`] if `sub` is not a UUID.
    pub fn user_id(&self) -> Result<Uuid, AuthError> {
        Uuid::parse_str(&self.sub)
            .map_err(|e| AuthError::InvalidToken(format!("sub is not a UUID: {e}")))
    }
}

/// Issues and verifies HS256 access tokens for one issuer and audience.
pub struct AccessTokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
}

impl fmt::Debug for AccessTokenIssuer {
    // By hand: the keys must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenIssuer")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithm", &Algorithm::HS256)
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl AccessTokenIssuer {
    /// Builds an issuer from the shared secret.
    ///
    /// # Errors
    /// [`AuthError::WeakSecret`] when `secret` is shorter than [`MIN_SECRET_BYTES`].
    pub fn new(secret: &[u8], issuer: &str, audience: &str) -> Result<Self, AuthError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(AuthError::WeakSecret { len: secret.len() });
        }
        // Validation::new pins the accepted algorithms to exactly HS256, so a token whose
        // header claims `none`, RS256 or HS512 is refused before any signature check.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        // SkyGate issues no `nbf`, but a token that carries one is held to it (RFC 8725 3.10:
        // validate every claim present): one not yet valid, or not a number, is refused.
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&REQUIRED_SPEC_CLAIMS);
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        })
    }

    /// Issues a token for `user_id`, valid for [`ACCESS_TOKEN_TTL`] from `now`.
    ///
    /// Returns the encoded token and the claims it carries.
    pub fn issue(
        &self,
        user_id: Uuid,
        role: Role,
        session_version: i64,
        now: DateTime<Utc>,
    ) -> Result<(String, AccessClaims), AuthError> {
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user_id.to_string(),
            exp: (now + ACCESS_TOKEN_TTL).timestamp(),
            iat: now.timestamp(),
            nbf: None,
            jti: Uuid::new_v4().to_string(),
            typ: ACCESS_TYP.to_owned(),
            role,
            sv: session_version,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::InvalidToken(format!("cannot encode token: {e}")))?;
        Ok((token, claims))
    }

    /// Verifies a token and returns its claims.
    ///
    /// Checks the HS256 signature (no other algorithm is accepted), `iss`, `aud`, `exp` (with
    /// [`LEEWAY_SECS`] of tolerance), that every claim is present, that `typ` is `"access"`,
    /// that `iat` is not more than the leeway in the future, and that `sub` is a UUID.
    /// Whether `sv` is still current is for the caller to check against the store.
    ///
    /// # Errors
    /// [`AuthError::InvalidToken`] for any failure; its text is for logs only.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, AuthError> {
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?
            .claims;
        if claims.typ != ACCESS_TYP {
            return Err(AuthError::InvalidToken(format!(
                "typ is {:?}, not {ACCESS_TYP:?}",
                claims.typ
            )));
        }
        let latest_iat = Utc::now().timestamp().saturating_add_unsigned(LEEWAY_SECS);
        if claims.iat > latest_iat {
            return Err(AuthError::InvalidToken(format!(
                "iat {} is in the future",
                claims.iat
            )));
        }
        claims.user_id()?;
        Ok(claims)
    }

    /// Issues and verifies one token, so that a broken key setup fails at start-up rather than
    /// at the first login.
    pub fn self_test(&self) -> Result<(), AuthError> {
        let user = Uuid::new_v4();
        let (token, issued) = self.issue(user, Role::User, 0, Utc::now())?;
        let verified = self.verify(&token)?;
        if verified != issued {
            return Err(AuthError::InvalidToken(
                "self-test: verified claims differ from issued ones".to_owned(),
            ));
        }
        Ok(())
    }

    /// How long issued tokens are valid ([`ACCESS_TOKEN_TTL`]).
    pub fn ttl(&self) -> chrono::Duration {
        ACCESS_TOKEN_TTL
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    const SECRET: &[u8] = b"0123456789abcdef-skygate-test-secret-material";
    const ISS: &str = "skygate";
    const AUD: &str = "skygate-api";

    fn issuer() -> AccessTokenIssuer {
        AccessTokenIssuer::new(SECRET, ISS, AUD).unwrap()
    }

    fn issue_at(now: DateTime<Utc>) -> (String, AccessClaims) {
        issuer().issue(Uuid::new_v4(), Role::Admin, 7, now).unwrap()
    }

    /// Builds `header.payload.signature` by hand, HMAC-signed with `alg` and `SECRET`.
    fn forge(header: &serde_json::Value, payload: &serde_json::Value, alg: Algorithm) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let sig =
            jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(SECRET), alg)
                .unwrap();
        format!("{message}.{sig}")
    }

    fn valid_payload() -> serde_json::Value {
        serde_json::to_value(issue_at(Utc::now()).1).unwrap()
    }

    fn assert_invalid(result: Result<AccessClaims, AuthError>, why: &str) {
        match result {
            Err(AuthError::InvalidToken(_)) => {}
            other => panic!("{why}: expected InvalidToken, got {other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let user = Uuid::new_v4();
        let now = Utc::now();
        let (token, claims) = issuer().issue(user, Role::Admin, 42, now).unwrap();
        assert_eq!(claims.iss, ISS);
        assert_eq!(claims.aud, AUD);
        assert_eq!(claims.typ, "access");
        assert_eq!(claims.iat, now.timestamp());
        assert_eq!(claims.exp - claims.iat, 15 * 60);
        assert_eq!(Uuid::parse_str(&claims.jti).unwrap().get_version_num(), 4);
        let verified = issuer().verify(&token).unwrap();
        assert_eq!(verified, claims);
        assert_eq!(verified.user_id().unwrap(), user);
        assert_eq!(verified.role, Role::Admin);
        assert_eq!(verified.sv, 42);
    }

    #[test]
    fn jti_is_unique_per_token() {
        let now = Utc::now();
        let user = Uuid::new_v4();
        let (_, a) = issuer().issue(user, Role::User, 0, now).unwrap();
        let (_, b) = issuer().issue(user, Role::User, 0, now).unwrap();
        assert_ne!(a.jti, b.jti);
    }

    #[test]
    fn wrong_secret_rejected() {
        let (token, _) = issue_at(Utc::now());
        let other = AccessTokenIssuer::new(&[7u8; 32], ISS, AUD).unwrap();
        assert_invalid(other.verify(&token), "wrong secret");
    }

    #[test]
    fn wrong_audience_or_issuer_rejected() {
        let (token, _) = issue_at(Utc::now());
        let wrong_aud = AccessTokenIssuer::new(SECRET, ISS, "other-api").unwrap();
        assert_invalid(wrong_aud.verify(&token), "wrong aud");
        let wrong_iss = AccessTokenIssuer::new(SECRET, "evil", AUD).unwrap();
        assert_invalid(wrong_iss.verify(&token), "wrong iss");
    }

    #[test]
    fn expiry_honours_leeway() {
        let ttl = ACCESS_TOKEN_TTL;
        let (fresh_enough, _) = issue_at(Utc::now() - ttl - chrono::Duration::seconds(10));
        assert!(issuer().verify(&fresh_enough).is_ok());
        let (too_old, _) = issue_at(Utc::now() - ttl - chrono::Duration::seconds(31));
        assert_invalid(issuer().verify(&too_old), "expired beyond leeway");
        let (long_dead, _) = issue_at(Utc::now() - chrono::Duration::minutes(16));
        assert_invalid(issuer().verify(&long_dead), "16 minutes old");
    }

    #[test]
    fn iat_in_the_future_beyond_leeway_rejected() {
        let (slightly_ahead, _) = issue_at(Utc::now() + chrono::Duration::seconds(10));
        assert!(issuer().verify(&slightly_ahead).is_ok());
        let (far_ahead, _) = issue_at(Utc::now() + chrono::Duration::seconds(120));
        assert_invalid(issuer().verify(&far_ahead), "iat 2 minutes ahead");
    }

    #[test]
    fn missing_claims_rejected() {
        #[derive(serde::Serialize)]
        struct NoJti {
            iss: String,
            aud: String,
            sub: String,
            exp: i64,
            iat: i64,
            typ: String,
            role: Role,
            sv: i64,
        }
        let now = Utc::now();
        let claims = NoJti {
            iss: ISS.into(),
            aud: AUD.into(),
            sub: Uuid::new_v4().to_string(),
            exp: (now + ACCESS_TOKEN_TTL).timestamp(),
            iat: now.timestamp(),
            typ: "access".into(),
            role: Role::User,
            sv: 0,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_invalid(issuer().verify(&token), "missing jti");

        // Each other claim, removed in turn from an otherwise valid payload.
        for claim in ["exp", "iat", "iss", "aud", "sub", "typ", "role", "sv"] {
            let mut payload = valid_payload();
            payload.as_object_mut().unwrap().remove(claim);
            let token = forge(
                &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
                &payload,
                Algorithm::HS256,
            );
            assert_invalid(issuer().verify(&token), claim);
        }
    }

    #[test]
    fn forged_payload_helper_produces_accepted_tokens() {
        // Guards the tests above: a failure there must come from the removed claim, not from a
        // broken forging helper.
        let token = forge(
            &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            &valid_payload(),
            Algorithm::HS256,
        );
        assert!(issuer().verify(&token).is_ok());
    }

    #[test]
    fn refresh_typ_rejected() {
        let mut payload = valid_payload();
        payload["typ"] = "refresh".into();
        let token = forge(
            &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            &payload,
            Algorithm::HS256,
        );
        assert_invalid(issuer().verify(&token), "typ refresh");
    }

    #[test]
    fn non_uuid_subject_rejected() {
        let mut payload = valid_payload();
        payload["sub"] = "admin".into();
        let token = forge(
            &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            &payload,
            Algorithm::HS256,
        );
        assert_invalid(issuer().verify(&token), "sub not a uuid");
    }

    #[test]
    fn nbf_is_honoured_when_present() {
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
        let now = Utc::now().timestamp();
        let with_nbf = |nbf: serde_json::Value| {
            let mut payload = valid_payload();
            payload["nbf"] = nbf;
            forge(&header, &payload, Algorithm::HS256)
        };
        issuer()
            .verify(&with_nbf((now - 10).into()))
            .expect("an nbf in the past is fine");
        assert_invalid(
            issuer().verify(&with_nbf((now + 3600).into())),
            "nbf an hour ahead",
        );
        assert_invalid(
            issuer().verify(&with_nbf(serde_json::Value::String(
                (now + 3600).to_string(),
            ))),
            "nbf as a string",
        );
        assert_invalid(
            issuer().verify(&with_nbf("soon".into())),
            "nbf not a number",
        );
    }

    #[test]
    fn unknown_role_rejected() {
        let mut payload = valid_payload();
        payload["role"] = "root".into();
        let token = forge(
            &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            &payload,
            Algorithm::HS256,
        );
        assert_invalid(issuer().verify(&token), "role root");
    }

    #[test]
    fn alg_none_rejected() {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(valid_payload().to_string())
        );
        assert_invalid(issuer().verify(&format!("{message}.")), "alg none");
        assert_invalid(issuer().verify(&message), "alg none, no signature part");
    }

    #[test]
    fn other_algorithms_rejected_even_with_valid_mac() {
        // The MAC is correct for the secret; only the header's algorithm is wrong. These must
        // fail on the algorithm pin alone (the classic RS256/HS256 confusion).
        for (header_alg, mac_alg) in [
            ("RS256", Algorithm::HS256),
            ("HS512", Algorithm::HS512),
            ("HS384", Algorithm::HS384),
        ] {
            let token = forge(
                &serde_json::json!({"alg": header_alg, "typ": "JWT"}),
                &valid_payload(),
                mac_alg,
            );
            assert_invalid(issuer().verify(&token), header_alg);
        }
    }

    #[test]
    fn tampered_payload_rejected() {
        let user = Uuid::new_v4();
        let (token, _) = issuer().issue(user, Role::User, 1, Utc::now()).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let mut payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        payload["role"] = "admin".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            parts[2]
        );
        assert_invalid(issuer().verify(&tampered), "tampered role");
        assert_invalid(issuer().verify("not.a.token"), "garbage");
        assert_invalid(issuer().verify(""), "empty");
    }

    #[test]
    fn weak_secret_rejected() {
        assert!(matches!(
            AccessTokenIssuer::new(&[1u8; 31], ISS, AUD),
            Err(AuthError::WeakSecret { len: 31 })
        ));
        assert!(AccessTokenIssuer::new(&[1u8; 32], ISS, AUD).is_ok());
    }

    #[test]
    fn debug_hides_the_secret() {
        let debug = format!("{:?}", issuer());
        assert!(debug.contains(ISS), "{debug}");
        let secret_text = std::str::from_utf8(SECRET).unwrap();
        assert!(!debug.contains(secret_text), "{debug}");
        assert!(!debug.contains("skygate-test-secret"), "{debug}");
        // Nor as a byte list, as a derived Debug of the keys would print it.
        let as_bytes = format!("{:?}", &SECRET[..4]);
        assert!(
            !debug.contains(as_bytes.trim_matches(['[', ']'])),
            "{debug}"
        );
    }

    #[test]
    fn self_test_and_ttl() {
        issuer().self_test().unwrap();
        assert_eq!(issuer().ttl(), chrono::Duration::minutes(15));
    }

    #[test]
    fn secret_file_created_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.key");
        let first = load_or_create_secret(&path).unwrap();
        assert!(first.len() >= MIN_SECRET_BYTES);
        assert_eq!(first.len(), GENERATED_SECRET_BYTES);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        }
        // Stored hex-encoded, and no temporary file left behind.
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(hex::decode(text.trim()).unwrap(), first);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        let second = load_or_create_secret(&path).unwrap();
        assert_eq!(first, second);
        // The secret works as a signing key.
        AccessTokenIssuer::new(&first, ISS, AUD)
            .unwrap()
            .self_test()
            .unwrap();
    }

    #[test]
    fn concurrent_creation_agrees_on_one_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.key");
        let secrets: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create_secret(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(secrets.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn short_secret_file_is_weak() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.key");
        fs::write(&path, b"too-short!").unwrap();
        assert!(matches!(
            load_or_create_secret(&path),
            Err(AuthError::WeakSecret { len: 10 })
        ));
        // Ten hex digits are five bytes.
        fs::write(&path, b"0123456789").unwrap();
        assert!(matches!(
            load_or_create_secret(&path),
            Err(AuthError::WeakSecret { len: 5 })
        ));
        // An empty file (say, truncated by a full disk) is weak, not silently regenerated.
        fs::write(&path, b"").unwrap();
        assert!(matches!(
            load_or_create_secret(&path),
            Err(AuthError::WeakSecret { len: 0 })
        ));
        // 40 hex digits decode to only 20 bytes: still weak.
        fs::write(&path, "ab".repeat(20)).unwrap();
        assert!(matches!(
            load_or_create_secret(&path),
            Err(AuthError::WeakSecret { len: 20 })
        ));
    }

    #[test]
    fn secret_file_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.key");
        // Hex with surrounding whitespace: decoded.
        fs::write(&path, format!("  {}\n", "0f".repeat(32))).unwrap();
        assert_eq!(load_or_create_secret(&path).unwrap(), vec![0x0f; 32]);
        // Not hex: the trimmed raw bytes.
        let raw = "this is not hex but it is long enough!";
        fs::write(&path, format!("{raw}\n")).unwrap();
        assert_eq!(load_or_create_secret(&path).unwrap(), raw.as_bytes());
    }

    #[test]
    fn missing_directory_is_a_file_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("jwt.key");
        match load_or_create_secret(&path) {
            Err(AuthError::SecretFile { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected SecretFile, got {other:?}"),
        }
    }
}
