//! Tenant bearer tokens: HS256 JWTs (the `jsonwebtoken` crate) signed with a
//! key derived from the master key. A token names one tenant (`sub`), the
//! tenant's token generation it was minted in (`gen`), and expires; the app
//! API accepts it only for that tenant and only while that generation is
//! current: suspending the tenant, rotating its credentials or revoking its
//! tokens starts a new generation, and every older token is refused.
//!
//! Tokens are signed with the current master key's token key; while a
//! master-key rotation is under way, tokens signed with the previous key's
//! still verify (until `SILO_MASTER_KEY_PREVIOUS` is removed).

use chrono::{DateTime, Utc};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::crypto::Keyring;

const ISSUER: &str = "silo";
const AUDIENCE: &str = "silo-app";
/// Default and longest lifetime of a tenant token.
pub const DEFAULT_TTL_SECONDS: i64 = 3600;
pub const MAX_TTL_SECONDS: i64 = 7 * 24 * 3600;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    iss: String,
    aud: String,
    iat: i64,
    exp: i64,
    /// The tenant's token generation at minting (absent in tokens minted
    /// before generations existed: generation 0).
    #[serde(default)]
    gen: i32,
}

/// What a valid token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenClaims {
    pub tenant: Uuid,
    pub generation: i32,
}

/// The token was malformed, forged, expired, or not for silo's app API.
#[derive(Debug, thiserror::Error)]
#[error("invalid or expired tenant token")]
pub struct InvalidToken;

/// Mint a token for `tenant`, in its token `generation`, valid for `ttl_seconds`.
pub fn mint(
    keyring: &Keyring,
    tenant: Uuid,
    generation: i32,
    ttl_seconds: i64,
) -> (String, DateTime<Utc>) {
    let now = Utc::now();
    let expires_at = now + chrono::Duration::seconds(ttl_seconds);
    let claims = Claims {
        sub: tenant,
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        iat: now.timestamp(),
        exp: expires_at.timestamp(),
        gen: generation,
    };
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(keyring.token_key()),
    )
    .expect("HS256 signing of serializable claims cannot fail");
    (token, expires_at)
}

/// The tenant (and generation) a valid token was minted for, signed with
/// the current token key or, during a master-key rotation, the previous one.
pub fn verify(keyring: &Keyring, token: &str) -> Result<TokenClaims, InvalidToken> {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[AUDIENCE]);
    v.leeway = 5;
    v.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
    for key in keyring.token_keys() {
        match decode::<Claims>(token, &DecodingKey::from_secret(key), &v) {
            Ok(d) => {
                return Ok(TokenClaims {
                    tenant: d.claims.sub,
                    generation: d.claims.gen,
                })
            }
            // Signed with another key: the next one may have signed it.
            Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {}
            Err(_) => return Err(InvalidToken),
        }
    }
    Err(InvalidToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::from_base64(&Keyring::generate_base64()).unwrap()
    }

    #[test]
    fn a_token_verifies_only_with_its_key_and_until_it_expires() {
        let k = ring();
        let tenant = Uuid::now_v7();
        let (token, exp) = mint(&k, tenant, 3, 60);
        assert!(exp > Utc::now());
        assert_eq!(
            verify(&k, &token).unwrap(),
            TokenClaims {
                tenant,
                generation: 3
            }
        );
        assert!(verify(&ring(), &token).is_err(), "another master key");
        let (expired, _) = mint(&k, tenant, 3, -60);
        assert!(verify(&k, &expired).is_err());
        let mut forged = token.clone();
        forged.replace_range(token.len() - 4.., "AAAA");
        assert!(verify(&k, &forged).is_err());
        assert!(verify(&k, "not.a.token").is_err());
    }

    #[test]
    fn tokens_of_the_previous_key_verify_while_it_is_configured() {
        let old_b64 = Keyring::generate_base64();
        let old = Keyring::from_base64(&old_b64).unwrap();
        let new_b64 = Keyring::generate_base64();
        let rotating = Keyring::from_base64(&new_b64)
            .unwrap()
            .with_previous(&old_b64)
            .unwrap();
        let only_new = Keyring::from_base64(&new_b64).unwrap();
        let tenant = Uuid::now_v7();
        let (before, _) = mint(&old, tenant, 1, 60);
        assert_eq!(verify(&rotating, &before).unwrap().tenant, tenant);
        assert!(verify(&only_new, &before).is_err(), "previous key dropped");
        // New tokens are signed with the new key, which the old keyring lacks.
        let (after, _) = mint(&rotating, tenant, 1, 60);
        assert!(verify(&only_new, &after).is_ok());
        assert!(verify(&old, &after).is_err());
        // Expiry still applies to tokens of the previous key.
        let (expired, _) = mint(&old, tenant, 1, -60);
        assert!(verify(&rotating, &expired).is_err());
    }
}
