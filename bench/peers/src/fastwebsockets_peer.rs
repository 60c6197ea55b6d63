//! fastwebsockets, upgraded through hyper as its docs show.
//! - default: the docs' server loop (auto close and pong, a
//!   `FragmentCollector`, one `write_frame` per message, each a write of
//!   its own); broadcast writers send each subscriber a frame of its own.
//! - tuned: writes coalesced through a 64 KiB `BufWriter`, flushed once
//!   nothing more is ready to read (or, broadcasting, to send), and
//!   broadcast frames borrowing one shared payload.

use std::rc::Rc;

use fastwebsockets::{upgrade, FragmentCollector, Frame, OpCode, Payload, Role, WebSocket, WebSocketError};
use futures_util::FutureExt;
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::BufWriter;
use tokio::net::TcpListener;
use tokio::sync::mpsc::{channel, Sender};

use crate::{accept_loop, apply, Config, Mode, Topics, OUTBOX};

/// A frame to write: its payload (a delivery's is shared) and opcode.
type Outbox = Sender<(Rc<[u8]>, OpCode)>;

pub async fn serve(listener: TcpListener, config: Config, mode: Mode) -> std::io::Result<()> {
    accept_loop(listener, move |stream, id, topics: Rc<Topics<Outbox>>| async move {
        let service = service_fn(move |mut req: Request<Incoming>| {
            let topics = topics.clone();
            async move {
                let (response, fut) = upgrade::upgrade(&mut req)?;
                tokio::task::spawn_local(async move {
                    let Ok(ws) = fut.await else { return };
                    let _ = match mode {
                        Mode::Echo => echo(ws, config).await,
                        Mode::Broadcast => broadcast(ws, config, id, topics).await,
                    };
                });
                Ok::<Response<Empty<Bytes>>, WebSocketError>(response)
            }
        });
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await;
    })
    .await
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

async fn echo(mut ws: WebSocket<Upgraded>, config: Config) -> Result<(), WebSocketError> {
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    match config {
        Config::Default => {
            let mut ws = FragmentCollector::new(ws);
            loop {
                let frame = ws.read_frame().await?;
                match frame.opcode {
                    OpCode::Close => return Ok(()),
                    OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
                    _ => {}
                }
            }
        }
        Config::Tuned => {
            let stream = BufWriter::with_capacity(64 * 1024, ws.into_inner());
            let mut ws = WebSocket::after_handshake(stream, Role::Server);
            ws.set_auto_close(true);
            ws.set_auto_pong(true);
            loop {
                let mut frame = Some(ws.read_frame().await?);
                // Echo what is ready, then write it out at once.
                while let Some(f) = frame.take() {
                    match f.opcode {
                        OpCode::Close => return ws.flush().await,
                        // Unmasked on the way in; a server frame has no mask.
                        OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                            ws.write_frame(Frame::new(f.fin, f.opcode, None, f.payload)).await?
                        }
                        _ => {}
                    }
                    if let Some(next) = ws.read_frame().now_or_never() {
                        frame = Some(next?);
                    }
                }
                ws.flush().await?;
            }
        }
    }
}

async fn broadcast(
    mut ws: WebSocket<Upgraded>,
    config: Config,
    id: u64,
    topics: Rc<Topics<Outbox>>,
) -> Result<(), WebSocketError> {
    ws.set_auto_close(true);
    ws.set_auto_pong(false);
    // Tuned: the write half buffered, flushed once the outbox is empty.
    let (read, mut write) = ws.split(|s| {
        let (r, w) = tokio::io::split(s);
        let capacity = if config == Config::Tuned { 64 * 1024 } else { 0 };
        (r, BufWriter::with_capacity(capacity, w))
    });
    let mut read = fastwebsockets::FragmentCollectorRead::new(read);
    let (outbox, mut inbox) = channel::<(Rc<[u8]>, OpCode)>(OUTBOX);
    let writer = tokio::task::spawn_local(async move {
        match config {
            Config::Default => {
                while let Some((payload, opcode)) = inbox.recv().await {
                    let frame = Frame::new(true, opcode, None, Payload::Owned(payload.to_vec()));
                    // (A zero-capacity buffer: each frame is written as it comes.)
                    if write.write_frame(frame).await.is_err() || write.flush().await.is_err() {
                        break;
                    }
                }
            }
            Config::Tuned => {
                'out: while let Some(first) = inbox.recv().await {
                    let mut next = Some(first);
                    while let Some((payload, opcode)) = next.take() {
                        let frame = Frame::new(true, opcode, None, Payload::Borrowed(&payload));
                        if write.write_frame(frame).await.is_err() {
                            break 'out;
                        }
                        next = inbox.try_recv().ok();
                    }
                    if write.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut mine: Vec<String> = Vec::new();
    let pong_outbox = outbox.clone();
    loop {
        let mut obligated = |frame: Frame<'_>| {
            // Pongs (and the close reply) go out through the writer.
            let _ = pong_outbox.try_send((Rc::from(&frame.payload[..]), frame.opcode));
            async { Ok::<(), WebSocketError>(()) }
        };
        let frame = match read.read_frame(&mut obligated).await {
            Ok(f) => f,
            Err(_) => break,
        };
        let opcode = match frame.opcode {
            OpCode::Close => break,
            op @ (OpCode::Text | OpCode::Binary) => op,
            _ => continue,
        };
        if let Some((t, msg)) = apply(&topics, id, &outbox, &mut mine, &frame.payload) {
            // Encoded once; every subscriber's frame borrows or copies it.
            let msg: Rc<[u8]> = msg.into();
            topics.publish(t, (msg, opcode)).await;
        }
    }
    topics.leave_all(&mine, id);
    drop(outbox);
    writer.abort();
    Ok(())
}
