//! The `hyper_parameters.tls` section: a second listen address whose clients speak TLS
//! (docs/protocol.md#tls), one [`TlsConfig`] whose keys are declared in the config key
//! table (`config/keys.rs`), and the rustls server configuration built from its files
//! ([`server_config`]). The key table calls it while loading, so that `check` and `serve`
//! refuse an unreadable certificate, a key that does not match it or a bad CA file with exit 78, naming the key; `run` builds the
//! configuration again for the shards. `null` (or no key) means no TLS listener.
//!
//! TLS 1.2 and 1.3 only, ring as the crypto provider (no OpenSSL). With `client_ca_file`,
//! every client must present a certificate that chains to one of its CAs (mTLS).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// The TLS listener (docs/protocol.md#tls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Where TLS clients connect (`ip:port`; port 0 picks one and logs it). Its clients
    /// share the broadcast domain with the plain listener's.
    pub listen: SocketAddr,
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching the first certificate.
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate signed by one of
    /// them. Default `None`: no client certificates asked for.
    pub client_ca_file: Option<PathBuf>,
    /// A handshake not finished this long after accept is closed (`tls_handshake_failed`).
    /// Default 10000 ms, 100 to 600000.
    pub handshake_timeout_ms: u64,
    /// Handshakes in progress per shard; a connection past this is closed at once
    /// (`tls_busy`), so that a handshake flood costs bounded CPU. Default 64, 1 to 100000.
    pub max_handshakes: usize,
}

/// A value of the section with the wrong type or out of range, or a file it names that is
/// unreadable or wrong, named by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    pub key: String,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: expected {}, found {}", self.key, self.expected, self.found)
    }
}

impl std::error::Error for InvalidValue {}

fn invalid(key: &str, expected: &str, found: impl Into<String>) -> InvalidValue {
    let mut found = found.into();
    if found.len() > 200 {
        let cut = (0..=197).rev().find(|&i| found.is_char_boundary(i)).unwrap_or(0);
        found.truncate(cut);
        found.push_str("...");
    }
    InvalidValue {
        key: key.to_string(),
        expected: expected.to_string(),
        found,
    }
}

/// Builds the rustls server configuration from `config`'s files: TLS 1.2/1.3, the
/// certificate chain and key, and client-certificate verification when a CA file is set.
/// Errors name the key at `path` whose file is unreadable or wrong.
pub fn server_config(config: &TlsConfig, path: &str) -> Result<Arc<ServerConfig>, InvalidValue> {
    let key = |name: &str| format!("{path}.{name}");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&config.cert_file, &key("cert_file"))?;
    let private_key = {
        let name = key("key_file");
        let bytes = read(&config.key_file, &name)?;
        let der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
            invalid(
                &name,
                "a PEM private key",
                format!("{} ({e})", config.key_file.display()),
            )
        })?;
        provider.key_provider.load_private_key(der.clone_key()).map_err(|e| {
            invalid(
                &name,
                "a usable private key",
                format!("{} ({e})", config.key_file.display()),
            )
        })?;
        der
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid(path, "a usable TLS configuration", e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(file) => {
            let name = key("client_ca_file");
            let mut roots = RootCertStore::empty();
            for cert in read_certs(file, &name)? {
                roots
                    .add(cert)
                    .map_err(|e| invalid(&name, "PEM CA certificates", format!("{} ({e})", file.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(&name, "PEM CA certificates", format!("{} ({e})", file.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder.with_single_cert(certs, private_key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => invalid(
            &key("key_file"),
            &format!("the private key of {}", config.cert_file.display()),
            format!("{} ({e})", config.key_file.display()),
        ),
        e => invalid(
            &key("cert_file"),
            "a PEM certificate chain",
            format!("{} ({e})", config.cert_file.display()),
        ),
    })?;
    Ok(Arc::new(server))
}

fn read(file: &Path, key: &str) -> Result<Vec<u8>, InvalidValue> {
    std::fs::read(file).map_err(|e| invalid(key, "a readable file", format!("{} ({e})", file.display())))
}

/// The certificates of a PEM file; at least one.
fn read_certs(file: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, InvalidValue> {
    let bytes = read(file, key)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, "PEM certificates", format!("{} ({e})", file.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            "PEM certificates",
            format!("{} (none in it)", file.display()),
        ));
    }
    Ok(certs)
}
