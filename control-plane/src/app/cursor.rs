//! Opaque pagination cursors: a position in a keyset, signed so that a client can neither
//! forge one nor point it at another listing. A tampered cursor is a 400, not a wrong page.

use crate::error::{Error, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of MAC kept in a cursor: 128 bits is ample against forgery and keeps URLs short.
const MAC_LEN: usize = 16;

/// Signs and checks cursors with a key derived from the server secret.
#[derive(Clone)]
pub struct CursorCodec {
    key: [u8; 32],
}

impl std::fmt::Debug for CursorCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorCodec { .. }")
    }
}

fn mac(key: &[u8], data: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m
}

impl CursorCodec {
    /// Derives the cursor key from `secret` (the JWT secret), so cursors stay valid across
    /// restarts and replicas without another secret to manage.
    pub fn new(secret: &[u8]) -> Self {
        let key = mac(secret, b"skygate pagination cursor v1")
            .finalize()
            .into_bytes();
        Self { key: key.into() }
    }

    /// A cursor for position `seq` in listing `kind` (e.g. "machines").
    pub fn encode(&self, kind: &str, seq: i64) -> String {
        self.encode_text(kind, &seq.to_string())
    }

    /// The position in `kind` that `cursor` names.
    pub fn decode(&self, kind: &str, cursor: &str) -> Result<i64> {
        self.decode_text(kind, cursor)?
            .parse()
            .map_err(|_| Error::BadRequest("cursor is invalid; start again without one".into()))
    }

    /// A cursor for a position given as text (a name in a listing ordered by name).
    pub fn encode_text(&self, kind: &str, position: &str) -> String {
        let payload = format!("{kind}:{position}");
        let tag = mac(&self.key, payload.as_bytes()).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(&tag[..MAC_LEN])
        )
    }

    /// The text position in `kind` that `cursor` names.
    pub fn decode_text(&self, kind: &str, cursor: &str) -> Result<String> {
        let bad = || Error::BadRequest("cursor is invalid; start again without one".into());
        let (payload, tag) = cursor.split_once('.').ok_or_else(bad)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| bad())?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| bad())?;
        if tag.len() != MAC_LEN {
            return Err(bad());
        }
        mac(&self.key, &payload)
            .verify_truncated_left(&tag)
            .map_err(|_| bad())?;
        let text = std::str::from_utf8(&payload).map_err(|_| bad())?;
        let (k, position) = text.split_once(':').ok_or_else(bad)?;
        if k != kind {
            return Err(bad());
        }
        Ok(position.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let c = CursorCodec::new(b"0123456789abcdef0123456789abcdef");
        for seq in [0, 1, 42, i64::MAX] {
            assert_eq!(
                c.decode("machines", &c.encode("machines", seq)).unwrap(),
                seq
            );
        }
    }

    #[test]
    fn text_positions_round_trip_and_stay_apart_from_numbers() {
        let c = CursorCodec::new(b"0123456789abcdef0123456789abcdef");
        for name in ["a", "laptop@home", "x:y"] {
            assert_eq!(
                c.decode_text("ssh-keys", &c.encode_text("ssh-keys", name))
                    .unwrap(),
                name
            );
        }
        assert!(c
            .decode("ssh-keys", &c.encode_text("ssh-keys", "laptop"))
            .is_err());
    }

    #[test]
    fn refuses_tampering_other_keys_and_other_listings() {
        let c = CursorCodec::new(b"0123456789abcdef0123456789abcdef");
        let cursor = c.encode("machines", 100);
        let (payload, tag) = cursor.split_once('.').unwrap();
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode("machines:99"));
        assert!(c.decode("machines", &forged).is_err());
        assert!(c
            .decode("machines", &format!("{payload}.{}", &tag[1..]))
            .is_err());
        assert!(c.decode("events", &cursor).is_err());
        assert!(c.decode("machines", "garbage").is_err());
        assert!(c.decode("machines", "").is_err());
        let other = CursorCodec::new(b"another secret of thirty-two b..");
        assert!(other.decode("machines", &cursor).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Every position round-trips, and no change to a cursor's text ever decodes to
            /// another position: it is refused (or, if the change is invisible to the decoder,
            /// names the same position).
            #[test]
            fn tampering_never_moves_a_cursor(
                seq in any::<i64>(),
                at in any::<prop::sample::Index>(),
                with in prop::char::range('-', 'z'),
            ) {
                let c = CursorCodec::new(b"0123456789abcdef0123456789abcdef");
                let cursor = c.encode("machines", seq);
                prop_assert_eq!(c.decode("machines", &cursor).unwrap(), seq);
                let mut chars: Vec<char> = cursor.chars().collect();
                let i = at.index(chars.len());
                chars[i] = with;
                let tampered: String = chars.into_iter().collect();
                if let Ok(found) = c.decode("machines", &tampered) {
                    prop_assert_eq!(found, seq);
                }
                prop_assert!(c.decode("events", &cursor).is_err());
            }

            /// Text positions (names) round-trip whatever they contain.
            #[test]
            fn text_positions_round_trip(name in ".{0,80}") {
                let c = CursorCodec::new(b"0123456789abcdef0123456789abcdef");
                prop_assert_eq!(c.decode_text("ssh-keys", &c.encode_text("ssh-keys", &name)).unwrap(), name);
            }
        }
    }
}
