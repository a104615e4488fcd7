//! The server side of SCRAM-SHA-256 (RFC 5802/7677) against a stored
//! verifier, as PostgreSQL does it: silo never holds an app credential's
//! password, only `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
//! Channel binding is not offered (no `-PLUS` mechanism).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";

/// A parsed verifier.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

impl Verifier {
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A verifier no password matches, with a salt derived from `seed`, so
    /// an unknown user gets the same exchange (and the same salt every
    /// time) as a known one, and learns nothing from it.
    pub fn decoy(secret: &[u8], seed: &str) -> Self {
        let salt = hmac(secret, seed.as_bytes())[..16].to_vec();
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut stored_key);
        rand::thread_rng().fill_bytes(&mut server_key);
        Self {
            iterations: crate::servers::scram::ITERATIONS,
            salt,
            stored_key,
            server_key,
        }
    }
}

/// Why an exchange failed: the client's message was not SCRAM, or the
/// proof did not match (a wrong password, or no such credential).
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    Malformed(&'static str),
    Mismatch,
}

/// An exchange in progress, after the server's first message.
pub struct Exchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

impl Exchange {
    /// Read the client's first message; returns the exchange and the
    /// server's first message.
    pub fn start(verifier: Verifier, client_first: &[u8]) -> Result<(Self, String), Failure> {
        let msg = std::str::from_utf8(client_first).map_err(|_| Failure::Malformed("not UTF-8"))?;
        // gs2-header: a channel-binding flag, an (empty) authzid.
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(Failure::Malformed("no GS2 header"))?;
        if !matches!(flag, "n" | "y") {
            return Err(Failure::Malformed("channel binding is not offered"));
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(Failure::Malformed("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(Failure::Malformed(
                "authorization identities are not supported",
            ));
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|c| (0x21..=0x7e).contains(&c) && c != b','))
            .ok_or(Failure::Malformed("no client nonce"))?;
        let mut server_nonce = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut server_nonce);
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = Self {
            verifier,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
            gs2_header: format!("{flag},,"),
        };
        Ok((exchange, server_first))
    }

    /// Check the client's final message; returns the server's final
    /// message (its signature) when the proof matches.
    pub fn finish(self, client_final: &[u8]) -> Result<String, Failure> {
        let msg = std::str::from_utf8(client_final).map_err(|_| Failure::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(Failure::Malformed("no proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                binding = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        if binding != Some(B64.encode(&self.gs2_header).as_str()) {
            return Err(Failure::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(Failure::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(Failure::Malformed("proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        if !bool::from(stored.ct_eq(&self.verifier.stored_key)) {
            return Err(Failure::Mismatch);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// rust-postgres's client against this server side.
    fn login(verifier: &str, password: &str) -> Result<(), Failure> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) =
            Exchange::start(Verifier::parse(verifier).unwrap(), client.message())?;
        client.update(server_first.as_bytes()).unwrap();
        let server_final = exchange.finish(client.message())?;
        client.finish(server_final.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn the_right_password_logs_in_and_a_wrong_one_does_not() {
        let v = crate::servers::scram::verifier("correct-horse-battery-staple");
        assert_eq!(login(&v, "correct-horse-battery-staple"), Ok(()));
        assert_eq!(
            login(&v, "correct-horse-battery-stapl"),
            Err(Failure::Mismatch)
        );
    }

    #[test]
    fn a_decoy_matches_nothing_and_keeps_its_salt() {
        let a = Verifier::decoy(b"k", "acme/app");
        let b = Verifier::decoy(b"k", "acme/app");
        assert_eq!(a.salt, b.salt);
        let mut client = ScramSha256::new(b"anything", ChannelBinding::unsupported());
        let (ex, first) = Exchange::start(a, client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(ex.finish(client.message()), Err(Failure::Mismatch));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let v = Verifier::parse(&crate::servers::scram::verifier("pw")).unwrap();
        for bad in [
            &b""[..],
            b"p=tls-server-end-point,,n=,r=abc",
            b"n,a=x,n=,r=abc",
            b"n,,n=",
            b"\xff",
        ] {
            assert!(Exchange::start(v.clone(), bad).is_err(), "{bad:?}");
        }
        let (ex, _) = Exchange::start(v, b"n,,n=,r=abc").unwrap();
        assert!(matches!(
            ex.finish(b"c=biws,r=abc,p=AAAA"),
            Err(Failure::Malformed(_))
        ));
    }
}
