//! The emulator over TLS: a test CA, leaf certificates it signs, and [`GoogleEmulator::serve_https`].

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::NamedTempFile;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::DropGuard;

use super::{GoogleEmulator, server};

/// The test CA of an HTTPS endpoint or an intercepting proxy, for the clients a test points there.
pub struct TrustedCa {
    pem: String,
    file: NamedTempFile,
}

impl TrustedCa {
    /// The CA certificate (PEM).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The CA certificate in a file, for clients that read one (`SSL_CERT_FILE`, `--cacert`); it
    /// exists while its endpoint or proxy lives.
    pub fn file(&self) -> &Path {
        self.file.path()
    }
}

/// A certificate authority made for one listener or proxy, trusted only by the clients a test
/// points at it.
pub(super) struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    pub(super) fn generate() -> io::Result<TestCa> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "gcp-token-operator Google emulator test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
        let pem = issuer.pem();
        Ok(TestCa { issuer, pem })
    }

    /// The CA certificate as clients are given it: in PEM and in a file.
    pub(super) fn trusted(&self) -> io::Result<TrustedCa> {
        let mut file = tempfile::Builder::new()
            .prefix("google-emulator-ca-")
            .suffix(".pem")
            .tempfile()?;
        file.write_all(self.pem.as_bytes())?;
        file.flush()?;
        Ok(TrustedCa {
            pem: self.pem.clone(),
            file,
        })
    }

    /// A TLS server configuration presenting a new leaf certificate for `names` (DNS names and
    /// IP addresses), speaking HTTP/1.1, the only HTTP version the emulator serves.
    pub(super) fn server_config(&self, names: &[String]) -> io::Result<Arc<ServerConfig>> {
        let key = KeyPair::generate().map_err(io::Error::other)?;
        // IP strings become IP SANs.
        let mut params = CertificateParams::new(names.to_vec()).map_err(io::Error::other)?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first.as_str());
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&key, &self.issuer).map_err(io::Error::other)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        // Its own provider: the process may have installed none, or another one.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| {
                builder
                    .with_no_client_auth()
                    .with_single_cert(vec![leaf.der().clone()], key)
            })
            .map_err(io::Error::other)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The emulator served over HTTPS: see [`GoogleEmulator::serve_https`]. Dropping it stops that
/// listener and removes the CA file.
pub struct HttpsEndpoint {
    port: u16,
    url: String,
    ca: TrustedCa,
    _stop: DropGuard,
}

impl HttpsEndpoint {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://HOST:PORT`, without a trailing slash, where HOST is the first of the certificate's
    /// host names (127.0.0.1 if none were given).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The CA the listener's certificate is signed by.
    pub fn ca(&self) -> &TrustedCa {
        &self.ca
    }
}

impl GoogleEmulator {
    /// Serves this emulator (same state, same routes, same recording) over HTTPS on its own
    /// address (127.0.0.1 after [`GoogleEmulator::start`]) and a new port, with a leaf certificate
    /// for `host_names` (DNS names and/or IP addresses; 127.0.0.1 if empty) signed by a fresh test
    /// CA. The listener stops with the emulator, or when the endpoint is dropped.
    pub async fn serve_https(&self, host_names: &[&str]) -> io::Result<HttpsEndpoint> {
        let mut names: Vec<String> = host_names.iter().map(|name| (*name).to_owned()).collect();
        if names.is_empty() {
            names.push("127.0.0.1".to_owned());
        }
        // Key generation and signing take milliseconds: off the async workers.
        let (ca, config) = tokio::task::spawn_blocking({
            let names = names.clone();
            move || {
                let ca = TestCa::generate()?;
                let config = ca.server_config(&names)?;
                io::Result::Ok((ca, config))
            }
        })
        .await
        .map_err(io::Error::other)??;
        let listener = TcpListener::bind(SocketAddr::new(self.ip, 0)).await?;
        let port = listener.local_addr()?.port();
        let stop = self.shutdown.child_token();
        let app = server::router(Arc::clone(&self.shared));
        server::spawn(listener, app, Some(TlsAcceptor::from(config)), stop.clone());
        let host = match names[0].parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => names[0].clone(),
        };
        Ok(HttpsEndpoint {
            port,
            url: format!("https://{host}:{port}"),
            ca: ca.trusted()?,
            _stop: stop.drop_guard(),
        })
    }
}
