//! TLS for the listener's connection (`rediss://`), with rustls and its `ring` provider.
//!
//! The settings are redis-py's (`ssl_ca_certs`, `ssl_ca_data`, `ssl_ca_path`, `ssl_certfile`,
//! `ssl_keyfile`, `ssl_cert_reqs`, `ssl_check_hostname`, `ssl_min_version`), so that the data
//! path (redis-py) and the listener trust the same server:
//!
//! - `verify` (`ssl_cert_reqs` "required", the default, or "optional"): the server's chain must
//!   lead to one of the given CA certificates or, when none is given, to one of the system's
//!   (`rustls-native-certs`: the OS store, or `SSL_CERT_FILE` / `SSL_CERT_DIR`, as Python's
//!   `load_default_certs` does). `ssl_cert_reqs="none"` accepts any certificate: insecure.
//! - `check_hostname`: the certificate must also name the host of the URL (a DNS name or an IP
//!   address in its subjectAltName). Off, a certificate valid for another name is accepted
//!   (its chain is still verified).
//! - A client certificate (`certfile`, with its key in `keyfile` or in `certfile`) for servers
//!   that ask for one (`tls-auth-clients yes`). Encrypted keys are not supported.
//!
//! Files are read at every session start, so a rotated certificate is picked up at the next
//! reconnect.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// The TLS settings of a listener (`None` in `Config::tls`: plaintext).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// A PEM file of CA certificates (`ssl_ca_certs`).
    pub ca_certs: Option<PathBuf>,
    /// PEM text of CA certificates (`ssl_ca_data`).
    pub ca_data: Option<String>,
    /// A directory of PEM CA certificate files (`ssl_ca_path`).
    pub ca_path: Option<PathBuf>,
    /// The client certificate chain, PEM (`ssl_certfile`).
    pub certfile: Option<PathBuf>,
    /// The client certificate's private key, PEM (`ssl_keyfile`; else read from `certfile`).
    pub keyfile: Option<PathBuf>,
    /// Verify the server's certificate chain (`ssl_cert_reqs` other than "none").
    pub verify: bool,
    /// Verify that the certificate names the host (`ssl_check_hostname`).
    pub check_hostname: bool,
    /// Refuse TLS 1.2 (`ssl_min_version=TLSVersion.TLSv1_3`). rustls never speaks below 1.2.
    pub tls13_only: bool,
}

impl Default for Tls {
    /// redis-py's defaults for `rediss://` (6.0 and later): verify the chain and the host name.
    fn default() -> Self {
        Tls {
            ca_certs: None,
            ca_data: None,
            ca_path: None,
            certfile: None,
            keyfile: None,
            verify: true,
            check_hostname: true,
            tls13_only: false,
        }
    }
}

/// rustls with *ring*: it builds in a fraction of aws-lc-rs's time. rustls 0.23.48 deprecated
/// `ring::default_provider` because *ring* has no post-quantum key exchange (X25519MLKEM768);
/// neither has the OpenSSL that redis-py's data path uses on current Debian, so the listener's
/// connection is no weaker than the data path's.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The trust anchors: the given CA certificates, else the system's.
fn roots(t: &Tls) -> Result<RootCertStore, String> {
    let mut certs = Vec::new();
    let mut given = false;
    if let Some(path) = &t.ca_certs {
        given = true;
        certs.extend(read_certs(path, "ssl_ca_certs")?);
    }
    if let Some(pem) = &t.ca_data {
        given = true;
        let found = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot read ssl_ca_data: {e}"))?;
        if found.is_empty() {
            return Err("ssl_ca_data: no PEM certificate in it".into());
        }
        certs.extend(found);
    }
    if let Some(dir) = &t.ca_path {
        given = true;
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read ssl_ca_path {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            // Files that hold no certificate (or are not PEM) are passed over, as OpenSSL does.
            if let Ok(it) = CertificateDer::pem_file_iter(entry.path()) {
                certs.extend(it.flatten());
            }
        }
    }
    if !given {
        let found = rustls_native_certs::load_native_certs();
        if found.certs.is_empty() {
            let why = found
                .errors
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            return Err(format!(
                "no CA certificate found in the system's store{why}: give ssl_ca_certs"
            ));
        }
        certs = found.certs;
    }
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err("none of the CA certificates given could be used".into());
    }
    Ok(store)
}

/// The client certificate chain and key, if any.
fn client_auth(
    t: &Tls,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
    let Some(certfile) = &t.certfile else {
        if t.keyfile.is_some() {
            return Err("ssl_keyfile is given without ssl_certfile".into());
        }
        return Ok(None);
    };
    let chain = read_certs(certfile, "ssl_certfile")?;
    let (path, what) = match &t.keyfile {
        Some(k) => (k.as_path(), "ssl_keyfile"),
        None => (certfile.as_path(), "ssl_certfile"),
    };
    let key = PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "cannot read the private key in {what} {}: {e} (an unencrypted PEM key is needed)",
            path.display()
        )
    })?;
    Ok(Some((chain, key)))
}

/// The rustls client configuration for `t` (reads the files it names).
pub fn client_config(t: &Tls) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = if t.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = if t.verify {
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(t)?), provider)
            .build()
            .map_err(|e| e.to_string())?;
        if t.check_hostname {
            webpki
        } else {
            Arc::new(AnyName(webpki))
        }
    } else {
        Arc::new(NoVerification(provider))
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match client_auth(t)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("ssl_certfile / ssl_keyfile: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The name the server's certificate is checked against: the URL's host (DNS name or IP).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    // "[::1]" in a URL is the address ::1.
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(bare.to_owned())
        .map_err(|e| format!("TLS: {host:?} is not a valid server name: {e}"))
}

/// `ssl_check_hostname=False`: the chain is verified, the name is not.
struct AnyName(Arc<WebPkiServerVerifier>);

impl fmt::Debug for AnyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AnyName")
    }
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (and validity dates) before the name: a name error means
        // everything else passed.
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

/// `ssl_cert_reqs="none"`: any certificate is accepted (the handshake's signatures are still
/// checked against it). Insecure: anyone on the path can pose as the server.
struct NoVerification(Arc<CryptoProvider>);

impl fmt::Debug for NoVerification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoVerification")
    }
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
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
        crypto::verify_tls13_signature(
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

    #[test]
    fn server_names_take_dns_names_and_addresses() {
        assert!(matches!(
            server_name("localhost"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(server_name("not a name").is_err());
    }

    #[test]
    fn missing_files_are_named_in_the_error() {
        let t = Tls {
            ca_certs: Some("/nonexistent/ca.pem".into()),
            ..Tls::default()
        };
        let e = client_config(&t).unwrap_err();
        assert!(e.contains("ssl_ca_certs /nonexistent/ca.pem"), "{e}");
        let t = Tls {
            verify: false,
            certfile: Some("/nonexistent/client.pem".into()),
            ..Tls::default()
        };
        let e = client_config(&t).unwrap_err();
        assert!(e.contains("ssl_certfile /nonexistent/client.pem"), "{e}");
    }

    #[test]
    fn pem_data_without_a_certificate_is_refused() {
        let t = Tls {
            ca_data: Some("not pem".into()),
            ..Tls::default()
        };
        assert!(client_config(&t).unwrap_err().contains("ssl_ca_data"));
    }

    #[test]
    fn no_verification_needs_no_roots() {
        let t = Tls {
            verify: false,
            ..Tls::default()
        };
        assert!(client_config(&t).is_ok());
    }
}
