//! TLS for both ends: rustls configurations (TLS 1.3 only, ring provider), PEM loading, and
//! certificate fingerprints for trust on first use.
//!
//! A client trusts a server in one of two ways:
//! - [`PinVerifier`]: the server's certificate must have a given SHA-256 fingerprint (as ssh's
//!   known_hosts). With no fingerprint given it accepts any certificate and records what it saw:
//!   the caller must then decide (ask the user, or `--accept-new`) *before* sending credentials.
//! - [`ca_client_config`]: ordinary WebPKI verification against a CA file (`--ca`).
//!
//! Either way the TLS handshake's signature is checked against the certificate's key, so a
//! pinned fingerprint proves the peer holds the private key.

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The ring provider with AES-128-GCM first: with AES-NI it is the fastest suite here, and TLS
/// costs most of a large transfer's CPU time.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut p = provider::default_provider();
    p.cipher_suites = vec![
        provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// The certificate fingerprint users compare: `SHA256:` and the base64 of the DER's SHA-256,
/// without padding (the form ssh prints).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref()))
}

/// Reads every certificate of a PEM file.
///
/// # Errors
/// [`TlsError::Pem`] naming the file when it cannot be read or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem { path: path.display().to_string(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
///
/// # Errors
/// [`TlsError::Pem`] naming the file when it cannot be read or holds no key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::Pem { path: path.display().to_string(), reason: e.to_string() })
}

/// The server's configuration: TLS 1.3 only, no client certificates.
///
/// # Errors
/// [`TlsError::Rustls`] when the key does not match the certificate.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// A client configuration that trusts the server through `verifier`.
pub fn pinned_client_config(verifier: Arc<PinVerifier>) -> Arc<ClientConfig> {
    let cfg = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// A client configuration that trusts the CAs in a PEM file (WebPKI rules, the host name must
/// match the certificate).
///
/// # Errors
/// [`TlsError`] when the file holds no usable certificate.
pub fn ca_client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert)?;
    }
    let cfg = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Accepts a server certificate by its fingerprint (see the module doc).
#[derive(Debug)]
pub struct PinVerifier {
    expected: Option<String>,
    /// The fingerprint of the certificate the server presented in the last handshake.
    seen: Mutex<Option<String>>,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    /// Accepts only a certificate with this fingerprint (`SHA256:...`).
    pub fn pinned(fingerprint: impl Into<String>) -> Arc<PinVerifier> {
        Arc::new(PinVerifier {
            expected: Some(fingerprint.into()),
            seen: Mutex::new(None),
            provider: crypto_provider(),
        })
    }

    /// Accepts any certificate and records its fingerprint, for trust on first use: the caller
    /// checks [`PinVerifier::seen`] before it sends anything secret.
    pub fn capture() -> Arc<PinVerifier> {
        Arc::new(PinVerifier { expected: None, seen: Mutex::new(None), provider: crypto_provider() })
    }

    /// The fingerprint presented in the last handshake.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp.clone());
        match &self.expected {
            Some(expected) if *expected != fp => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_ssh_style() {
        let fp = fingerprint(&CertificateDer::from(vec![1u8, 2, 3]));
        assert!(fp.starts_with("SHA256:"));
        assert_eq!(fp.len(), 7 + 43);
    }

    /// A server and a pinned client, connected in memory (no socket), handshake done.
    fn pair() -> (rustls::ClientConnection, rustls::ServerConnection) {
        let made = rcgen::generate_simple_self_signed(vec!["homefs".to_string()]).expect("certificate");
        let cert = made.cert.der().clone();
        let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).expect("key");
        let server = server_config(vec![cert.clone()], key).expect("server config");
        let client = pinned_client_config(PinVerifier::pinned(fingerprint(&cert)));
        let name = ServerName::try_from("homefs").expect("name");
        let mut c = rustls::ClientConnection::new(client, name).expect("client");
        let mut s = rustls::ServerConnection::new(server).expect("server");
        for _ in 0..10 {
            shuttle(&mut c, &mut s);
            if !c.is_handshaking() && !s.is_handshaking() {
                return (c, s);
            }
        }
        panic!("the handshake did not finish in 10 exchanges");
    }

    /// Moves the TLS bytes each side has to send over to the other.
    fn shuttle(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("client writes");
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("server reads");
            s.process_new_packets().expect("server accepts");
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).expect("server writes");
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("client reads");
            c.process_new_packets().expect("client accepts");
        }
    }

    #[test]
    fn both_ends_settle_on_aes_128_gcm() {
        let (c, s) = pair();
        let suite = |cs: Option<rustls::SupportedCipherSuite>| cs.map(|cs| cs.suite());
        assert_eq!(suite(c.negotiated_cipher_suite()), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert_eq!(suite(s.negotiated_cipher_suite()), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    }

    /// The TLS ceiling of one connection on this machine, crypto and record handling only (no
    /// socket): 1 MiB frames encrypted by the client and decrypted by the server, one thread.
    /// `cargo test --release -p homefs-shared --lib tls_pipe_ceiling -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn tls_pipe_ceiling() {
        use std::io::{Read as _, Write as _};
        let (mut c, mut s) = pair();
        c.set_buffer_limit(None);
        let frame = vec![0x5au8; 1 << 20];
        let mut back = vec![0u8; 1 << 20];
        let frames = 512;
        let start = std::time::Instant::now();
        let mut wire = Vec::new();
        for _ in 0..frames {
            c.writer().write_all(&frame).expect("plaintext in");
            wire.clear();
            while c.wants_write() {
                c.write_tls(&mut wire).expect("client writes");
            }
            // The server holds at most 16 KiB of received plaintext: take it out as it comes.
            let (mut rd, mut got) = (&wire[..], 0);
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("server reads");
                s.process_new_packets().expect("server accepts");
                while let Ok(n @ 1..) = s.reader().read(&mut back[got..]) {
                    got += n;
                }
            }
            assert_eq!(got, frame.len(), "the whole frame arrived");
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "TLS 1.3 {:?}: {:.0} MB/s (encrypt + decrypt, one thread)",
            c.negotiated_cipher_suite().map(|cs| cs.suite()),
            frames as f64 * 1048576.0 / secs / 1e6
        );
    }
}
