//! tokio-tungstenite.
//! - default: `accept_async`, then `next()` and `send()` per message (a
//!   send flushes); broadcast writers `send()` each delivery.
//! - tuned: a 4 KiB read buffer (the default 128 KiB one is zero-filled
//!   before every read), and writes coalesced: messages are `feed()`-ed
//!   while more are ready, then flushed once.

use std::rc::Rc;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{channel, Sender};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::{accept_loop, apply, Config, Mode, Topics, OUTBOX};

type Outbox = Sender<Message>;

pub async fn serve(listener: TcpListener, config: Config, mode: Mode) -> std::io::Result<()> {
    accept_loop(listener, move |stream, id, topics: Rc<Topics<Outbox>>| async move {
        let _ = match mode {
            Mode::Echo => echo(stream, config).await,
            Mode::Broadcast => broadcast(stream, config, id, topics).await,
        };
    })
    .await
}

async fn accept(
    stream: TcpStream,
    config: Config,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    match config {
        Config::Default => tokio_tungstenite::accept_async(stream).await,
        Config::Tuned => {
            let c = WebSocketConfig::default().read_buffer_size(4096);
            tokio_tungstenite::accept_async_with_config(stream, Some(c)).await
        }
    }
}

async fn echo(stream: TcpStream, config: Config) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let mut ws = accept(stream, config).await?;
    while let Some(msg) = ws.next().await {
        let msg = msg?;
        if !(msg.is_text() || msg.is_binary()) {
            continue;
        }
        match config {
            Config::Default => ws.send(msg).await?,
            Config::Tuned => {
                ws.feed(msg).await?;
                // Whatever else has already arrived goes out in the same write.
                while let Some(more) = ws.next().now_or_never() {
                    match more {
                        Some(Ok(m)) if m.is_text() || m.is_binary() => ws.feed(m).await?,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e),
                        None => return ws.flush().await,
                    }
                }
                ws.flush().await?;
            }
        }
    }
    Ok(())
}

async fn broadcast(
    stream: TcpStream,
    config: Config,
    id: u64,
    topics: Rc<Topics<Outbox>>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let ws = accept(stream, config).await?;
    let (mut sink, mut source) = ws.split();
    let (outbox, mut inbox) = channel::<Message>(OUTBOX);
    let writer = tokio::task::spawn_local(async move {
        while let Some(m) = inbox.recv().await {
            let sent = match config {
                Config::Default => sink.send(m).await,
                Config::Tuned => {
                    async {
                        sink.feed(m).await?;
                        while let Ok(m) = inbox.try_recv() {
                            sink.feed(m).await?;
                        }
                        sink.flush().await
                    }
                    .await
                }
            };
            if sent.is_err() {
                break;
            }
        }
    });
    let mut mine: Vec<String> = Vec::new();
    while let Some(Ok(msg)) = source.next().await {
        let (binary, data) = match &msg {
            Message::Text(t) => (false, t.as_bytes()),
            Message::Binary(b) => (true, &b[..]),
            _ => continue,
        };
        if let Some((t, frame)) = apply(&topics, id, &outbox, &mut mine, data) {
            // Encoded once; every subscriber gets a cheap clone.
            let out = if binary {
                Message::Binary(frame.into())
            } else {
                match String::from_utf8(frame) {
                    Ok(s) => Message::Text(s.into()),
                    Err(_) => continue,
                }
            };
            topics.publish(t, out).await;
        }
    }
    topics.leave_all(&mine, id);
    drop(outbox);
    writer.abort();
    Ok(())
}
