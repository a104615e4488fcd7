//! Secrets at rest: the master key, and what is derived from it.
//!
//! `SILO_MASTER_KEY` (32 random bytes, base64) is never used directly. HKDF-SHA256
//! derives one key per purpose: an AES-256-GCM key that seals tenant credentials
//! and server admin URLs, and a key that signs tenant tokens. Every sealed value
//! is stored with the id of the key that sealed it, so keys can be rotated later
//! by re-sealing under a new id. AES-GCM comes from RustCrypto's `aes-gcm`, the
//! audited and widely used implementation.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hkdf::Hkdf;
use rand::RngCore;
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 12;

/// Why a master key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("SILO_MASTER_KEY is not valid base64")]
    NotBase64,
    #[error("SILO_MASTER_KEY must be 32 bytes (base64 of 32 random bytes), got {0}")]
    WrongLength(usize),
    #[error("SILO_MASTER_KEY is weak (too few distinct bytes): generate one with `openssl rand -base64 32`")]
    Weak,
}

/// Sealing or opening failed: wrong key, or tampered data.
#[derive(Debug, thiserror::Error)]
#[error("could not decrypt a stored secret (key id {key_id}): wrong master key or corrupted data")]
pub struct OpenError {
    pub key_id: String,
}

/// Keys derived from the master key. `Debug` never shows them.
#[derive(Clone)]
pub struct Keyring {
    cipher: Aes256Gcm,
    key_id: String,
    token_key: [u8; 32],
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Parse and check a base64 master key.
    pub fn from_base64(encoded: &str) -> Result<Self, KeyError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| KeyError::NotBase64)?;
        let raw: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength(raw.len()))?;
        Self::from_bytes(&raw)
    }

    pub fn from_bytes(raw: &[u8; 32]) -> Result<Self, KeyError> {
        let mut distinct = raw.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        // 32 random bytes have ~31 distinct values; a handful means a made-up key.
        if distinct.len() < 12 {
            return Err(KeyError::Weak);
        }
        let hk = Hkdf::<Sha256>::new(Some(b"silo"), raw);
        let mut enc = [0u8; 32];
        hk.expand(b"silo credentials v1", &mut enc)
            .expect("32 bytes is a valid HKDF length");
        let mut token_key = [0u8; 32];
        hk.expand(b"silo tenant tokens v1", &mut token_key)
            .expect("32 bytes is a valid HKDF length");
        let id = Sha256::digest([b"silo key id v1".as_slice(), raw].concat());
        let key_id = id[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            cipher: Aes256Gcm::new(&enc.into()),
            key_id,
            token_key,
        })
    }

    /// A fresh random master key, base64 encoded (for `silo dev`).
    pub fn generate_base64() -> String {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    /// Id of the key that `seal` uses now.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Key for signing tenant tokens.
    pub fn token_key(&self) -> &[u8; 32] {
        &self.token_key
    }

    /// Encrypt `plaintext`, bound to `context` (e.g. the row id) so a sealed value
    /// cannot be moved to another row. Output: nonce || ciphertext+tag.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .expect("AES-GCM encryption of in-memory data cannot fail");
        [nonce.as_slice(), &ct].concat()
    }

    /// Decrypt a value sealed by `seal` under key `key_id` with the same context.
    pub fn open(&self, key_id: &str, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, OpenError> {
        let err = || OpenError {
            key_id: key_id.to_owned(),
        };
        if key_id != self.key_id || sealed.len() < NONCE_LEN {
            return Err(err());
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context,
                },
            )
            .map_err(|_| err())
    }

    /// `open`, for values that are UTF-8 strings.
    pub fn open_string(
        &self,
        key_id: &str,
        sealed: &[u8],
        context: &[u8],
    ) -> Result<String, OpenError> {
        let bytes = self.open(key_id, sealed, context)?;
        String::from_utf8(bytes).map_err(|_| OpenError {
            key_id: key_id.to_owned(),
        })
    }
}

/// A random password of `len` alphanumeric characters (safe inside SQL literals).
pub fn random_password(len: usize) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), len)
}

/// Constant-time equality for secrets such as bearer tokens.
pub fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Length is not secret for tokens of fixed format; content is compared in constant time.
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::from_base64(&Keyring::generate_base64()).unwrap()
    }

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_context() {
        let k = ring();
        let sealed = k.seal(b"hunter2", b"row-1");
        assert_ne!(&sealed[NONCE_LEN..], b"hunter2");
        assert_eq!(k.open(k.key_id(), &sealed, b"row-1").unwrap(), b"hunter2");
        assert!(k.open(k.key_id(), &sealed, b"row-2").is_err());
        let other = ring();
        assert!(other.open(k.key_id(), &sealed, b"row-1").is_err());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(k.open(k.key_id(), &tampered, b"row-1").is_err());
    }

    #[test]
    fn weak_short_and_garbage_master_keys_are_refused() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        assert_eq!(
            Keyring::from_base64("not base64!!").unwrap_err(),
            KeyError::NotBase64
        );
        assert_eq!(
            Keyring::from_base64(&b64(&[7; 16])).unwrap_err(),
            KeyError::WrongLength(16)
        );
        assert_eq!(
            Keyring::from_base64(&b64(&[0; 32])).unwrap_err(),
            KeyError::Weak
        );
    }

    #[test]
    fn secret_comparison_matches_only_equal_values() {
        assert!(secret_eq(b"abc", b"abc"));
        assert!(!secret_eq(b"abc", b"abd"));
        assert!(!secret_eq(b"abc", b"abcd"));
    }
}
