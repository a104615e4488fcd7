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
    let (stored_key, server_key) = keys(password, &salt, iterations);
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key),
        B64.encode(server_key)
    )
}

/// StoredKey and ServerKey of `password` with `salt` and `iterations`.
fn keys(password: &str, salt: &[u8], iterations: u32) -> ([u8; 32], [u8; 32]) {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
    let hmac = |key: &[u8], msg: &[u8]| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(msg);
        m.finalize().into_bytes()
    };
    let client_key = hmac(&salted, b"Client Key");
    (
        Sha256::digest(client_key).into(),
        hmac(&salted, b"Server Key").into(),
    )
}

/// What a role's stored verifier is, for the password silo records for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// One of silo's verifiers of the password.
    Ours,
    /// A verifier of the password with another iteration count (at most
    /// PostgreSQL's default: one set before silo made its own verifiers).
    OfThePassword,
    /// Anything else: another password, another kind of verifier, none.
    Other,
}

/// Whether `stored` (a role's `pg_authid.rolpassword`, PostgreSQL's form)
/// verifies `password`. A count above PostgreSQL's default is [`Stored::Other`]
/// without computing: a role may store a verifier of its own making, with
/// any count, and silo never made one like it.
pub fn check(stored: Option<&str>, password: &str) -> Stored {
    let parse = |v: &str| {
        let (params, keys) = v.strip_prefix("SCRAM-SHA-256$")?.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        Some((
            iterations.parse::<u32>().ok()?,
            B64.decode(salt).ok()?,
            B64.decode(stored_key).ok()?,
            B64.decode(server_key).ok()?,
        ))
    };
    // silo's are about 130 characters; a longer one (a salt of any size) is
    // not hashed at all.
    let stored = stored.filter(|v| v.len() <= 512);
    let Some((iterations, salt, stored_key, server_key)) = stored.and_then(parse) else {
        return Stored::Other;
    };
    if iterations == 0 || iterations > POSTGRES_DEFAULT_ITERATIONS {
        return Stored::Other;
    }
    let (want_stored, want_server) = keys(password, &salt, iterations);
    if want_stored[..] != stored_key[..] || want_server[..] != server_key[..] {
        Stored::Other
    } else if iterations == ITERATIONS {
        Stored::Ours
    } else {
        Stored::OfThePassword
    }
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

    #[test]
    fn a_stored_verifier_is_told_apart_by_the_password_it_verifies() {
        let password = "correcthorsebatterystaple0123456";
        assert_eq!(check(Some(&verifier(password)), password), Stored::Ours);
        assert_eq!(check(Some(&verifier("another")), password), Stored::Other);
        assert_eq!(
            check(Some(&verifier_with(password, 4096)), password),
            Stored::OfThePassword
        );
        assert_eq!(
            check(Some(&verifier_with("another", 4096)), password),
            Stored::Other
        );
        // A count silo never uses is not computed, whatever it claims.
        let huge = verifier_with(password, 16).replacen("$16:", "$4000000000:", 1);
        assert_eq!(check(Some(&huge), password), Stored::Other);
        let salt = B64.encode(vec![7u8; 4096]);
        let long = format!("SCRAM-SHA-256$16:{salt}$AAAA:AAAA");
        assert_eq!(check(Some(&long), password), Stored::Other);
        for odd in [
            "",
            "md5d41d8cd98f00b204e9800998ecf8427e",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$16:!!$a:b",
            "SCRAM-SHA-256$0:AAAA$AAAA:AAAA",
            "SCRAM-SHA-256$16:AAAA$AAAA",
        ] {
            assert_eq!(check(Some(odd), password), Stored::Other, "{odd}");
        }
        assert_eq!(check(None, password), Stored::Other);
    }
}
