//! SCRAM-SHA-256 verifiers (RFC 5802/7677, PostgreSQL's stored format), so a
//! tenant role's password is set without its plaintext ever appearing in SQL
//! text, where server statement logs could catch it.
//!
//! **Iteration count.** The verifier's PBKDF2 iteration count is paid by
//! the *client* at every login (the server only checks a proof), and the
//! client of a tenant role is silo's router, opening connections on the hot
//! path. Iterations exist to slow down guessing a low-entropy password from
//! a stolen verifier: each guess costs the attacker `i` HMACs. silo's tenant
//! passwords are 32 random alphanumeric characters (≈ 190 bits, see
//! `crypto::random_password`): no guessing is feasible at one HMAC per
//! guess, so 4096 iterations (PostgreSQL's default, ≈ 12 bits of extra
//! work) buy nothing against 190 bits, and cost every connection silo opens
//! ~1–4 ms of CPU. silo therefore uses [`ITERATIONS`] = 16. Passwords chosen
//! by people must keep a high count; none is ever set through this function.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// PBKDF2 iterations of silo's verifiers (see the module comment for why
/// this is enough for 32 random characters).
pub const ITERATIONS: u32 = 16;

/// PostgreSQL's default iteration count, for passwords people choose.
pub const POSTGRES_DEFAULT_ITERATIONS: u32 = 4096;

/// `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` for `password`.
/// The password must be ASCII (SASLprep is then the identity), as silo's are.
pub fn verifier(password: &str) -> String {
    verifier_with(password, ITERATIONS)
}

/// A verifier with a chosen iteration count (benchmarks compare counts).
pub fn verifier_with(password: &str, iterations: u32) -> String {
    debug_assert!(password.is_ascii());
    let iterations = iterations.max(1);
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
    let hmac = |key: &[u8], msg: &[u8]| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(msg);
        m.finalize().into_bytes()
    };
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key),
        B64.encode(server_key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_names_its_iteration_count_and_never_the_password() {
        let v = verifier("correcthorsebatterystaple0123456");
        assert!(
            v.starts_with(&format!("SCRAM-SHA-256${ITERATIONS}:")),
            "{v}"
        );
        assert!(!v.contains("correcthorse"));
        let v = verifier_with("x", 4096);
        assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
        // A fresh salt each time.
        assert_ne!(verifier("same"), verifier("same"));
    }
}
