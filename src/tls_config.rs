//! TlsConfig: a certificate chain and its key, and optionally the CAs client certificates
//! must chain to, loaded from PEM files into the one rustls ServerConfig a server shares.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use rustls::crypto::ring::default_provider;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::errors::TlsLoadError;

/// The only protocol spoken inside TLS, offered through ALPN.
const ALPN_HTTP11: &[u8] = b"http/1.1";

fn certs_from(
    what: &'static str,
    path: &PathBuf,
) -> Result<Vec<CertificateDer<'static>>, TlsLoadError> {
    let pem = |source| TlsLoadError::Pem {
        what,
        path: path.clone(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(pem(rustls::pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

fn client_verifier(
    path: &PathBuf,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsLoadError> {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs_from("CA file", path)?);
    if added == 0 {
        return Err(TlsLoadError::NoUsableCa {
            path: path.clone(),
            ignored,
        });
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| TlsLoadError::Verifier {
            path: path.clone(),
            source,
        })
}

/// Builds the server's TLS settings: TLS 1.2 and 1.3 with ring's safe defaults, ALPN
/// http/1.1, and client certificates required and verified when `ca_certs` is given.
pub fn load(
    certfile: &PathBuf,
    keyfile: &PathBuf,
    ca_certs: Option<&PathBuf>,
) -> Result<Arc<ServerConfig>, TlsLoadError> {
    let certs = certs_from("certificate file", certfile)?;
    let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|source| TlsLoadError::Pem {
        what: "key file",
        path: keyfile.clone(),
        source,
    })?;
    let provider = Arc::new(default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsLoadError::Rejected {
            context: "no TLS protocol version is available".into(),
            source,
        })?;
    let builder = match ca_certs {
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, &provider)?),
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder
            .with_single_cert(certs, key)
            .map_err(|source| TlsLoadError::Rejected {
                context: format!(
                    "the key file {} and the certificate file {} do not make a usable pair",
                    keyfile.display(),
                    certfile.display()
                ),
                source,
            })?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    let config = Arc::new(config);
    // Settings rustls would refuse a connection for fail here, at startup, not per client.
    ServerConnection::new(config.clone()).map_err(TlsLoadError::Session)?;
    Ok(config)
}

/// TLS settings loaded once at startup and shared by every connection of a server.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct TlsConfig {
    config: Arc<ServerConfig>,
    client_auth: bool,
}

impl TlsConfig {
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.config
    }
}

#[pymethods]
impl TlsConfig {
    #[new]
    #[pyo3(signature = (certfile, keyfile, ca_certs = None))]
    fn new(certfile: PathBuf, keyfile: PathBuf, ca_certs: Option<PathBuf>) -> PyResult<Self> {
        let config = load(&certfile, &keyfile, ca_certs.as_ref())?;
        Ok(TlsConfig {
            config,
            client_auth: ca_certs.is_some(),
        })
    }

    /// True when clients must present a certificate signed by one of the CAs.
    #[getter]
    fn client_auth(&self) -> bool {
        self.client_auth
    }
}
