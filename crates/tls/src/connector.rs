//! The connector tonic channels dial members with: TCP, then TLS for `https://` URIs.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Dials `http://` URIs in the clear and `https://` URIs with `tls` (refusing them without).
#[derive(Clone, Default)]
pub struct Connector {
    tls: Option<Arc<ClientConfig>>,
}

impl Connector {
    pub fn new(tls: Option<Arc<ClientConfig>>) -> Self {
        Connector { tls }
    }
}

/// A TCP or TLS-over-TCP stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<Box<dyn Stream>>>> + Send>>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<Box<dyn Stream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid =
                |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: {why}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?.to_string();
            let https = match uri.scheme_str() {
                Some("https") => true,
                Some("http") | None => false,
                Some(_) => return Err(invalid("scheme must be http or https")),
            };
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            // IPv6 hosts come bracketed in URIs.
            let bare = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let tls = match (https, tls) {
                (false, _) => None,
                (true, Some(tls)) => Some(tls),
                (true, None) => return Err(invalid(
                    "https without TLS settings (--peer-cert-file, --peer-trusted-ca-file or --peer-auto-tls)",
                )),
            };
            let tcp = TcpStream::connect((bare.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let Some(tls) = tls else {
                return Ok(TokioIo::new(Box::new(tcp) as Box<dyn Stream>));
            };
            let name = ServerName::try_from(bare).map_err(|e| invalid(&e.to_string()))?;
            let stream = TlsConnector::from(tls).connect(name, tcp).await?;
            Ok(TokioIo::new(Box::new(stream) as Box<dyn Stream>))
        })
    }
}
