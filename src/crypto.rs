//! Secrets at rest: the master key, and what is derived from it.
//!
//! `SILO_MASTER_KEY` (32 random bytes, base64) is never used directly. HKDF-SHA256
//! derives one key per purpose: an AES-256-GCM key that seals tenant credentials
//! and server admin URLs, and a key that signs tenant tokens. Every sealed value
//! is stored with the id of the key that sealed it.
//!
//! A [`Keyring`] holds the current master key, which seals and signs, and
//! optionally the previous one (`SILO_MASTER_KEY_PREVIOUS`) while a rotation is
//! under way: it only opens values sealed under its key id and verifies tokens
//! signed with its token key. `silo master-key rotate` re-seals every stored
//! value under the current key. AES-GCM comes from RustCrypto's `aes-gcm`,
//! the audited and widely used implementation.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hkdf::Hkdf;
use rand::RngCore;
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 12;

/// The variable holding the current master key.
pub const MASTER_KEY_VAR: &str = "SILO_MASTER_KEY";
/// The variable holding the master key being rotated away from.
pub const PREVIOUS_KEY_VAR: &str = "SILO_MASTER_KEY_PREVIOUS";

/// Why a master key was refused; each names the variable it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{0} is not valid base64")]
    NotBase64(&'static str),
    #[error("{0} must be 32 bytes (base64 of 32 random bytes), got {1}")]
    WrongLength(&'static str, usize),
    #[error("{0} is weak (too few distinct bytes): generate one with `openssl rand -base64 32`")]
    Weak(&'static str),
    #[error("SILO_MASTER_KEY_PREVIOUS is the same key as SILO_MASTER_KEY: set it to the key being rotated away from, or unset it")]
    PreviousIsCurrent,
}

/// Opening a sealed value failed: a key id this keyring does not hold, or
/// data that does not open under the key it names (tampered, or moved to
/// another row).
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct OpenError {
    /// The key id the value was stored with.
    pub key_id: String,
    /// `true` when no key of this keyring has that id.
    pub unknown_key: bool,
}

impl OpenError {
    fn describe(&self) -> String {
        if self.unknown_key {
            format!(
                "could not decrypt a stored secret: it is sealed under master key id {}, which is neither SILO_MASTER_KEY nor SILO_MASTER_KEY_PREVIOUS (a master key rotation is under way or unfinished: set SILO_MASTER_KEY_PREVIOUS to the key being rotated away from)",
                self.key_id
            )
        } else {
            format!(
                "could not decrypt a stored secret (key id {}): wrong master key or corrupted data",
                self.key_id
            )
        }
    }
}

/// One master key's derived keys. `Debug` never shows them.
#[derive(Clone)]
struct Key {
    cipher: Aes256Gcm,
    id: String,
    token_key: [u8; 32],
}

impl Key {
    /// Parse and check a base64 master key read from `var`.
    fn from_base64(var: &'static str, encoded: &str) -> Result<Self, KeyError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| KeyError::NotBase64(var))?;
        let raw: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength(var, raw.len()))?;
        Self::from_bytes(var, &raw)
    }

    fn from_bytes(var: &'static str, raw: &[u8; 32]) -> Result<Self, KeyError> {
        let mut distinct = raw.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        // 32 random bytes have ~31 distinct values; a handful means a made-up key.
        if distinct.len() < 12 {
            return Err(KeyError::Weak(var));
        }
        let hk = Hkdf::<Sha256>::new(Some(b"silo"), raw);
        let mut enc = [0u8; 32];
        hk.expand(b"silo credentials v1", &mut enc)
            .expect("32 bytes is a valid HKDF length");
        let mut token_key = [0u8; 32];
        hk.expand(b"silo tenant tokens v1", &mut token_key)
            .expect("32 bytes is a valid HKDF length");
        let id = Sha256::digest([b"silo key id v1".as_slice(), raw].concat());
        let id = id[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            cipher: Aes256Gcm::new(&enc.into()),
            id,
            token_key,
        })
    }
}

/// The current master key's derived keys, and the previous key's while a
/// rotation is under way. `Debug` shows key ids only.
#[derive(Clone)]
pub struct Keyring {
    current: Key,
    previous: Option<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("key_id", &self.current.id)
            .field("previous_key_id", &self.previous.as_ref().map(|k| &k.id))
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Parse and check a base64 master key (`SILO_MASTER_KEY`).
    pub fn from_base64(encoded: &str) -> Result<Self, KeyError> {
        Ok(Self {
            current: Key::from_base64(MASTER_KEY_VAR, encoded)?,
            previous: None,
        })
    }

    pub fn from_bytes(raw: &[u8; 32]) -> Result<Self, KeyError> {
        Ok(Self {
            current: Key::from_bytes(MASTER_KEY_VAR, raw)?,
            previous: None,
        })
    }

    /// This keyring, also holding the previous master key (base64,
    /// `SILO_MASTER_KEY_PREVIOUS`) to open what it sealed and verify what it
    /// signed. Refused if it is weak or the same as the current key.
    pub fn with_previous(self, encoded: &str) -> Result<Self, KeyError> {
        let previous = Key::from_base64(PREVIOUS_KEY_VAR, encoded)?;
        if previous.id == self.current.id {
            return Err(KeyError::PreviousIsCurrent);
        }
        Ok(Self {
            previous: Some(previous),
            ..self
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
        &self.current.id
    }

    /// Id of the previous key, when one is configured.
    pub fn previous_key_id(&self) -> Option<&str> {
        self.previous.as_ref().map(|k| k.id.as_str())
    }

    /// `true` when this keyring holds the key with this id.
    pub fn holds(&self, key_id: &str) -> bool {
        self.key(key_id).is_some()
    }

    /// Key for signing tenant tokens (the current one).
    pub fn token_key(&self) -> &[u8; 32] {
        &self.current.token_key
    }

    /// Keys that verify tenant tokens: the current one, then the previous.
    pub fn token_keys(&self) -> impl Iterator<Item = &[u8; 32]> {
        std::iter::once(&self.current.token_key).chain(self.previous.iter().map(|k| &k.token_key))
    }

    fn key(&self, key_id: &str) -> Option<&Key> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|k| k.id == key_id)
    }

    /// Encrypt `plaintext` under the current key, bound to `context` (e.g.
    /// the row id) so a sealed value cannot be moved to another row.
    /// Output: nonce || ciphertext+tag.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .current
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

    /// Decrypt a value sealed by `seal` under key `key_id` (the current or
    /// the previous key) with the same context.
    pub fn open(&self, key_id: &str, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, OpenError> {
        let err = |unknown_key| OpenError {
            key_id: key_id.to_owned(),
            unknown_key,
        };
        let key = self.key(key_id).ok_or_else(|| err(true))?;
        if sealed.len() < NONCE_LEN {
            return Err(err(false));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        key.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context,
                },
            )
            .map_err(|_| err(false))
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
            unknown_key: false,
        })
    }

    /// Open a value sealed under `key_id` and seal it again under the
    /// current key: same plaintext, same context, new ciphertext.
    pub fn reseal(
        &self,
        key_id: &str,
        sealed: &[u8],
        context: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        let plaintext = self.open(key_id, sealed, context)?;
        Ok(self.seal(&plaintext, context))
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

/// What every admin key's token starts with: a leaked one is recognised (by
/// people and by secret scanners), and a bearer token without it is refused
/// without a lookup in the control database.
pub const ADMIN_KEY_PREFIX: &str = "silo_ak_";
/// Random bytes in an admin key's token (256 bits).
const ADMIN_KEY_BYTES: usize = 32;
/// Length of an admin key's token: the prefix and 43 base64url characters.
const ADMIN_KEY_LEN: usize = ADMIN_KEY_PREFIX.len() + (ADMIN_KEY_BYTES * 4).div_ceil(3);

/// A new admin key's token and its hash. The token is shown once, to whoever
/// made the key; only the hash is stored. No `Debug`: it holds the token.
pub struct AdminKeyToken {
    pub token: String,
    pub hash: [u8; 32],
}

impl AdminKeyToken {
    /// [`ADMIN_KEY_PREFIX`] and 32 bytes from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut raw = [0u8; ADMIN_KEY_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = format!(
            "{ADMIN_KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let hash = admin_key_hash(&token);
        Self { token, hash }
    }
}

/// `true` when `token` has the shape of an admin key's token (worth a lookup).
pub fn is_admin_key_shaped(token: &str) -> bool {
    token.len() == ADMIN_KEY_LEN && token.starts_with(ADMIN_KEY_PREFIX)
}

/// The stored form of an admin key's token: one SHA-256 of it.
///
/// A password needs a slow, salted hash (argon2, bcrypt) because a person
/// chose it from a small space: whoever steals the hashes can try likely
/// passwords offline, and the hash's cost is what slows each guess. This
/// token is 256 bits from the OS CSPRNG, never chosen by a person: there is
/// no likely value to try, only 2^256 equally likely ones (at 10^18 SHA-256
/// a second, about 10^51 years to search), so a slow hash would add nothing
/// against a stolen table but cost on every request. Being
/// unsalted and deterministic, it is also what the key is found by: one
/// indexed lookup, no secret compared in a loop. (Timing of that lookup can
/// reveal at most something of a hash, which does not help find a token.)
pub fn admin_key_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_key_tokens_are_random_prefixed_and_stored_as_their_sha256() {
        let a = AdminKeyToken::generate();
        let b = AdminKeyToken::generate();
        assert_ne!(a.token, b.token);
        for t in [&a, &b] {
            assert!(is_admin_key_shaped(&t.token), "{}", t.token);
            assert_eq!(t.hash, admin_key_hash(&t.token));
        }
        assert!(!is_admin_key_shaped("silo_ak_short"));
        assert!(!is_admin_key_shaped(
            &a.token.replace("silo_ak_", "silo_xx_")
        ));
    }

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
            KeyError::NotBase64(MASTER_KEY_VAR)
        );
        assert_eq!(
            Keyring::from_base64(&b64(&[7; 16])).unwrap_err(),
            KeyError::WrongLength(MASTER_KEY_VAR, 16)
        );
        assert_eq!(
            Keyring::from_base64(&b64(&[0; 32])).unwrap_err(),
            KeyError::Weak(MASTER_KEY_VAR)
        );
    }

    #[test]
    fn a_previous_key_opens_what_it_sealed_and_never_seals() {
        let old_b64 = Keyring::generate_base64();
        let old = Keyring::from_base64(&old_b64).unwrap();
        let sealed_old = old.seal(b"hunter2", b"row-1");
        let ring = ring().with_previous(&old_b64).unwrap();
        assert_eq!(ring.previous_key_id(), Some(old.key_id()));
        assert_ne!(ring.key_id(), old.key_id());
        assert_eq!(
            ring.open(old.key_id(), &sealed_old, b"row-1").unwrap(),
            b"hunter2"
        );
        // New values are sealed under the current key only.
        let sealed_new = ring.seal(b"hunter3", b"row-1");
        assert!(old.open(old.key_id(), &sealed_new, b"row-1").is_err());
        assert_eq!(
            ring.open(ring.key_id(), &sealed_new, b"row-1").unwrap(),
            b"hunter3"
        );
        // The key is picked by id: a value under one id does not open as the other.
        assert!(
            !ring
                .open(ring.key_id(), &sealed_old, b"row-1")
                .unwrap_err()
                .unknown_key
        );
        // Re-sealing keeps the plaintext and the context.
        let resealed = ring.reseal(old.key_id(), &sealed_old, b"row-1").unwrap();
        assert_eq!(
            ring.open(ring.key_id(), &resealed, b"row-1").unwrap(),
            b"hunter2"
        );
        assert!(ring.open(ring.key_id(), &resealed, b"row-2").is_err());
    }

    #[test]
    fn an_unknown_key_id_is_named_with_the_variable_that_would_hold_it() {
        let ring = ring();
        let err = ring
            .open("0badc0de", b"0123456789abcdef", b"x")
            .unwrap_err();
        assert!(err.unknown_key);
        let msg = err.to_string();
        assert!(msg.contains("0badc0de"), "{msg}");
        assert!(msg.contains(PREVIOUS_KEY_VAR), "{msg}");
    }

    #[test]
    fn a_previous_key_equal_to_the_current_or_weak_is_refused_by_name() {
        use base64::Engine;
        let key = Keyring::generate_base64();
        let ring = Keyring::from_base64(&key).unwrap();
        assert_eq!(
            ring.clone().with_previous(&key).unwrap_err(),
            KeyError::PreviousIsCurrent
        );
        let weak = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let err = ring.clone().with_previous(&weak).unwrap_err();
        assert_eq!(err, KeyError::Weak(PREVIOUS_KEY_VAR));
        assert!(err.to_string().starts_with("SILO_MASTER_KEY_PREVIOUS "));
        assert_eq!(
            ring.with_previous("x").unwrap_err(),
            KeyError::NotBase64(PREVIOUS_KEY_VAR)
        );
    }

    #[test]
    fn debug_shows_key_ids_only() {
        let old = Keyring::generate_base64();
        let ring = ring().with_previous(&old).unwrap();
        let shown = format!("{ring:?}");
        assert!(shown.contains(ring.key_id()), "{shown}");
        assert!(!shown.contains(&old), "{shown}");
        assert!(
            !shown.contains("cipher") && !shown.contains("token_key"),
            "{shown}"
        );
    }

    #[test]
    fn secret_comparison_matches_only_equal_values() {
        assert!(secret_eq(b"abc", b"abc"));
        assert!(!secret_eq(b"abc", b"abd"));
        assert!(!secret_eq(b"abc", b"abcd"));
    }
}
