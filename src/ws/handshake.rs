//! The opening handshake, server side (RFC 6455 section 4.2).
//!
//! Owns parsing a request head (httparse, zero-copy: every field borrows the
//! read buffer), the rules of a valid upgrade, subprotocol choice, the accept
//! key, and the bytes of each response. Routing and origin policy are passed
//! in; this module opens no socket and keeps no state.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha1::{Digest, Sha1};

/// RFC 6455 1.3: appended to the client's key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Headers a request may carry; more is answered like an oversized head (431).
pub const MAX_HEADERS: usize = 64;
/// `Sec-WebSocket-Protocol` header lines kept, each may list several
/// protocols, more is a 400; and `-Extensions` lines, past which offers
/// are ignored.
const MAX_PROTOCOL_LINES: usize = 8;

/// A refused request, and the HTTP status that says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 400: not a valid WebSocket upgrade; the reason says which rule failed.
    BadRequest(&'static str),
    /// 426: a version other than 13 (RFC 6455 4.2.2).
    UnsupportedVersion,
    /// 403: `Origin` not in the allow-list.
    ForbiddenOrigin,
    /// 404: no route for the path.
    NotFound,
    /// 431: head larger than the limit, or too many headers.
    HeadTooLarge,
    /// 405: a method other than GET or HEAD on the health path.
    MethodNotAllowed,
    /// 503: the server is shutting down.
    ShuttingDown,
    /// 503: the server holds `--max-connections`.
    TooManyConnections,
    /// 503: the client's address holds `--max-connections-per-ip`.
    TooManyFromAddress,
    /// 429: the client's address passed `--max-handshakes-per-sec-per-ip`.
    TooManyHandshakes,
    /// 401: the route takes tokens and none came (RFC 6750 3.1: the answer
    /// then names no error).
    TokenMissing,
    /// 401: the route takes tokens and this one was refused, for this reason.
    TokenRefused(&'static str),
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Reject::BadRequest(_) => 400,
            Reject::UnsupportedVersion => 426,
            Reject::ForbiddenOrigin => 403,
            Reject::NotFound => 404,
            Reject::HeadTooLarge => 431,
            Reject::MethodNotAllowed => 405,
            Reject::ShuttingDown | Reject::TooManyConnections | Reject::TooManyFromAddress => 503,
            Reject::TooManyHandshakes => 429,
            Reject::TokenMissing | Reject::TokenRefused(_) => 401,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Reject::BadRequest(why) => why,
            Reject::UnsupportedVersion => "unsupported WebSocket version",
            Reject::ForbiddenOrigin => "origin not allowed",
            Reject::NotFound => "no route",
            Reject::HeadTooLarge => "request header fields too large",
            Reject::MethodNotAllowed => "method not allowed",
            Reject::ShuttingDown => "shutting down",
            Reject::TooManyConnections => "too many connections",
            Reject::TooManyFromAddress => "too many connections from this address",
            Reject::TooManyHandshakes => "too many handshakes from this address",
            Reject::TokenMissing => "missing token",
            Reject::TokenRefused(why) => why,
        }
    }

    /// The whole HTTP response for this refusal; the connection closes after it.
    pub fn response(self) -> Vec<u8> {
        let (status, text) = match self {
            Reject::BadRequest(_) => (400, "Bad Request"),
            Reject::UnsupportedVersion => (426, "Upgrade Required"),
            Reject::ForbiddenOrigin => (403, "Forbidden"),
            Reject::NotFound => (404, "Not Found"),
            Reject::HeadTooLarge => (431, "Request Header Fields Too Large"),
            Reject::MethodNotAllowed => (405, "Method Not Allowed"),
            Reject::ShuttingDown | Reject::TooManyConnections | Reject::TooManyFromAddress => {
                (503, "Service Unavailable")
            }
            // RFC 6585 4.
            Reject::TooManyHandshakes => (429, "Too Many Requests"),
            Reject::TokenMissing | Reject::TokenRefused(_) => (401, "Unauthorized"),
        };
        let extra = match self {
            // RFC 6455 4.2.2: a version we do not speak gets 426 naming the one we do.
            Reject::UnsupportedVersion => "Sec-WebSocket-Version: 13\r\n",
            Reject::MethodNotAllowed => "Allow: GET, HEAD\r\n",
            Reject::ShuttingDown => "Retry-After: 1\r\n",
            // RFC 7231 7.1.3: when to try again (a connection may have ended by then).
            Reject::TooManyConnections | Reject::TooManyFromAddress => "Retry-After: 5\r\n",
            Reject::TooManyHandshakes => "Retry-After: 1\r\n",
            // RFC 6750 3 and 3.1: no error code when no token was given.
            Reject::TokenMissing => "WWW-Authenticate: Bearer realm=\"sluice\"\r\n",
            Reject::TokenRefused(_) => "WWW-Authenticate: Bearer realm=\"sluice\", error=\"invalid_token\"\r\n",
            _ => "",
        };
        plain_response(status, text, extra, self.reason(), true)
    }
}

fn plain_response(status: u16, text: &str, extra_headers: &str, body: &str, with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {text}\r\n{extra_headers}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len() + 1
    );
    if with_body {
        out.push_str(body);
        out.push('\n');
    }
    out.into_bytes()
}

/// The health check's answer for load balancers: 200 to GET and HEAD (RFC
/// 7231 4.3.2: HEAD gets the same head and no body), 405 to anything else.
pub fn health_response(method: &str) -> Result<Vec<u8>, Reject> {
    match method {
        "GET" => Ok(plain_response(200, "OK", "", "ok", true)),
        "HEAD" => Ok(plain_response(200, "OK", "", "ok", false)),
        _ => Err(Reject::MethodNotAllowed),
    }
}

/// The readiness check's answer: 200 while the server takes traffic,
/// 503 while it should not get any (its cluster's bus is down); like the
/// health check otherwise.
pub fn ready_response(method: &str, ready: bool) -> Result<Vec<u8>, Reject> {
    let (status, reason, body) = if ready {
        (200, "OK", "ready")
    } else {
        (503, "Service Unavailable", "not ready")
    };
    match method {
        "GET" => Ok(plain_response(status, reason, "", body, true)),
        "HEAD" => Ok(plain_response(status, reason, "", body, false)),
        _ => Err(Reject::MethodNotAllowed),
    }
}

/// A parsed request head. Every field borrows the read buffer.
#[derive(Debug, Clone)]
pub struct Head<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    minor_version: u8,
    host_count: usize,
    upgrade_websocket: bool,
    connection_upgrade: bool,
    key: Option<&'a [u8]>,
    key_count: usize,
    version: Option<&'a [u8]>,
    version_count: usize,
    has_body: bool,
    pub origin: Option<&'a str>,
    /// The `Authorization` header's value (the first, if repeated).
    pub authorization: Option<&'a [u8]>,
    /// `Origin` headers seen; one that is not UTF-8 is counted but not kept.
    origin_count: usize,
    protocol_lines: [&'a [u8]; MAX_PROTOCOL_LINES],
    protocol_line_count: usize,
    extension_lines: [&'a [u8]; MAX_PROTOCOL_LINES],
    extension_line_count: usize,
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete, read
/// more. `Ok(Some((head, n)))`: the head took `n` bytes; what follows is the
/// client's first frames. `max_head_bytes` bounds the head (431 past it).
pub fn parse(buf: &[u8], max_head_bytes: usize) -> Result<Option<(Head<'_>, usize)>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_head_bytes {
                Err(Reject::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadTooLarge),
        Err(_) => return Err(Reject::BadRequest("malformed HTTP request")),
    };
    if head_len > max_head_bytes {
        return Err(Reject::HeadTooLarge);
    }
    let target = origin_form(req.path.unwrap_or("/"));
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut head = Head {
        method: req.method.unwrap_or(""),
        path,
        query,
        minor_version: req.version.unwrap_or(0),
        host_count: 0,
        upgrade_websocket: false,
        connection_upgrade: false,
        key: None,
        key_count: 0,
        version: None,
        version_count: 0,
        has_body: false,
        origin: None,
        authorization: None,
        origin_count: 0,
        protocol_lines: [&[]; MAX_PROTOCOL_LINES],
        protocol_line_count: 0,
        extension_lines: [&[]; MAX_PROTOCOL_LINES],
        extension_line_count: 0,
    };
    for h in req.headers.iter() {
        let name = h.name;
        let value = trim(h.value);
        if name.eq_ignore_ascii_case("host") {
            head.host_count += 1;
        } else if name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket |= has_token(value, b"websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            head.connection_upgrade |= has_token(value, b"upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.key = Some(value);
            head.key_count += 1;
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.version = Some(value);
            head.version_count += 1;
        } else if name.eq_ignore_ascii_case("origin") {
            head.origin = std::str::from_utf8(value).ok();
            head.origin_count += 1;
        } else if name.eq_ignore_ascii_case("authorization") {
            head.authorization.get_or_insert(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            if head.protocol_line_count == MAX_PROTOCOL_LINES {
                return Err(Reject::BadRequest("too many Sec-WebSocket-Protocol headers"));
            }
            head.protocol_lines[head.protocol_line_count] = value;
            head.protocol_line_count += 1;
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            // Past the first lines, offers are ignored: declining an
            // extension never fails a handshake.
            if head.extension_line_count < MAX_PROTOCOL_LINES {
                head.extension_lines[head.extension_line_count] = value;
                head.extension_line_count += 1;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            head.has_body |= value != b"0";
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.has_body = true;
        }
    }
    Ok(Some((head, head_len)))
}

impl<'a> Head<'a> {
    /// True when the request asks for an upgrade at all (plain HTTP otherwise).
    pub fn wants_upgrade(&self) -> bool {
        self.upgrade_websocket || self.key.is_some()
    }

    /// RFC 6455 4.2.1: the rules every opening handshake must meet. Returns the
    /// client's key for [`accept_key`].
    pub fn validate_upgrade(&self) -> Result<&'a [u8], Reject> {
        // 4.2.1 (1): an HTTP/1.1 or higher GET request.
        if self.method != "GET" {
            return Err(Reject::BadRequest("method must be GET"));
        }
        if self.minor_version < 1 {
            return Err(Reject::BadRequest("HTTP/1.1 required"));
        }
        // 4.2.1 (2) and RFC 7230 5.4: exactly one Host.
        if self.host_count != 1 {
            return Err(Reject::BadRequest("exactly one Host header required"));
        }
        // 4.2.1 (3), (4): tokens, compared case-insensitively, in comma lists.
        if !self.upgrade_websocket {
            return Err(Reject::BadRequest("Upgrade: websocket required"));
        }
        if !self.connection_upgrade {
            return Err(Reject::BadRequest("Connection: Upgrade required"));
        }
        // A GET upgrade has no body; one would be read as frames.
        if self.has_body {
            return Err(Reject::BadRequest("upgrade request must not have a body"));
        }
        // A repeated header that must be single would let proxies and us
        // disagree about its value.
        if self.version_count > 1 || self.origin_count > 1 {
            return Err(Reject::BadRequest("repeated Sec-WebSocket-Version or Origin header"));
        }
        // 4.2.1 (6): version 13; 4.2.2: otherwise 426 with the version we speak.
        if self.version != Some(b"13") {
            return Err(Reject::UnsupportedVersion);
        }
        // 4.2.1 (5): the key is base64 of exactly 16 bytes, sent once.
        let key = match (self.key, self.key_count) {
            (Some(key), 1) if is_valid_key(key) => key,
            _ => return Err(Reject::BadRequest("Sec-WebSocket-Key must be base64 of 16 bytes")),
        };
        Ok(key)
    }

    /// RFC 6455 4.2.2 (4) and 10.2: whether `policy` admits this request's
    /// origin. An `Origin` that is not UTF-8 is refused under any list.
    pub fn origin_allowed(&self, policy: &OriginPolicy) -> bool {
        if self.origin_count > 0 && self.origin.is_none() {
            return matches!(policy, OriginPolicy::Any);
        }
        policy.allows(self.origin)
    }

    /// The `Sec-WebSocket-Extensions` lines, in their order (RFC 6455
    /// 9.1: several lines are one list).
    pub fn extension_lines(&self) -> &[&'a [u8]] {
        &self.extension_lines[..self.extension_line_count]
    }

    /// Every subprotocol the client offered, in its order.
    pub fn offered_protocols(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.protocol_lines[..self.protocol_line_count]
            .iter()
            .flat_map(|line| line.split(|&b| b == b','))
            .map(trim)
            .filter(|p| !p.is_empty())
    }

    /// RFC 6455 4.2.2 (5.4): picks the first protocol of `supported` (the
    /// route's preference order) that the client offered. `None` when the
    /// client offered none we speak; the response then names no protocol.
    pub fn choose_protocol<'s>(&self, supported: &'s [String]) -> Option<&'s str> {
        supported
            .iter()
            .find(|s| self.offered_protocols().any(|o| o == s.as_bytes()))
            .map(String::as_str)
    }
}

/// RFC 7230 5.3.2: a server must accept the absolute form of a target
/// (`http://host/path`); only its path and query are routed.
fn origin_form(target: &str) -> &str {
    let Some((scheme, rest)) = target.split_once("://") else {
        return target;
    };
    if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
        return target;
    }
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
        _ => "/",
    }
}

fn is_valid_key(key: &[u8]) -> bool {
    // 16 bytes encode to exactly 24 base64 characters with "==" padding.
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(BASE64.decode_slice(key, &mut decoded), Ok(16))
}

/// RFC 6455 4.2.2 (5.4): base64(SHA-1(key ++ GUID)).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    let digest = sha.finalize();
    let mut out = [0u8; 28];
    let written = BASE64.encode_slice(digest, &mut out);
    debug_assert_eq!(written, Ok(28));
    out
}

/// Appends the 101 response to `out`.
pub fn write_accept(out: &mut Vec<u8>, key: &[u8], protocol: Option<&str>) {
    write_accept_with(out, key, protocol, b"");
}

/// Appends the 101 response to `out`, with `extra`: more header lines,
/// each ending in CRLF.
pub fn write_accept_with(out: &mut Vec<u8>, key: &[u8], protocol: Option<&str>, extra: &[u8]) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(&accept_key(key));
    if let Some(p) = protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
}

/// True when the comma-separated `list` holds `token` (ASCII case-insensitive).
fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',').any(|t| trim(t).eq_ignore_ascii_case(token))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Origins a route accepts: any, or a list (RFC 6455 10.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OriginPolicy {
    #[default]
    Any,
    /// Exact origins (`https://app.example.com`) and subdomain patterns
    /// (`*.example.com`, `https://*.example.com`, `https://*.example.com:8443`),
    /// ASCII case-insensitive (see `check_origin_entry`).
    List(Vec<String>),
}

impl OriginPolicy {
    /// A request without `Origin` is not from a browser, so the browser rule
    /// does not apply to it.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match (self, origin) {
            (OriginPolicy::Any, _) | (_, None) => true,
            (OriginPolicy::List(list), Some(o)) => list.iter().any(|entry| origin_matches(entry, o)),
        }
    }
}

/// An origin as RFC 6454 6.2 serialises it: `scheme "://" host [ ":"
/// port ]` and nothing after, the host in ASCII (a browser sends a domain
/// in its IDNA A-label form, `xn--...`), or the opaque `null`.
#[derive(Debug, PartialEq, Eq)]
struct Origin<'a> {
    scheme: &'a str,
    host: &'a str,
    port: Option<&'a str>,
}

impl<'a> Origin<'a> {
    /// `None` for anything that is not a serialised origin (a path, a
    /// query, a fragment, user info, non-ASCII, an empty part), and for
    /// `null`.
    fn parse(s: &'a str) -> Option<Origin<'a>> {
        let (scheme, rest) = s.split_once("://")?;
        // RFC 3986 3.1: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
        let mut chars = scheme.bytes();
        if !chars.next()?.is_ascii_alphabetic() || !chars.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) {
            return None;
        }
        let (host, port) = match rest.strip_prefix('[') {
            // An IPv6 literal (RFC 3986 3.2.2).
            Some(v6) => {
                let (addr, after) = v6.split_once(']')?;
                if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
                    return None;
                }
                let port = match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':')?),
                };
                (&rest[..addr.len() + 2], port)
            }
            None => {
                let (host, port) = match rest.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (rest, None),
                };
                // Dot-separated labels of letters, digits, '-' and '_'.
                let label =
                    |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !host.split('.').all(label) {
                    return None;
                }
                (host, port)
            }
        };
        if let Some(port) = port {
            if port.is_empty()
                || port.len() > 5
                || !port.bytes().all(|b| b.is_ascii_digit())
                || port.parse::<u32>().ok()? > 65_535
            {
                return None;
            }
        }
        Some(Origin { scheme, host, port })
    }

    /// The same origin: scheme and host ASCII case-insensitive, the port
    /// as written (browsers leave the scheme's default out).
    fn same(&self, other: &Origin<'_>) -> bool {
        self.scheme.eq_ignore_ascii_case(other.scheme)
            && self.host.eq_ignore_ascii_case(other.host)
            && self.port == other.port
    }
}

/// A subdomain pattern, `[scheme://]*.domain[:port]`.
#[derive(Debug)]
struct Pattern<'a> {
    scheme: Option<&'a str>,
    /// With its leading dot: `.example.com`.
    domain: &'a str,
    port: Option<&'a str>,
}

impl<'a> Pattern<'a> {
    fn parse(entry: &'a str) -> Option<Pattern<'a>> {
        let (scheme, rest) = match entry.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, entry),
        };
        let rest = rest.strip_prefix('*')?;
        // Checked as an origin with a stand-in first label.
        let probe = format!("{}://x{rest}", scheme.unwrap_or("any"));
        let parsed = Origin::parse(&probe)?;
        if !rest.starts_with('.') || parsed.host.starts_with('[') {
            return None;
        }
        let (domain, port) = match rest.split_once(':') {
            Some((domain, port)) => (domain, Some(port)),
            None => (rest, None),
        };
        Some(Pattern { scheme, domain, port })
    }

    /// A strict subdomain of the domain, with the scheme (when it names
    /// one) and the port (none: the scheme's default).
    fn matches(&self, origin: &Origin<'_>) -> bool {
        let host = origin.host;
        host.len() > self.domain.len()
            && host[host.len() - self.domain.len()..].eq_ignore_ascii_case(self.domain)
            && self.scheme.is_none_or(|s| s.eq_ignore_ascii_case(origin.scheme))
            && self.port == origin.port
    }
}

/// Whether an allow-list entry is well formed: an exact origin (RFC 6454
/// serialisation, or `null`), or a pattern `[scheme://]*.domain[:port]`
/// with its one `*` leading the host.
pub fn check_origin_entry(entry: &str) -> Result<(), String> {
    if entry.contains('*') {
        return match Pattern::parse(entry) {
            Some(_) => Ok(()),
            None => Err(format!(
                "{entry:?}: a pattern is [scheme://]*.domain[:port], with its one * leading the host"
            )),
        };
    }
    if entry == "null" || Origin::parse(entry).is_some() {
        return Ok(());
    }
    Err(format!(
        "{entry:?} is not an origin (scheme://host[:port], nothing after; a host in ASCII)"
    ))
}

/// Whether `origin` (as the client sent it) is the entry's origin, or on a
/// strict subdomain of its pattern. What does not parse as a serialised
/// origin matches nothing but an entry `null` for `null`.
fn origin_matches(entry: &str, origin: &str) -> bool {
    let Some(parsed) = Origin::parse(origin) else {
        return entry == "null" && origin == "null";
    };
    if entry.contains('*') {
        return Pattern::parse(entry).is_some_and(|p| p.matches(&parsed));
    }
    Origin::parse(entry).is_some_and(|e| e.same(&parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /echo?x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\n\r\n";

    fn head(req: &str) -> Head<'_> {
        parse(req.as_bytes(), 8192).unwrap().unwrap().0
    }

    /// Parses and validates, keeping only the verdict.
    fn verdict(req: &str) -> Result<(), Reject> {
        head(req).validate_upgrade().map(|_| ())
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(GOOD.contains(replace), "{replace}");
        GOOD.replace(replace, by)
    }

    #[test]
    fn rfc_sample_accept_key() {
        // RFC 6455 1.3.
        assert_eq!(
            &accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn good_request() {
        let h = head(GOOD);
        assert_eq!((h.path, h.query), ("/echo", Some("x=1")));
        assert_eq!(h.validate_upgrade(), Ok(&b"dGhlIHNhbXBsZSBub25jZQ=="[..]));
        assert_eq!(h.origin, Some("http://example.com"));
        let offered: Vec<_> = h.offered_protocols().collect();
        assert_eq!(offered, vec![&b"chat"[..], b"superchat"]);
    }

    #[test]
    fn response_bytes() {
        let mut out = Vec::new();
        write_accept(&mut out, b"dGhlIHNhbXBsZSBub25jZQ==", Some("chat"));
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
        );
        let r = String::from_utf8(Reject::UnsupportedVersion.response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(r.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn tokens_are_case_insensitive_lists() {
        let mixed = with("Upgrade: websocket", "Upgrade: WebSocket")
            .replace("Connection: Upgrade", "Connection: keep-alive, UPGRADE");
        assert_eq!(verdict(&mixed), Ok(()));
        let no_upgrade_token = with("Connection: Upgrade", "Connection: keep-alive");
        assert_eq!(
            verdict(&no_upgrade_token),
            Err(Reject::BadRequest("Connection: Upgrade required"))
        );
        assert_eq!(
            verdict(&with("Upgrade: websocket", "Upgrade: h2c")),
            Err(Reject::BadRequest("Upgrade: websocket required"))
        );
    }

    #[test]
    fn method_version_host() {
        assert_eq!(verdict(&with("GET", "POST")).unwrap_err().status(), 400);
        assert_eq!(verdict(&with("HTTP/1.1", "HTTP/1.0")).unwrap_err().status(), 400);
        assert_eq!(verdict(&with("Host: example.com\r\n", "")).unwrap_err().status(), 400);
        let two_hosts = with("Host: example.com\r\n", "Host: a\r\nHost: b\r\n");
        assert_eq!(verdict(&two_hosts).unwrap_err().status(), 400);
        assert_eq!(
            verdict(&with(
                "Host: example.com\r\n",
                "Host: example.com\r\nContent-Length: 5\r\n"
            ))
            .unwrap_err()
            .status(),
            400
        );
    }

    #[test]
    fn key_rules() {
        for bad in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ=!",
            "dGhlIHNhbXBsZSBub25jZSE=",
            "dGhlIHNhbXBsZSBub25jZQ==AAAA",
        ] {
            let req = with("dGhlIHNhbXBsZSBub25jZQ==", bad);
            assert_eq!(verdict(&req).unwrap_err().status(), 400, "key {bad:?}");
        }
        let twice = with(
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version",
        );
        assert_eq!(verdict(&twice).unwrap_err().status(), 400);
    }

    #[test]
    fn version_rules() {
        assert_eq!(
            verdict(&with("Version: 13", "Version: 8")),
            Err(Reject::UnsupportedVersion)
        );
        assert_eq!(
            verdict(&with("Sec-WebSocket-Version: 13\r\n", "")),
            Err(Reject::UnsupportedVersion)
        );
    }

    #[test]
    fn partial_and_pipelined() {
        let mut bytes = GOOD.as_bytes().to_vec();
        for cut in 0..bytes.len() {
            assert!(matches!(parse(&bytes[..cut], 8192), Ok(None)), "cut {cut}");
        }
        bytes.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let (_, n) = parse(&bytes, 8192).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
    }

    #[test]
    fn head_limit_is_exact() {
        // Pad the head to exactly the limit with one header, then one byte more.
        let base = GOOD.len() + "X-Pad: \r\n".len();
        let at = with("Origin", &format!("X-Pad: {}\r\nOrigin", "a".repeat(8192 - base)));
        assert_eq!(at.len(), 8192);
        assert!(parse(at.as_bytes(), 8192).unwrap().is_some());
        let over = with("Origin", &format!("X-Pad: {}\r\nOrigin", "a".repeat(8193 - base)));
        assert_eq!(parse(over.as_bytes(), 8192).unwrap_err(), Reject::HeadTooLarge);
        // Incomplete and already at the limit: no point reading more.
        assert_eq!(parse(&over.as_bytes()[..8192], 8192).unwrap_err(), Reject::HeadTooLarge);
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            parse(with("Origin", &format!("{many}Origin")).as_bytes(), 1 << 20).unwrap_err(),
            Reject::HeadTooLarge
        );
    }

    #[test]
    fn protocol_choice_follows_route_order() {
        let h = head(GOOD);
        let route = vec!["superchat".to_string(), "chat".to_string()];
        assert_eq!(h.choose_protocol(&route), Some("superchat"));
        assert_eq!(h.choose_protocol(&["mqtt".to_string()]), None);
        let split = with(
            "Sec-WebSocket-Protocol: chat, superchat",
            "Sec-WebSocket-Protocol: a\r\nSec-WebSocket-Protocol: b ,chat",
        );
        assert_eq!(head(&split).choose_protocol(&["chat".to_string()]), Some("chat"));
    }

    #[test]
    fn extension_lines_are_kept_in_order_and_bounded() {
        let req = with(
            "Sec-WebSocket-Protocol: chat, superchat",
            "Sec-WebSocket-Extensions: x-a\r\nsec-websocket-extensions:  permessage-deflate ",
        );
        assert_eq!(head(&req).extension_lines(), [&b"x-a"[..], b"permessage-deflate"]);
        let lines = |n: usize| {
            with(
                "Sec-WebSocket-Protocol: chat, superchat\r\n",
                &"Sec-WebSocket-Extensions: a\r\n".repeat(n),
            )
        };
        let req = lines(9);
        assert_eq!(head(&req).extension_lines().len(), 8);
    }

    #[test]
    fn origin_policy() {
        let list = OriginPolicy::List(vec!["https://app.example.com".into()]);
        assert!(list.allows(Some("https://APP.example.com")));
        assert!(!list.allows(Some("https://evil.example.com")));
        assert!(list.allows(None));
        assert!(OriginPolicy::Any.allows(Some("x")));
    }

    #[test]
    fn origin_patterns_match_strict_subdomains_only() {
        let any_scheme = OriginPolicy::List(vec!["*.example.com".into()]);
        assert!(any_scheme.allows(Some("https://app.example.com")));
        assert!(any_scheme.allows(Some("http://a.b.EXAMPLE.com")));
        // Not the domain itself, not a look-alike, not another port.
        assert!(!any_scheme.allows(Some("https://example.com")));
        assert!(!any_scheme.allows(Some("https://evilexample.com")));
        assert!(!any_scheme.allows(Some("https://example.com.evil.net")));
        assert!(!any_scheme.allows(Some("https://app.example.com:8443")));
        assert!(!any_scheme.allows(Some("null")));
        // Not an origin at all: refused, whatever its end looks like.
        let https = OriginPolicy::List(vec!["https://*.example.com".into()]);
        for not_an_origin in [
            "https://evil.com#.example.com",
            "https://evil.com/.example.com",
            "https://evil.com?.example.com",
            "https://\u{e9}vil.example.com",
            "https://user@app.example.com",
            "https://app.example.com/",
            "https://app.example.com:",
            "https://app.example.com:99999",
            "https://app..example.com",
            "https://app.example.com.",
            "https:/app.example.com",
            "://app.example.com",
            "https://app.example.com:443/x",
            "https://app.exa mple.com",
        ] {
            assert!(!https.allows(Some(not_an_origin)), "{not_an_origin}");
        }
        assert!(https.allows(Some("https://xn--vil-bma.example.com")));
        let exact = OriginPolicy::List(vec!["https://app.example.com".into(), "null".into()]);
        assert!(!exact.allows(Some("https://app.example.com/")));
        assert!(!exact.allows(Some("https://app.example.com#")));
        assert!(exact.allows(Some("null")));
        let v6 = OriginPolicy::List(vec!["http://[::1]:8080".into()]);
        assert!(v6.allows(Some("http://[::1]:8080")));
        assert!(!v6.allows(Some("http://[::1]:8081")));
        assert!(!v6.allows(Some("http://[::1]x:8080")));
        let https = OriginPolicy::List(vec![
            "https://*.example.com".into(),
            "https://*.example.com:8443".into(),
        ]);
        assert!(https.allows(Some("https://app.example.com")));
        assert!(https.allows(Some("https://app.example.com:8443")));
        assert!(!https.allows(Some("http://app.example.com")));
        assert!(!https.allows(Some("https://app.example.com:8444")));
        for good in [
            "https://app.example.com",
            "*.example.com",
            "https://*.example.com:8443",
            "null",
        ] {
            assert_eq!(check_origin_entry(good), Ok(()), "{good}");
        }
        for bad in [
            "*",
            "*example.com",
            "https://app.*.com",
            "*.",
            "https://*.a.*.com",
            "",
            "a b",
            "://*.a.com",
            "https://app.example.com/",
            "app.example.com",
            "https://*.example.com/",
            "https://\u{e9}.example.com",
        ] {
            assert!(check_origin_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn absolute_form_targets_are_routed_by_path() {
        let absolute = GOOD.replace("GET /echo?x=1 ", "GET http://example.com:8080/echo?x=1 ");
        let h = head(&absolute);
        assert_eq!((h.path, h.query), ("/echo", Some("x=1")));
        let authority_only = GOOD.replace("GET /echo?x=1 ", "GET ws://example.com ");
        assert_eq!(head(&authority_only).path, "/");
    }

    #[test]
    fn origin_fails_closed_and_single_headers_stay_single() {
        let list = OriginPolicy::List(vec!["https://a.example".into()]);
        let mut bad = GOOD
            .replace("Origin: http://example.com", "Origin: https://a.example~")
            .into_bytes();
        let tilde = bad.iter().position(|&b| b == b'~').unwrap();
        bad[tilde] = 0xFF;
        let (h, _) = parse(&bad, 8192).unwrap().unwrap();
        assert!(!h.origin_allowed(&list), "a non-UTF-8 origin is refused by a list");
        assert!(h.origin_allowed(&OriginPolicy::Any));
        let h = head(GOOD);
        assert!(!h.origin_allowed(&list));
        assert!(h.origin_allowed(&OriginPolicy::List(vec!["http://example.com".into()])));
        let two = with(
            "Origin: http://example.com\r\n",
            "Origin: http://example.com\r\nOrigin: https://a.example\r\n",
        );
        assert_eq!(verdict(&two).unwrap_err().status(), 400);
        let two = with(
            "Sec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Version: 13\r\n",
        );
        assert_eq!(verdict(&two).unwrap_err().status(), 400);
    }

    #[test]
    fn health_by_method() {
        let get = String::from_utf8(health_response("GET").unwrap()).unwrap();
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n") && get.ends_with("\r\n\r\nok\n"));
        let head = String::from_utf8(health_response("HEAD").unwrap()).unwrap();
        assert!(head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"));
        assert_eq!(health_response("POST"), Err(Reject::MethodNotAllowed));
        let r = String::from_utf8(Reject::MethodNotAllowed.response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 405 ") && r.contains("\r\nAllow: GET, HEAD\r\n"));
        assert!(String::from_utf8(Reject::ShuttingDown.response())
            .unwrap()
            .starts_with("HTTP/1.1 503 "));
    }

    #[test]
    fn garbage_is_bad_request() {
        assert_eq!(parse(b"\x00\x01\x02\r\n\r\n", 8192).unwrap_err().status(), 400);
    }
}
