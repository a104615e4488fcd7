//! TLS to a tenant server on the connections silo speaks the protocol on
//! itself (the front door's), as the server's admin URL asks: its
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, with the meaning sqlx
//! gives them on the router's connections (libpq's names and defaults).
//!
//! - `disable`: plain;
//! - `allow`, `prefer` (the default): TLS when the server offers it, else
//!   plain; its certificate is not checked;
//! - `require`: TLS or no connection; the certificate is not checked;
//! - `verify-ca`: TLS, the certificate chain checked against the roots;
//! - `verify-full`: that, and the certificate must name the host.
//!
//! The roots are `sslrootcert`'s certificates (the URL's, else
//! `PGSSLROOTCERT`), or the system's when neither is given.

use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

/// How connections to one server use TLS.
#[derive(Clone)]
pub enum ServerTls {
    Off,
    /// TLS when the server offers it, else plain.
    Prefer(TlsConnector),
    /// TLS or no connection.
    Require(TlsConnector),
    /// The URL asks for TLS, but its settings cannot be used (why; no
    /// secret in it): no connection.
    Unusable(String),
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("Off"),
            Self::Prefer(_) => f.write_str("Prefer"),
            Self::Require(_) => f.write_str("Require"),
            Self::Unusable(why) => write!(f, "Unusable({why})"),
        }
    }
}

impl ServerTls {
    /// From the server's admin URL and its parsed options (which carry
    /// the `PGSSLMODE` default when the URL names no mode).
    pub fn from_url(url: &str, options: &PgConnectOptions) -> Self {
        let parsed = url::Url::parse(url).ok();
        let param = |name: &str| {
            parsed.as_ref().and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.into_owned())
            })
        };
        let mode = options.get_ssl_mode();
        if matches!(mode, PgSslMode::Disable) {
            return Self::Off;
        }
        let root = param("sslrootcert").or_else(|| std::env::var("PGSSLROOTCERT").ok());
        let client = match (param("sslcert"), param("sslkey")) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => None,
        };
        match config(mode, root.as_deref(), client) {
            Ok(c) => {
                let connector = TlsConnector::from(Arc::new(c));
                match mode {
                    PgSslMode::Allow | PgSslMode::Prefer => Self::Prefer(connector),
                    _ => Self::Require(connector),
                }
            }
            Err(why) => Self::Unusable(why),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config(
    mode: PgSslMode,
    root: Option<&str>,
    client: Option<(String, String)>,
) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        PgSslMode::VerifyCa | PgSslMode::VerifyFull => {
            let roots = roots(root)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("TLS roots: {e}"))?;
            if matches!(mode, PgSslMode::VerifyFull) {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
        _ => Arc::new(Unchecked(provider)),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = read_pem(&cert, "sslcert")?;
            let chain: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut std::io::BufReader::new(chain.as_slice()))
                    .collect::<Result<_, _>>()
                    .map_err(|_| "sslcert holds no readable certificate".to_owned())?;
            let key = read_pem(&key, "sslkey")?;
            let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(key.as_slice()))
                .ok()
                .flatten()
                .ok_or_else(|| "sslkey holds no readable private key".to_owned())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))
        }
    }
}

fn read_pem(path: &str, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {path}: {e}"))
}

fn roots(file: Option<&str>) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut store = rustls::RootCertStore::empty();
    match file {
        Some(path) => {
            let pem = read_pem(path, "sslrootcert")?;
            for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(pem.as_slice())) {
                let cert = cert.map_err(|_| format!("sslrootcert {path}: not PEM certificates"))?;
                store
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {path}: {e}"))?;
            }
        }
        None => {
            store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if store.is_empty() {
        return Err(match file {
            Some(path) => format!("sslrootcert {path} holds no certificate"),
            None => "no trusted root certificate on this system: set sslrootcert".into(),
        });
    }
    Ok(Arc::new(store))
}

/// `verify-ca`: the chain is checked, the name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`, `require`: encrypted, the certificate not checked (the
/// handshake's signatures still are).
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(url: &str) -> ServerTls {
        ServerTls::from_url(url, &url.parse().expect("url"))
    }

    #[test]
    fn the_url_s_sslmode_decides() {
        assert!(matches!(
            tls("postgres://u:p@db/x?sslmode=disable"),
            ServerTls::Off
        ));
        assert!(matches!(
            tls("postgres://u:p@db/x?sslmode=prefer"),
            ServerTls::Prefer(_)
        ));
        assert!(matches!(
            tls("postgres://u:p@db/x?sslmode=require"),
            ServerTls::Require(_)
        ));
        // Roots that cannot be read: no connection, and a reason without the URL.
        match tls("postgres://u:secret@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem") {
            ServerTls::Unusable(why) => {
                assert!(why.contains("sslrootcert /nonexistent/ca.pem"), "{why}");
                assert!(!why.contains("secret"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }
}
