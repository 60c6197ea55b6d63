//! A minimal WebSocket-over-HTTP backend for the backend-route benchmark
//! (bench/backend.sh): it answers `OPEN` with `OPEN`, each `TEXT` and
//! `BINARY` with the same event, `CLOSE` with `CLOSE`, and nothing else.
//! hyper's HTTP/1.1 server on one tokio current-thread runtime, so that it
//! costs one core at most and the gateway in front is what is measured.
//!
//! Run: `over-http-echo --listen 127.0.0.1:9100` (prints `listening on ADDR`).

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

const EVENTS: &str = "application/websocket-events";

/// Echoes the data events of `body`; `None` if it does not parse.
fn answer(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        let (line, after) = (&rest[..end], &rest[end + 2..]);
        rest = after;
        let (kind, len) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], Some(std::str::from_utf8(&line[i + 1..]).ok()?)),
            None => (line, None),
        };
        let content = match len {
            Some(hex) => {
                let n = usize::from_str_radix(hex, 16).ok()?;
                let content = rest.get(..n)?;
                rest = rest.get(n + 2..)?;
                Some(content)
            }
            None => None,
        };
        match kind {
            b"OPEN" => out.extend_from_slice(b"OPEN\r\n"),
            b"TEXT" | b"BINARY" | b"CLOSE" => {
                let content = content.unwrap_or(&[]);
                out.extend_from_slice(kind);
                out.extend_from_slice(format!(" {:x}\r\n", content.len()).as_bytes());
                out.extend_from_slice(content);
                out.extend_from_slice(b"\r\n");
            }
            _ => {}
        }
    }
    Some(out)
}

async fn serve(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match request.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let response = match answer(&body) {
        Some(events) => Response::builder()
            .header("Content-Type", EVENTS)
            .body(Full::new(Bytes::from(events))),
        None => Response::builder().status(400).body(Full::new(Bytes::new())),
    };
    Ok(response.expect("a valid response"))
}

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:9100".parse().unwrap();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDR").parse().expect("an address"),
            other => panic!("unknown argument {other}; usage: over-http-echo [--listen ADDR]"),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        eprintln!("listening on {}", listener.local_addr().unwrap());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::task::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, hyper::service::service_fn(serve))
                    .await;
            });
        }
    });
}
