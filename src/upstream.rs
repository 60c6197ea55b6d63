//! HTTP/1.1 to an upstream (a backend route's application, or a hook):
//! hyper's client connections over monoio's poll-style TCP streams, rustls
//! for `https://`, and a keep-alive pool per core. Nothing here is shared
//! between cores: each core opens its own connections to each upstream,
//! and a connection's driving task runs on the core that opened it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use monoio::io::IntoPollIo;

/// Where requests go: parsed and resolved once, at start.
#[derive(Clone)]
pub struct Upstream {
    /// As configured, for logs.
    pub url: String,
    /// The address connected to (the host is resolved once, at start).
    pub addr: SocketAddr,
    /// `Host` of every request: the URL's authority.
    pub authority: HeaderValue,
    /// The URL's path and query.
    pub path: String,
    /// The TLS settings and the name the certificate must carry, for
    /// `https://`.
    pub tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Upstream {
    fn eq(&self, other: &Upstream) -> bool {
        self.url == other.url && self.addr == other.addr
    }
}

impl Upstream {
    /// Parses `http://host[:port]/path` or `https://...`; `ca`: a PEM file
    /// of the certificates an `https` upstream's chain must end in (the
    /// system's roots without it). The host is resolved now.
    pub fn parse(url: &str, ca: Option<&std::path::Path>) -> Result<Upstream, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{url:?}: the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not taken"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| format!("{url:?}: cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: {host} has no address"))?;
        let tls = if https {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{url:?}: {host} is no server name: {e}"))?;
            Some((Arc::new(client_config(ca)?), name))
        } else if ca.is_some() {
            return Err(format!("{url:?}: a CA file is for https upstreams"));
        } else {
            None
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Ok(Upstream {
            url: url.to_string(),
            addr,
            authority: HeaderValue::from_str(authority.as_str()).map_err(|e| format!("{url:?}: {e}"))?,
            path,
            tls,
        })
    }
}

/// TLS 1.3 and 1.2 with the roots of `ca`, or the system's.
fn client_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            let certificates = CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("{}: {e}", ca.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            if certificates.is_empty() {
                return Err(format!("{}: no PEM certificate in it", ca.display()));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no CA certificates on this system: give a CA file".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// One `POST`: its target, headers and body, the largest answer body
/// taken, and how long it may take, connecting included.
pub struct Post<'a> {
    pub path: &'a str,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub max_body: usize,
    pub timeout: Duration,
}

/// What an upstream answered.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a request got no usable answer.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be made: nothing was sent, so the request may
    /// be tried again.
    Connect(std::io::Error),
    /// No whole answer within the timeout.
    Timeout,
    /// The connection failed after the request was (perhaps) sent, or the
    /// answer was not HTTP.
    Broken(String),
    /// The body is over the limit (by its `Content-Length`, or as it came).
    TooLarge,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Broken(e) => write!(f, "broken answer: {e}"),
            Failure::TooLarge => f.write_str("answer over the size limit"),
        }
    }
}

/// An idle keep-alive connection.
struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

/// How long a connection may wait idle in the pool (servers commonly end
/// theirs after 5 to 75 s; one closed meanwhile is found at its next use).
const IDLE_FOR: Duration = Duration::from_secs(4);

/// The most idle connections a core keeps to one upstream.
const MAX_IDLE: usize = 128;

/// One core's connections to its upstreams, by the upstream's index (a
/// route's id).
#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<usize, Vec<Idle>>>,
    /// Connections opened (for the metrics).
    pub opened: std::cell::Cell<u64>,
}

impl Pool {
    /// Sends `post` to `upstream` (known as `index`), and reads the whole
    /// answer within its timeout. A pooled connection that turns out
    /// closed before it answers is replaced by a fresh one, once.
    pub async fn post(&self, index: usize, upstream: &Upstream, post: Post<'_>) -> Result<Response, Failure> {
        let Post {
            path,
            headers,
            body,
            max_body,
            timeout,
        } = post;
        let exchange = async {
            let (mut sender, reused) = match self.take(index) {
                Some(sender) => (sender, true),
                None => (self.connect(upstream).await?, false),
            };
            let request = || {
                let mut request = http::Request::post(path)
                    .body(Full::new(body.clone()))
                    .expect("a path that parsed as a URI is a request target");
                *request.headers_mut() = headers.clone();
                request
                    .headers_mut()
                    .insert(http::header::HOST, upstream.authority.clone());
                request
            };
            let answer = match sender.send_request(request()).await {
                // The server closed the pooled connection before it saw the
                // request: nothing was processed.
                Err(e) if reused && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) => {
                    sender = self.connect(upstream).await?;
                    sender.send_request(request()).await
                }
                answer => answer,
            };
            let response = answer.map_err(|e| Failure::Broken(e.to_string()))?;
            let (parts, mut incoming) = response.into_parts();
            let declared = parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max_body as u64) {
                return Err(Failure::TooLarge);
            }
            let mut collected = BytesMut::new();
            while let Some(frame) = incoming.frame().await {
                let frame = frame.map_err(|e| Failure::Broken(e.to_string()))?;
                if let Ok(data) = frame.into_data() {
                    if collected.len() + data.len() > max_body {
                        return Err(Failure::TooLarge);
                    }
                    collected.extend_from_slice(&data);
                }
            }
            // The whole answer is in: the connection may serve another.
            self.give(index, sender);
            Ok(Response {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: collected.freeze(),
            })
        };
        match monoio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        }
    }

    fn take(&self, index: usize) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&index)?;
        while let Some(Idle { sender, since }) = list.pop() {
            if since.elapsed() < IDLE_FOR && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn give(&self, index: usize, sender: SendRequest<Full<Bytes>>) {
        if !sender.is_ready() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(index).or_default();
        // Oldest first: expired ones are dropped from the front.
        list.retain(|i| i.since.elapsed() < IDLE_FOR);
        if list.len() < MAX_IDLE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes every idle connection (each one's task is woken to end it:
    /// call on the runtime).
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }

    /// Opens a connection and starts its driving task on this core.
    async fn connect(&self, upstream: &Upstream) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let stream = monoio::net::TcpStream::connect(upstream.addr)
            .await
            .map_err(Failure::Connect)?;
        let _ = stream.set_nodelay(true);
        let stream = stream.into_poll_io().map_err(Failure::Connect)?;
        self.opened.set(self.opened.get() + 1);
        match &upstream.tls {
            None => handshake(stream).await,
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| Failure::Broken(format!("TLS: {e}")))?;
                handshake(stream).await
            }
        }
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, Failure>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| Failure::Broken(e.to_string()))?;
    monoio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// Adds a header, skipping a name or value HTTP does not take.
pub fn add_header(headers: &mut HeaderMap, name: &[u8], value: &[u8]) {
    if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
        headers.append(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_urls() {
        let u = Upstream::parse("http://127.0.0.1:3000/ws?x=1", None).unwrap();
        assert_eq!(u.addr, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(u.authority, "127.0.0.1:3000");
        assert_eq!(u.path, "/ws?x=1");
        assert!(u.tls.is_none());
        let u = Upstream::parse("http://127.0.0.1", None).unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (80, "/"));
        let u = Upstream::parse("http://[::1]:81/a", None).unwrap();
        assert_eq!(u.addr, "[::1]:81".parse().unwrap());
        for bad in [
            "ftp://127.0.0.1/",
            "127.0.0.1:3000",
            "http://user:pw@127.0.0.1/",
            "http:///x",
            "http://no-such-host.invalid/",
        ] {
            assert!(Upstream::parse(bad, None).is_err(), "{bad}");
        }
        let ca = std::path::Path::new("/nonexistent.pem");
        assert!(Upstream::parse("http://127.0.0.1/", Some(ca)).is_err());
        assert!(Upstream::parse("https://127.0.0.1/", Some(ca)).is_err());
    }
}
