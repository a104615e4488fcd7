//! SCRAM-SHA-256 verifiers (RFC 5802/7677, PostgreSQL's stored format), so a
//! tenant role's password is set without its plaintext ever appearing in SQL
//! text, where server statement logs could catch it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// PostgreSQL's default iteration count.
const ITERATIONS: u32 = 4096;

/// `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` for `password`.
/// The password must be ASCII (SASLprep is then the identity), as silo's are.
pub fn verifier(password: &str) -> String {
    debug_assert!(password.is_ascii());
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, ITERATIONS, &mut salted);
    let hmac = |key: &[u8], msg: &[u8]| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(msg);
        m.finalize().into_bytes()
    };
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key),
        B64.encode(server_key)
    )
}
