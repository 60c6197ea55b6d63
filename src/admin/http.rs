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
        head_len,
    }))
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

/// A whole response.
pub fn response(status: u16, content_type: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}{}\r\n",
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
