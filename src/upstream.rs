//! HTTP/1.1 to an upstream (a backend route's application, or a hook):
//! hyper's client connections over monoio's poll-style TCP streams, rustls
//! for `https://`, and a keep-alive pool per core. Nothing here is shared
//! between cores: each core opens its own connections to each upstream,
//! and a connection's driving task runs on the core that opened it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
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
    /// The connection ended before a whole answer head came (the request
    /// may have reached the upstream).
    Dropped(String),
    /// The answer was not HTTP, or its body was cut short.
    Broken(String),
    /// The body is over the limit (by its `Content-Length`, or as it came).
    TooLarge,
    /// The worker is ending.
    Stopped,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Dropped(e) => write!(f, "no answer: {e}"),
            Failure::Broken(e) => write!(f, "broken answer: {e}"),
            Failure::TooLarge => f.write_str("answer over the size limit"),
            Failure::Stopped => f.write_str("the server is stopping"),
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

/// The most connections a core opens to one upstream (idle or busy):
/// requests past it wait for one, within their timeout.
pub const MAX_CONNECTIONS: usize = 64;

/// What upstream sockets count against: the process's share of its open
/// files, with the client sockets.
pub trait SocketBudget {
    /// Takes a place; `false` when there is none.
    fn take(&self) -> bool;
    fn release(&self);
}

/// One upstream's connections on one core.
#[derive(Default)]
struct Slots {
    idle: Vec<Idle>,
    /// Connections open or being opened.
    open: usize,
    /// Requests waiting for a connection.
    waiters: Vec<Waker>,
}

struct Inner {
    upstreams: RefCell<HashMap<usize, Slots>>,
    budget: Option<Arc<dyn SocketBudget + Send + Sync>>,
    /// The worker is ending: requests under way end at once.
    stopped: std::cell::Cell<bool>,
    /// Requests under way, and the wakers of those waiting on one.
    active: std::cell::Cell<usize>,
    stop_wakers: RefCell<Vec<Waker>>,
}

impl Inner {
    /// Wakes every request waiting for a connection to `index` (each looks
    /// again: a waiter that gave up meanwhile takes no wake from another).
    fn wake(&self, index: usize) {
        let waiters = match self.upstreams.borrow_mut().get_mut(&index) {
            Some(slots) => std::mem::take(&mut slots.waiters),
            None => return,
        };
        for w in waiters {
            w.wake();
        }
    }
}

/// A connection's place under `MAX_CONNECTIONS` and the socket budget,
/// given back when dropped: with the connection's stream, or at once if
/// it could not be opened.
struct Place {
    inner: std::rc::Weak<Inner>,
    index: usize,
}

impl Drop for Place {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else { return };
        if let Some(slots) = inner.upstreams.borrow_mut().get_mut(&self.index) {
            slots.open -= 1;
        }
        if let Some(budget) = &inner.budget {
            budget.release();
        }
        inner.wake(self.index);
    }
}

/// A stream that holds its connection's place.
struct Placed<T> {
    stream: T,
    _place: Place,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Placed<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Placed<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request under way, counted until it ends however it ends.
struct Active<'a>(&'a Inner);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
    }
}

/// One core's connections to its upstreams, by the upstream's index.
pub struct Pool {
    inner: Rc<Inner>,
}

/// What a request got: a pooled connection, or a place to open one.
enum Got {
    Pooled(SendRequest<Full<Bytes>>),
    Place(Place),
}

impl Pool {
    /// A pool whose sockets count against `budget`, if given.
    pub fn new(budget: Option<Arc<dyn SocketBudget + Send + Sync>>) -> Pool {
        Pool {
            inner: Rc::new(Inner {
                upstreams: RefCell::new(HashMap::new()),
                budget,
                stopped: std::cell::Cell::new(false),
                active: std::cell::Cell::new(0),
                stop_wakers: RefCell::new(Vec::new()),
            }),
        }
    }

    /// Sends `post` to `upstream` (known as `index`), and reads the whole
    /// answer within its timeout (waiting for a connection included). A
    /// pooled connection that the upstream closed before it took the
    /// request (hyper gives the request back unsent) is replaced, once; a
    /// request that may have been sent is never sent again.
    pub async fn post(&self, index: usize, upstream: &Upstream, post: Post<'_>) -> Result<Response, Failure> {
        let Post {
            path,
            headers,
            body,
            max_body,
            timeout,
        } = post;
        let exchange = async {
            let mut request = http::Request::post(path)
                .body(Full::new(body))
                .expect("a path that parsed as a URI is a request target");
            *request.headers_mut() = headers;
            request
                .headers_mut()
                .insert(http::header::HOST, upstream.authority.clone());
            let (mut sender, reused) = match self.acquire(index).await? {
                Got::Pooled(sender) => (sender, true),
                Got::Place(place) => (self.connect(upstream, place).await?, false),
            };
            let answer = match sender.try_send_request(request).await {
                Err(mut e) if reused => match e.take_message() {
                    // Never sent: the pooled connection had closed.
                    Some(request) => {
                        let Got::Place(place) = self.acquire_new(index).await? else {
                            unreachable!("acquire_new opens a connection")
                        };
                        sender = self.connect(upstream, place).await?;
                        sender.send_request(request).await
                    }
                    None => Err(e.into_error()),
                },
                Err(e) => Err(e.into_error()),
                Ok(response) => Ok(response),
            };
            let response = answer.map_err(|e| {
                if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
                    Failure::Dropped(e.to_string())
                } else {
                    Failure::Broken(e.to_string())
                }
            })?;
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
        let inner = &self.inner;
        if inner.stopped.get() {
            return Err(Failure::Stopped);
        }
        inner.active.set(inner.active.get() + 1);
        let _active = Active(inner);
        let stopped = std::future::poll_fn(|cx| {
            if inner.stopped.get() {
                return Poll::Ready(());
            }
            inner.stop_wakers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        });
        monoio::select! {
            result = monoio::time::timeout(timeout, exchange) => match result {
                Ok(result) => result,
                Err(_) => Err(Failure::Timeout),
            },
            () = stopped => Err(Failure::Stopped),
        }
    }

    /// Ends every request under way (each returns `Failure::Stopped` when
    /// next polled) and closes the idle connections; the worker then waits
    /// for `active` to reach 0, so that no task is left holding what the
    /// runtime's end would leak. Call on the runtime.
    pub fn stop(&self) {
        self.inner.stopped.set(true);
        let wakers = std::mem::take(&mut *self.inner.stop_wakers.borrow_mut());
        for w in wakers {
            w.wake();
        }
        self.clear();
    }

    /// Requests under way.
    pub fn active(&self) -> usize {
        self.inner.active.get()
    }

    /// A pooled connection, or a place for a new one; waits while
    /// `MAX_CONNECTIONS` are open and none is idle.
    async fn acquire(&self, index: usize) -> Result<Got, Failure> {
        self.wait_for(index, true).await
    }

    /// A place for a new connection (waiting as `acquire` does).
    async fn acquire_new(&self, index: usize) -> Result<Got, Failure> {
        self.wait_for(index, false).await
    }

    async fn wait_for(&self, index: usize, pooled: bool) -> Result<Got, Failure> {
        std::future::poll_fn(|cx| {
            let mut upstreams = self.inner.upstreams.borrow_mut();
            let slots = upstreams.entry(index).or_default();
            if pooled {
                while let Some(Idle { sender, since }) = slots.idle.pop() {
                    if since.elapsed() < IDLE_FOR && sender.is_ready() {
                        return Poll::Ready(Ok(Got::Pooled(sender)));
                    }
                }
            } else {
                // Room is made by closing an idle connection, if any.
                slots.idle.pop();
            }
            if slots.open < MAX_CONNECTIONS {
                if let Some(budget) = &self.inner.budget {
                    if !budget.take() {
                        return Poll::Ready(Err(Failure::Connect(std::io::Error::other(
                            "no file descriptor left for an upstream connection",
                        ))));
                    }
                }
                slots.open += 1;
                return Poll::Ready(Ok(Got::Place(Place {
                    inner: Rc::downgrade(&self.inner),
                    index,
                })));
            }
            slots.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn give(&self, index: usize, sender: SendRequest<Full<Bytes>>) {
        if sender.is_ready() {
            let mut upstreams = self.inner.upstreams.borrow_mut();
            let slots = upstreams.entry(index).or_default();
            // Oldest first: expired ones are dropped from the front.
            slots.idle.retain(|i| i.since.elapsed() < IDLE_FOR);
            slots.idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
        self.inner.wake(index);
    }

    /// Closes every idle connection (each one's task is woken to end it:
    /// call on the runtime).
    pub fn clear(&self) {
        let idle: Vec<Vec<Idle>> = self
            .inner
            .upstreams
            .borrow_mut()
            .values_mut()
            .map(|s| std::mem::take(&mut s.idle))
            .collect();
        drop(idle);
    }

    /// Opens a connection in `place` and starts its driving task on this
    /// core.
    async fn connect(&self, upstream: &Upstream, place: Place) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let stream = monoio::net::TcpStream::connect(upstream.addr)
            .await
            .map_err(Failure::Connect)?;
        let _ = stream.set_nodelay(true);
        let stream = stream.into_poll_io().map_err(Failure::Connect)?;
        match &upstream.tls {
            None => handshake(Placed { stream, _place: place }).await,
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| Failure::Broken(format!("TLS: {e}")))?;
                handshake(Placed { stream, _place: place }).await
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
