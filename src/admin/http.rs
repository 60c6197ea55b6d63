//! The admin port's HTTP/1.1 without I/O: request heads (httparse), the
//! body's length, and responses. Keep-alive unless the client says close.

/// Largest request head.
pub const MAX_HEAD_BYTES: usize = 8192;
const MAX_HEADERS: usize = 32;

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: String,
    pub content_length: usize,
    pub authorization: Option<Vec<u8>>,
    pub binary: bool,
    pub close: bool,
    /// An `Origin` header (RFC 6454) names another origin than the one
    /// this request was sent to (its `Host`): a browser page of another
    /// site made it. Two `Origin` headers count as another origin.
    pub cross_origin: bool,
    /// `Host` names an IP address or `localhost` (or is absent), not a
    /// DNS name: a page that had its own name resolve to this address
    /// (DNS rebinding) cannot send such a request.
    pub host_is_address: bool,
    /// Bytes of the head, including its blank line.
    pub head_len: usize,
}

/// Why a request could not be read; answered with the status, then closed.
#[derive(Debug, PartialEq, Eq)]
pub struct Bad(pub u16, pub &'static str);

/// Parses a request head from `buf`. `Ok(None)`: incomplete.
pub fn parse(buf: &[u8], max_body: usize) -> Result<Option<Request>, Bad> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(Bad(431, "request head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Bad(431, "too many headers")),
        Err(_) => return Err(Bad(400, "malformed request")),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(Bad(431, "request head too large"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut content_length: Option<usize> = None;
    let mut authorization = None;
    let mut binary = false;
    let mut close = req.version == Some(0);
    let mut origin = None;
    let mut host = None;
    for h in req.headers.iter() {
        let value = h.value;
        if h.name.eq_ignore_ascii_case("content-length") {
            // RFC 9112 6.3 (5): a length that is not one value of 1*DIGIT
            // (RFC 9110 8.6), or lengths that differ, make the framing
            // unknowable: 400, and the connection is closed.
            let length = parse_length(value)?;
            if content_length.is_some_and(|l| l != length) {
                return Err(Bad(400, "conflicting content-length"));
            }
            content_length = Some(length);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // RFC 7230 3.3.3: chunked bodies are not accepted here.
            return Err(Bad(411, "send a content-length"));
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_vec());
        } else if h.name.eq_ignore_ascii_case("content-type") {
            binary = value.starts_with(b"application/octet-stream");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("origin") {
            // Two: read as another origin's (below), never as ours.
            origin = Some(if origin.is_some() { &b""[..] } else { value });
        } else if h.name.eq_ignore_ascii_case("host") {
            // RFC 9112 3.2: more than one Host line is a 400.
            if host.is_some() {
                return Err(Bad(400, "more than one host header"));
            }
            host = Some(value);
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_body {
        return Err(Bad(413, "body over the size limit"));
    }
    Ok(Some(Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        content_length,
        authorization,
        binary,
        close,
        cross_origin: origin.is_some_and(|origin| !same_origin(origin, host.unwrap_or(b""))),
        host_is_address: host.is_none_or(is_address),
        head_len,
    }))
}

/// Whether a `Host` value names an IP address (`127.0.0.1`, `[::1]`) or
/// `localhost`, with or without a port.
fn is_address(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // An IPv6 literal: `[addr]` or `[addr]:port`.
        Some(rest) => match rest.split_once(']') {
            Some((addr, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(is_port) => {
                return addr.parse::<std::net::Ipv6Addr>().is_ok()
            }
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn is_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `origin` is `http://` and the `host` the request was sent to
/// (RFC 6454 4: the admin port speaks plain HTTP; port 80 may be left out
/// of either). Hosts compare without regard to case (RFC 3986 3.2.2).
fn same_origin(origin: &[u8], host: &[u8]) -> bool {
    let Some(authority) = origin.strip_prefix(b"http://") else {
        return false;
    };
    let without_80 = |a: &[u8]| a.strip_suffix(b":80").map(<[u8]>::to_vec).unwrap_or_else(|| a.to_vec());
    !host.is_empty() && without_80(authority).eq_ignore_ascii_case(&without_80(host))
}

/// A `Content-Length` value: 1*DIGIT and nothing else (RFC 9110 8.6), its
/// surrounding whitespace already taken off by the header parser. A value
/// too large to hold is as good as over any limit.
fn parse_length(value: &[u8]) -> Result<usize, Bad> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(Bad(400, "bad content-length"));
    }
    Ok(value
        .iter()
        .try_fold(0usize, |n, d| n.checked_mul(10)?.checked_add(usize::from(d - b'0')))
        .unwrap_or(usize::MAX))
}

/// The value of `name` in a query string (no percent-decoding: topic names
/// and the other values we take need none).
pub fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Percent-decodes a query value (`%20`, `+` for space).
pub fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A whole response. Its type is as said: a browser must not guess
/// another (a topic name in JSON read as HTML).
pub fn response(status: u16, content_type: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         X-Content-Type-Options: nosniff\r\n{}{}\r\n",
        reason(status),
        body.len(),
        if status == 401 {
            "WWW-Authenticate: Bearer\r\n"
        } else {
            ""
        },
        if close { "Connection: close\r\n" } else { "" },
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The web console (`console.html`): one page, everything inline. It may
/// run its own script only (named by its hash), talk to this port only, and
/// no other site may frame it.
pub fn console(close: bool) -> Vec<u8> {
    const PAGE: &str = include_str!("console.html");
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        use base64::Engine;
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash = ring::digest::digest(&ring::digest::SHA256, script.as_bytes());
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            base64::engine::general_purpose::STANDARD.encode(hash)
        )
    });
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Content-Security-Policy: {policy}\r\n\
         X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nCache-Control: no-store\r\n{}\r\n",
        PAGE.len(),
        if close { "Connection: close\r\n" } else { "" },
    )
    .into_bytes();
    out.extend_from_slice(PAGE.as_bytes());
    out
}

/// A JSON `{"error": ...}` response.
pub fn error(status: u16, message: &str, close: bool) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    response(status, "application/json", body.as_bytes(), close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let r = parse(
            b"POST /publish?topic=a HTTP/1.1\r\nContent-Length: 5\r\nAuthorization: Bearer t\r\n\r\nhello",
            100,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query.as_str()),
            ("POST", "/publish", "topic=a")
        );
        assert_eq!((r.content_length, r.close, r.binary), (5, false, false));
        assert_eq!(r.authorization.as_deref(), Some(&b"Bearer t"[..]));
        assert_eq!(r.head_len, 78);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", 0), Ok(None));
        assert!(parse(b"GET / HTTP/1.0\r\n\r\n", 0).unwrap().unwrap().close);
    }

    #[test]
    fn a_page_of_another_origin_is_told_apart() {
        let cross = |headers: &str| {
            let head = format!("POST /publish HTTP/1.1\r\n{headers}\r\n");
            parse(head.as_bytes(), 0).unwrap().unwrap().cross_origin
        };
        // No Origin: not a browser page's request (curl, a backend).
        assert!(!cross("Host: 127.0.0.1:9090\r\n"));
        for same in [
            "Host: 127.0.0.1:9090\r\nOrigin: http://127.0.0.1:9090\r\n",
            "Origin: http://LOCALHOST:9090\r\nHost: localhost:9090\r\n",
            "Host: admin.example\r\nOrigin: http://admin.example:80\r\n",
            "Host: [::1]:9090\r\nOrigin: http://[::1]:9090\r\n",
        ] {
            assert!(!cross(same), "{same}");
        }
        for other in [
            "Host: 127.0.0.1:9090\r\nOrigin: https://evil.example\r\n",
            "Host: 127.0.0.1:9090\r\nOrigin: http://127.0.0.1:9091\r\n",
            "Host: 127.0.0.1:9090\r\nOrigin: https://127.0.0.1:9090\r\n",
            "Host: 127.0.0.1:9090\r\nOrigin: null\r\n",
            "Origin: http://127.0.0.1:9090\r\n",
            "Host: 127.0.0.1:9090\r\nOrigin: http://127.0.0.1:9090/\r\n",
        ] {
            assert!(cross(other), "{other}");
        }
    }

    #[test]
    fn a_host_that_is_an_address_is_told_apart() {
        let host = |value: &str| {
            let head = format!("GET /stats HTTP/1.1\r\nHost: {value}\r\n\r\n");
            parse(head.as_bytes(), 0).unwrap().unwrap().host_is_address
        };
        for address in [
            "127.0.0.1",
            "127.0.0.1:9090",
            "10.1.2.3:80",
            "localhost",
            "LocalHost:9090",
            "[::1]",
            "[::1]:9090",
        ] {
            assert!(host(address), "{address}");
        }
        for name in [
            "evil.example",
            "evil.example:9090",
            "127.0.0.1.nip.io:9090",
            "localhost.evil.example",
            "127.0.0.1:",
            "127.0.0.1:x",
            "127.0.0.1:123456",
            "[::1",
            "[::1]x",
            "[evil]:9090",
            "",
        ] {
            assert!(!host(name), "{name}");
        }
        assert!(parse(b"GET / HTTP/1.0\r\n\r\n", 0).unwrap().unwrap().host_is_address);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 0),
            Err(Bad(400, "more than one host header"))
        );
        let two = b"POST / HTTP/1.1\r\nHost: a\r\nOrigin: http://a\r\nOrigin: http://a\r\n\r\n";
        assert!(parse(two, 0).unwrap().unwrap().cross_origin);
    }

    #[test]
    fn limits() {
        assert_eq!(
            parse(b"POST /p HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 100),
            Err(Bad(413, "body over the size limit"))
        );
        assert!(parse(b"POST /p HTTP/1.1\r\nContent-Length: 100\r\n\r\n", 100).is_ok());
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(long.as_bytes(), 0).unwrap_err().0, 431);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 0).unwrap_err().0,
            400
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 0)
                .unwrap_err()
                .0,
            411
        );
        assert_eq!(parse(b"\x01\x02 garbage\r\n\r\n", 0).unwrap_err().0, 400);
    }

    #[test]
    fn content_length_is_one_value_of_digits() {
        let with = |headers: &str| parse(format!("POST /p HTTP/1.1\r\n{headers}\r\n").as_bytes(), 100);
        // Differing values: the framing is unknowable (RFC 9112 6.3).
        assert_eq!(
            with("Content-Length: 60\r\nContent-Length: 2\r\n"),
            Err(Bad(400, "conflicting content-length"))
        );
        // The same value twice is one length.
        assert_eq!(
            with("Content-Length: 2\r\nContent-Length: 2\r\n")
                .unwrap()
                .unwrap()
                .content_length,
            2
        );
        for bad in ["+2", "-2", "2 2", "2, 2", "0x2", "2.0", "", "\u{b2}"] {
            assert_eq!(
                with(&format!("Content-Length: {bad}\r\n")),
                Err(Bad(400, "bad content-length")),
                "{bad:?}"
            );
        }
        assert_eq!(with("Content-Length:  7 \r\n").unwrap().unwrap().content_length, 7);
        assert_eq!(with("Content-Length: 007\r\n").unwrap().unwrap().content_length, 7);
        assert_eq!(
            with("Content-Length: 99999999999999999999999999\r\n"),
            Err(Bad(413, "body over the size limit"))
        );
    }

    #[test]
    fn queries() {
        assert_eq!(query_value("topic=a&code=4000", "code"), Some("4000"));
        assert_eq!(query_value("topic=a", "code"), None);
        assert_eq!(percent_decode("going%20away+now").as_deref(), Some("going away now"));
        assert_eq!(percent_decode("%zz"), None);
    }
}
