//! `--tls`: the generator's connections speak TLS (rustls) to corecast's TLS listener.
//! Each connection completes its handshake while connecting (blocking, before the run
//! starts), then the workers read and write it like a plain socket through [`Stream`].
//!
//! A write counts its bytes as written only once their records are all on the socket
//! (otherwise it reports `WouldBlock` and the next write, which starts with the same bytes,
//! finishes them), so the engine's accounting of refused writes means what it means over
//! plain TCP.

use std::io::{self, Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use mio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// Speak TLS (to corecast's `tls.listen` address). Needs `--tls-ca` or `--tls-insecure`.
    #[arg(long)]
    pub tls: bool,
    /// PEM CA certificates that the server's certificate must chain to.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub tls_ca: Option<PathBuf>,
    /// Accept any server certificate (a test setup with a throwaway certificate only).
    #[arg(long, requires = "tls", conflicts_with = "tls_ca")]
    pub tls_insecure: bool,
    /// The name the server's certificate must carry.
    #[arg(long, value_name = "NAME", default_value = "localhost", requires = "tls")]
    pub tls_server_name: String,
}

/// What every connection's handshake uses; `None` without `--tls`.
pub struct Connector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Connector {
    pub fn from_args(args: &TlsArgs) -> Result<Option<Connector>, String> {
        if !args.tls {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
        let config = match (&args.tls_ca, args.tls_insecure) {
            (Some(file), _) => {
                let mut roots = RootCertStore::empty();
                for cert in
                    CertificateDer::pem_file_iter(file).map_err(|e| format!("--tls-ca {}: {e}", file.display()))?
                {
                    let cert = cert.map_err(|e| format!("--tls-ca {}: {e}", file.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("--tls-ca {}: {e}", file.display()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, true) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth(),
            (None, false) => return Err("--tls needs --tls-ca FILE or --tls-insecure".into()),
        };
        let name = ServerName::try_from(args.tls_server_name.clone())
            .map_err(|e| format!("--tls-server-name {}: {e}", args.tls_server_name))?;
        Ok(Some(Connector {
            config: Arc::new(config),
            name,
        }))
    }

    /// Completes the handshake over a connected blocking `stream`.
    fn handshake(&self, stream: &mut StdTcpStream) -> io::Result<ClientConnection> {
        let mut conn = ClientConnection::new(self.config.clone(), self.name.clone()).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(stream)?;
        }
        Ok(conn)
    }
}

/// One connection, plain or TLS, as the workers poll it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    /// Makes a connected blocking stream non-blocking, after its handshake with `tls`.
    pub fn new(mut stream: StdTcpStream, tls: Option<&Connector>) -> io::Result<Stream> {
        let conn = tls.map(|c| c.handshake(&mut stream)).transpose()?;
        stream.set_nonblocking(true)?;
        let sock = TcpStream::from_std(stream);
        Ok(match conn {
            None => Stream::Plain(sock),
            Some(conn) => Stream::Tls(Box::new(TlsStream {
                sock,
                conn,
                unreported: 0,
            })),
        })
    }

    fn socket(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &mut t.sock,
        }
    }
}

pub struct TlsStream {
    sock: TcpStream,
    conn: ClientConnection,
    /// Plaintext taken by a write whose records are not all on the socket yet.
    unreported: usize,
}

impl TlsStream {
    /// Writes waiting records; false when the socket would block first.
    fn flush_records(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = match self {
            Stream::Plain(s) => return s.read(buf),
            Stream::Tls(t) => t,
        };
        loop {
            match t.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if t.conn.read_tls(&mut t.sock)? == 0 {
                return Ok(0);
            }
            t.conn.process_new_packets().map_err(io::Error::other)?;
            // Records the server's input called for (a key update's answer).
            t.flush_records()?;
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = match self {
            Stream::Plain(s) => return s.write(buf),
            Stream::Tls(t) => t,
        };
        if !t.flush_records()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if t.unreported > 0 {
            let n = t.unreported.min(buf.len());
            t.unreported -= n;
            return Ok(n);
        }
        let n = t.conn.writer().write(buf)?;
        if t.flush_records()? {
            Ok(n)
        } else {
            t.unreported = n;
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl mio::event::Source for Stream {
    fn register(&mut self, registry: &mio::Registry, token: mio::Token, interests: mio::Interest) -> io::Result<()> {
        self.socket().register(registry, token, interests)
    }

    fn reregister(&mut self, registry: &mio::Registry, token: mio::Token, interests: mio::Interest) -> io::Result<()> {
        self.socket().reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        self.socket().deregister(registry)
    }
}

/// `--tls-insecure`: any certificate is accepted; signatures are still checked, so the
/// handshake itself is real.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
