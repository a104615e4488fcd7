//! The server side of SCRAM-SHA-256 (RFC 5802/7677) against a stored
//! verifier, as PostgreSQL does it: silo never holds an app credential's
//! password, only `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
//! Over TLS, `SCRAM-SHA-256-PLUS` is offered too, bound to the front door's
//! certificate (RFC 5929 `tls-server-end-point`, what libpq and PostgreSQL
//! use), so a client with `channel_binding=require` knows no one in the
//! middle relayed its login.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel-binding type PostgreSQL's clients use.
const END_POINT: &str = "tls-server-end-point";

/// What a connection can bind its SCRAM exchange to.
#[derive(Debug, Clone, Copy)]
pub enum Channel<'a> {
    /// No TLS (or a certificate with no end-point hash): `SCRAM-SHA-256` only.
    Plain,
    /// TLS, with the end-point data of the front door's certificate
    /// ([`end_point`]): `SCRAM-SHA-256-PLUS` is offered first.
    Tls(&'a [u8]),
}

impl Channel<'_> {
    /// The `AuthenticationSASL` body: the mechanisms, most preferred first.
    pub fn mechanisms(&self) -> String {
        match self {
            Self::Plain => format!("{MECHANISM}\0\0"),
            Self::Tls(_) => format!("{MECHANISM_PLUS}\0{MECHANISM}\0\0"),
        }
    }
}

/// RFC 5929's `tls-server-end-point` data of a DER certificate: its hash
/// by the hash of its signature algorithm (SHA-256 for MD5 and SHA-1).
/// `None` for an algorithm that names no single hash (Ed25519, RSA-PSS),
/// where PostgreSQL cannot bind either: `-PLUS` is not offered then.
pub fn end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Sha384, Sha512};
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(certificate).ok()?;
    let hash = match cert.signature_algorithm.oid.to_string().as_str() {
        // md5, sha1, sha256 with RSA; ecdsa with sha1, sha256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => Sha256::digest(certificate).to_vec(),
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Sha384::digest(certificate).to_vec(),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Sha512::digest(certificate).to_vec(),
        _ => return None,
    };
    Some(hash)
}

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

/// Why an exchange failed: a mechanism not offered, the client's message
/// was not SCRAM (or broke its channel-binding rules), or the proof did
/// not match (a wrong password, or no such credential).
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    Unsupported,
    Malformed(&'static str),
    Mismatch,
}

/// An exchange in progress, after the server's first message.
pub struct Exchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// What the client's final message must carry as `c=`: the GS2 header,
    /// and the channel's end-point data when it binds.
    binding: String,
}

impl Exchange {
    /// Read the client's first message for `mechanism` (one `channel`
    /// offered); returns the exchange and the server's first message.
    pub fn start(
        verifier: Verifier,
        channel: Channel<'_>,
        mechanism: &str,
        client_first: &[u8],
    ) -> Result<(Self, String), Failure> {
        let bound = match (mechanism, channel) {
            (MECHANISM, _) => None,
            (MECHANISM_PLUS, Channel::Tls(data)) => Some(data),
            _ => return Err(Failure::Unsupported),
        };
        let msg = std::str::from_utf8(client_first).map_err(|_| Failure::Malformed("not UTF-8"))?;
        // gs2-header: a channel-binding flag, an (empty) authzid.
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(Failure::Malformed("no GS2 header"))?;
        match (flag, bound, channel) {
            (_, Some(_), _) if flag.strip_prefix("p=") == Some(END_POINT) => {}
            (_, Some(_), _) => {
                return Err(Failure::Malformed(
                    "SCRAM-SHA-256-PLUS needs channel binding of type tls-server-end-point",
                ))
            }
            // "y": the client could bind but believes the server cannot,
            // which over TLS means someone took `-PLUS` out of the offer.
            ("y", None, Channel::Tls(_)) => return Err(Failure::Malformed(
                "SCRAM channel binding negotiation error: this server does support channel binding",
            )),
            ("n" | "y", None, _) => {}
            _ => {
                return Err(Failure::Malformed(
                    "channel binding needs the SCRAM-SHA-256-PLUS mechanism",
                ))
            }
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
            binding: {
                let mut input = format!("{flag},,").into_bytes();
                input.extend_from_slice(bound.unwrap_or_default());
                B64.encode(input)
            },
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
        if binding != Some(self.binding.as_str()) {
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
        let client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        exchange(verifier, Channel::Plain, MECHANISM, client)
    }

    fn exchange(
        verifier: &str,
        channel: Channel<'_>,
        mechanism: &str,
        mut client: ScramSha256,
    ) -> Result<(), Failure> {
        let verifier = Verifier::parse(verifier).unwrap();
        let (exchange, server_first) =
            Exchange::start(verifier, channel, mechanism, client.message())?;
        client.update(server_first.as_bytes()).unwrap();
        let server_final = exchange.finish(client.message())?;
        client.finish(server_final.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn a_client_binds_to_the_channel_and_a_downgrade_or_other_channel_is_refused() {
        let v = crate::servers::scram::verifier("pw");
        let ours = b"end-point data of our certificate";
        let tls = Channel::Tls(ours);
        let bound = |data: &[u8]| {
            ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(data.to_vec()))
        };
        assert_eq!(exchange(&v, tls, MECHANISM_PLUS, bound(ours)), Ok(()));
        // Bound to another certificate (a relay in the middle): refused.
        assert!(matches!(
            exchange(&v, tls, MECHANISM_PLUS, bound(b"someone else's")),
            Err(Failure::Malformed(_))
        ));
        // Plain SCRAM over TLS, from a client that cannot bind: fine.
        let plain = || ScramSha256::new(b"pw", ChannelBinding::unsupported());
        assert_eq!(exchange(&v, tls, MECHANISM, plain()), Ok(()));
        // A client that could bind but was told it cannot ("y"): refused
        // over TLS, fine without it.
        let could = || ScramSha256::new(b"pw", ChannelBinding::unrequested());
        assert!(matches!(
            exchange(&v, tls, MECHANISM, could()),
            Err(Failure::Malformed(_))
        ));
        assert_eq!(exchange(&v, Channel::Plain, MECHANISM, could()), Ok(()));
        // -PLUS without TLS, or an unknown mechanism: not offered.
        assert_eq!(
            exchange(&v, Channel::Plain, MECHANISM_PLUS, bound(ours)),
            Err(Failure::Unsupported)
        );
        assert_eq!(
            exchange(&v, tls, "SCRAM-SHA-1", plain()),
            Err(Failure::Unsupported)
        );
        assert!(Channel::Plain.mechanisms().starts_with("SCRAM-SHA-256\0"));
        assert!(tls
            .mechanisms()
            .starts_with("SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0"));
    }

    #[test]
    fn a_certificate_s_end_point_is_hashed_by_its_signature_hash() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().as_ref().to_vec();
        assert_eq!(end_point(&der), Some(sha2::Sha384::digest(&der).to_vec()));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            end_point(cert.der().as_ref()),
            None,
            "Ed25519 names no hash"
        );
        assert_eq!(end_point(b"not a certificate"), None);
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
        let (ex, first) = Exchange::start(a, Channel::Plain, MECHANISM, client.message()).unwrap();
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
            assert!(
                Exchange::start(v.clone(), Channel::Plain, MECHANISM, bad).is_err(),
                "{bad:?}"
            );
        }
        let (ex, _) = Exchange::start(v, Channel::Plain, MECHANISM, b"n,,n=,r=abc").unwrap();
        assert!(matches!(
            ex.finish(b"c=biws,r=abc,p=AAAA"),
            Err(Failure::Malformed(_))
        ));
    }
}
