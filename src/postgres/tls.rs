//! TLS for PostgreSQL connections: the rustls client configurations for each `sslmode`, shared
//! by the replication connection and the ordinary SQL connections, and the `tls-server-end-point`
//! channel-binding hash used by SCRAM-SHA-256-PLUS.
//!
//! Only the ring crypto provider is used, always passed explicitly (never the process default).
//!
//! | sslmode     | chain verified              | host name checked |
//! |-------------|-----------------------------|-------------------|
//! | prefer      | only with `sslrootcert` set    | no             |
//! | require     | only with `sslrootcert` set    | no             |
//! | verify-ca   | yes (`sslrootcert` required)   | no             |
//! | verify-full | yes (`sslrootcert` required)   | yes            |
//!
//! Without chain verification, handshake signatures are still checked. Roots come from
//! `ssl_root_cert` (a PEM file) or, when it is `system`, from the system's trust store
//! (rustls-native-certs), as libpq's `sslrootcert`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

use crate::postgres::config::{ClientCert, PgConnectionConfig, SYSTEM_ROOT_CERTS, SslMode};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read root certificates from {path}: {reason}")]
    RootCertFile { path: PathBuf, reason: String },
    #[error("no usable root certificate in {source_name}")]
    NoRootCertificates { source_name: String },
    #[error("cannot set up TLS: {0}")]
    Rustls(String),
    #[error("sslmode={mode} needs root certificates to verify the server against (sslrootcert), and none is set")]
    NoRootFile { mode: &'static str },
    #[error("cannot use the client certificate or key {path}: {reason}")]
    ClientCert { path: PathBuf, reason: String },
    #[error("host {host:?} is not a valid name for TLS certificate verification: {reason}")]
    InvalidServerName { host: String, reason: String },
}

/// The ring crypto provider, as used by every TLS configuration of this crate.
pub fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `cfg.ssl_mode` (`None` for `disable`).
pub fn client_config_for(cfg: &PgConnectionConfig) -> Result<Option<Arc<ClientConfig>>, TlsConfigError> {
    client_config(cfg.ssl_mode, cfg.ssl_root_cert.as_deref(), cfg.ssl_client_cert.as_ref())
}

/// The rustls client configuration for `mode` (`None` for `disable`), as libpq:
/// - with `root_cert` set, the chain is verified against it in every mode (`prefer` and
///   `require` then behave as `verify-ca`); [`SYSTEM_ROOT_CERTS`] means the system's trust store;
/// - without, `prefer` and `require` accept any certificate, and `verify-ca`/`verify-full` are
///   refused (libpq would look for `~/.postgresql/root.crt`; the caller resolves that default).
///
/// `client_cert` is presented when the server asks for a client certificate.
pub fn client_config(
    mode: SslMode,
    root_cert: Option<&Path>,
    client_cert: Option<&ClientCert>,
) -> Result<Option<Arc<ClientConfig>>, TlsConfigError> {
    let provider = ring_provider();
    let algorithms = provider.signature_verification_algorithms;
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let roots = match root_cert {
        Some(path) => Some(Arc::new(load_roots(path)?)),
        None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(TlsConfigError::NoRootFile { mode: mode.as_str() });
        }
        None => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsConfigError::Rustls(e.to_string()))?,
        (_, roots) => Arc::new(NoHostNameVerifier { roots, algorithms }),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let (chain, key) = load_client_cert(c)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsConfigError::ClientCert {
                    path: c.key.clone(),
                    reason: e.to_string(),
                })?
        }
    };
    // What libpq 17 sends; servers without ALPN support ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(Arc::new(config)))
}

fn load_client_cert(c: &ClientCert) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsConfigError> {
    let chain = CertificateDer::pem_file_iter(&c.cert)
        .map_err(|e| TlsConfigError::ClientCert {
            path: c.cert.clone(),
            reason: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::ClientCert {
            path: c.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsConfigError::ClientCert {
            path: c.cert.clone(),
            reason: "no PEM certificate in the file".into(),
        });
    }
    // The key's own errors never quote the key.
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| TlsConfigError::ClientCert {
        path: c.key.clone(),
        reason: match e {
            rustls::pki_types::pem::Error::Io(io) => io.to_string(),
            _ => "not a PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
        },
    })?;
    Ok((chain, key))
}

/// The name given to rustls for `host` (and sent as SNI when it is a DNS name).
///
/// For `verify-full` the name must be a valid DNS name or IP address. For the other modes the name
/// is not checked, so a host that is not a valid DNS name is replaced by an IP placeholder (which
/// also means no SNI is sent).
pub fn server_name(host: &str, mode: SslMode) -> Result<ServerName<'static>, TlsConfigError> {
    match ServerName::try_from(host.to_owned()) {
        Ok(name) => Ok(name),
        Err(e) if mode == SslMode::VerifyFull => Err(TlsConfigError::InvalidServerName {
            host: host.to_owned(),
            reason: e.to_string(),
        }),
        Err(_) => Ok(ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())),
    }
}

fn load_roots(root_cert: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    let source_name = match Some(root_cert).filter(|p| p.as_os_str() != SYSTEM_ROOT_CERTS) {
        Some(path) => {
            let file_error = |reason: String| TlsConfigError::RootCertFile {
                path: path.to_owned(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| file_error(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_error(e.to_string()))?;
            let (_added, _ignored) = roots.add_parsable_certificates(certs);
            path.display().to_string()
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "while loading the system's root certificates");
            }
            let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
            "the system's trust store".to_owned()
        }
    };
    if roots.is_empty() {
        return Err(TlsConfigError::NoRootCertificates { source_name });
    }
    Ok(roots)
}

/// The verifier for the modes that do not check the host name: `sslmode=prefer`/`require`
/// (`roots: None`: any certificate is accepted) and `verify-ca` (the chain must lead to one of
/// `roots`). Handshake signatures are always checked, so the peer holds the key of the
/// certificate it presented, which channel binding relies on.
#[derive(Debug)]
struct NoHostNameVerifier {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoHostNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algorithms.all)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The hash function of the `tls-server-end-point` channel binding (RFC 5929 §4.1): the hash of
/// the certificate's signature algorithm, with MD5 and SHA-1 replaced by SHA-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

// DER-encoded object identifiers (contents octets) of certificate signature algorithms.
const OID_MD5_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x04]; // 1.2.840.113549.1.1.4
const OID_SHA1_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x05]; // 1.2.840.113549.1.1.5
const OID_SHA256_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0B]; // 1.2.840.113549.1.1.11
const OID_SHA384_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0C]; // 1.2.840.113549.1.1.12
const OID_SHA512_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0D]; // 1.2.840.113549.1.1.13
const OID_SHA224_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0E]; // 1.2.840.113549.1.1.14
const OID_ECDSA_WITH_SHA1: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x01]; // 1.2.840.10045.4.1
const OID_ECDSA_WITH_SHA224: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x01]; // 1.2.840.10045.4.3.1
const OID_ECDSA_WITH_SHA256: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02]; // 1.2.840.10045.4.3.2
const OID_ECDSA_WITH_SHA384: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x03]; // 1.2.840.10045.4.3.3
const OID_ECDSA_WITH_SHA512: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x04]; // 1.2.840.10045.4.3.4
const OID_DSA_WITH_SHA1: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x38, 0x04, 0x03]; // 1.2.840.10040.4.3
const OID_DSA_WITH_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x02]; // 2.16.840.1.101.3.4.3.2

/// The channel-binding hash for a DER certificate, from its `signatureAlgorithm`. `None` when the
/// certificate cannot be parsed or its algorithm has no single hash (Ed25519, RSASSA-PSS: libpq
/// refuses channel binding for those too); the caller then authenticates without channel binding.
pub fn end_point_hash(cert_der: &[u8]) -> Option<EndPointHash> {
    let oid = signature_algorithm_oid(cert_der)?;
    Some(match oid {
        OID_MD5_WITH_RSA | OID_SHA1_WITH_RSA | OID_ECDSA_WITH_SHA1 | OID_DSA_WITH_SHA1 => EndPointHash::Sha256,
        OID_SHA256_WITH_RSA | OID_ECDSA_WITH_SHA256 | OID_DSA_WITH_SHA256 => EndPointHash::Sha256,
        OID_SHA224_WITH_RSA | OID_ECDSA_WITH_SHA224 => EndPointHash::Sha224,
        OID_SHA384_WITH_RSA | OID_ECDSA_WITH_SHA384 => EndPointHash::Sha384,
        OID_SHA512_WITH_RSA | OID_ECDSA_WITH_SHA512 => EndPointHash::Sha512,
        _ => return None,
    })
}

/// The `tls-server-end-point` channel-binding data for the server's end-entity certificate
/// (DER): the certificate hashed with [`end_point_hash`].
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    Some(match end_point_hash(cert_der)? {
        EndPointHash::Sha224 => sha2::Sha224::digest(cert_der).to_vec(),
        EndPointHash::Sha256 => sha2::Sha256::digest(cert_der).to_vec(),
        EndPointHash::Sha384 => sha2::Sha384::digest(cert_der).to_vec(),
        EndPointHash::Sha512 => sha2::Sha512::digest(cert_der).to_vec(),
    })
}

/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { algorithm
/// OBJECT IDENTIFIER, parameters ANY OPTIONAL }, signatureValue BIT STRING }`: the contents of
/// `algorithm`.
fn signature_algorithm_oid(cert_der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OBJECT_IDENTIFIER: u8 = 0x06;
    let (tag, certificate, _) = der_element(cert_der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, _tbs, rest) = der_element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, algorithm_identifier, _) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, oid, _) = der_element(algorithm_identifier)?;
    (tag == OBJECT_IDENTIFIER).then_some(oid)
}

/// One DER element: (tag, contents, the bytes after it). Single-byte tags only (all that a
/// certificate's outer structure uses).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(contents.len() as u8);
        } else {
            let len = (contents.len() as u16).to_be_bytes();
            out.extend_from_slice(&[0x82, len[0], len[1]]);
        }
        out.extend_from_slice(contents);
        out
    }

    /// A structurally valid certificate shell with the given signature algorithm OID.
    fn fake_cert(oid: &[u8], tbs_len: usize) -> Vec<u8> {
        let tbs = der(0x30, &vec![0x05; tbs_len]);
        let mut alg = der(0x06, oid);
        alg.extend_from_slice(&[0x05, 0x00]);
        let alg = der(0x30, &alg);
        let sig = der(0x03, &[0x00, 0xAA, 0xBB]);
        der(0x30, &[tbs, alg, sig].concat())
    }

    #[test]
    fn picks_the_hash_of_the_signature_algorithm() {
        for (oid, hash) in [
            (OID_SHA256_WITH_RSA, EndPointHash::Sha256),
            (OID_SHA1_WITH_RSA, EndPointHash::Sha256),
            (OID_MD5_WITH_RSA, EndPointHash::Sha256),
            (OID_ECDSA_WITH_SHA1, EndPointHash::Sha256),
            (OID_ECDSA_WITH_SHA256, EndPointHash::Sha256),
            (OID_SHA384_WITH_RSA, EndPointHash::Sha384),
            (OID_ECDSA_WITH_SHA384, EndPointHash::Sha384),
            (OID_SHA512_WITH_RSA, EndPointHash::Sha512),
            (OID_ECDSA_WITH_SHA512, EndPointHash::Sha512),
            (OID_SHA224_WITH_RSA, EndPointHash::Sha224),
        ] {
            // Short and long (two-byte) length forms.
            for tbs_len in [10, 300] {
                assert_eq!(end_point_hash(&fake_cert(oid, tbs_len)), Some(hash), "{oid:02x?}");
            }
        }
        let ed25519 = [0x2B, 0x65, 0x70];
        assert_eq!(end_point_hash(&fake_cert(&ed25519, 10)), None);
        let rsassa_pss = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0A];
        assert_eq!(end_point_hash(&fake_cert(&rsassa_pss, 10)), None);
    }

    #[test]
    fn hashes_the_whole_certificate() {
        let cert = fake_cert(OID_SHA384_WITH_RSA, 20);
        assert_eq!(tls_server_end_point(&cert), Some(sha2::Sha384::digest(&cert).to_vec()));
        let cert = fake_cert(OID_SHA256_WITH_RSA, 20);
        assert_eq!(tls_server_end_point(&cert).map(|h| h.len()), Some(32));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let cert = fake_cert(OID_SHA256_WITH_RSA, 20);
        for cut in 0..cert.len() {
            // Truncations must not panic; most are rejected.
            let _ = end_point_hash(&cert[..cut]);
        }
        assert_eq!(end_point_hash(&[]), None);
        assert_eq!(end_point_hash(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
        assert_eq!(end_point_hash(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(end_point_hash(&[0x31, 0x00]), None);
    }

    #[test]
    fn builds_configs_for_every_mode() {
        assert!(client_config(SslMode::Disable, None, None).unwrap().is_none());
        assert!(client_config(SslMode::Prefer, None, None).unwrap().is_some());
        assert!(client_config(SslMode::Require, None, None).unwrap().is_some());
        let missing = Path::new("/nonexistent/root.crt");
        for mode in [
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            // The root file is read whenever it is set, as libpq does.
            let err = client_config(mode, Some(missing), None).unwrap_err();
            assert!(err.to_string().contains("/nonexistent/root.crt"), "{mode:?}: {err}");
        }
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = client_config(mode, None, None).unwrap_err();
            assert!(matches!(err, TlsConfigError::NoRootFile { .. }), "{mode:?}: {err}");
        }
        let cert = ClientCert {
            cert: missing.to_owned(),
            key: missing.to_owned(),
        };
        let err = client_config(SslMode::Require, None, Some(&cert)).unwrap_err();
        assert!(matches!(err, TlsConfigError::ClientCert { .. }), "{err}");
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1", SslMode::VerifyFull),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("db.example.org", SslMode::VerifyFull),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("not a host", SslMode::VerifyFull).is_err());
        assert!(matches!(
            server_name("not a host", SslMode::Require),
            Ok(ServerName::IpAddress(_))
        ));
    }
}
