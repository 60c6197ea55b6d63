//! The echo route through an independent client (tokio-tungstenite), under
//! both I/O drivers.

mod common;

use common::{masked_frame, tokio_rt, Raw, Server};
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

both_drivers!(echoes_text_and_binary, |driver| {
    let server = Server::start(driver, &[]);
    tokio_rt().block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/echo")).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let messages = vec![
            Message::Text("hello".into()),
            Message::Text(String::new()),
            Message::Text("κόσμε 🌊".repeat(1000)),
            Message::Binary(vec![0, 1, 2, 255]),
            Message::Binary(big),
            Message::Binary(vec![7; 126]),
            Message::Binary(vec![8; 65535]),
            Message::Binary(vec![9; 65536]),
        ];
        for m in &messages {
            ws.send(m.clone()).await.unwrap();
        }
        for m in &messages {
            let got = ws.next().await.unwrap().unwrap();
            assert_eq!(&got, m);
        }
        ws.close(None).await.unwrap();
    });
});

both_drivers!(answers_pings_with_same_payload, |driver| {
    let server = Server::start(driver, &[]);
    tokio_rt().block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/echo")).await.unwrap();
        ws.send(Message::Ping(b"are you there".to_vec())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Pong(b"are you there".to_vec())
        );
    });
});

both_drivers!(close_handshake_echoes_code, |driver| {
    let server = Server::start(driver, &[]);
    tokio_rt().block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/echo")).await.unwrap();
        ws.send(Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::from(4321),
                reason: "bye".into(),
            },
        )))
        .await
        .unwrap();
        match ws.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4321),
            other => panic!("expected close, got {other:?}"),
        }
        // The server then closes the TCP connection (RFC 6455 7.1.1).
        assert!(ws.next().await.is_none());
    });
});

both_drivers!(negotiates_subprotocol_from_route, |driver| {
    let dir = std::env::temp_dir().join(format!("sluice-proto-{driver}-{}", std::process::id()));
    std::fs::write(
        &dir,
        "[[route]]\npath = \"/chat\"\nprotocol = \"echo\"\nsubprotocols = [\"v2.chat\", \"v1.chat\"]\n",
    )
    .unwrap();
    let server = Server::start(driver, &["--config", dir.to_str().unwrap()]);
    tokio_rt().block_on(async {
        let mut req = server.url("/chat").into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "v1.chat,v2.chat".parse().unwrap());
        let (_ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], "v2.chat");
        // The default /echo route is replaced by the file's routes.
        assert!(tokio_tungstenite::connect_async(server.url("/echo")).await.is_err());
    });
    let _ = std::fs::remove_file(dir);
});

both_drivers!(two_hundred_concurrent_clients, |driver| {
    let server = Server::start(driver, &[]);
    let url = server.url("/echo");
    tokio_rt().block_on(async {
        let clients = (0..200).map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                for i in 0..50 {
                    let text = format!("client {c} message {i}");
                    ws.send(Message::Text(text.clone())).await.unwrap();
                    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text(text));
                }
                ws.close(None).await.unwrap();
            })
        });
        let all = futures_util::future::join_all(clients);
        for r in tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("clients finished")
        {
            r.unwrap();
        }
    });
});

both_drivers!(sigterm_sends_1001_to_every_client_and_exits_0, |driver| {
    let mut server = Server::start(driver, &[]);
    let url = server.url("/echo");
    let rt = tokio_rt();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(200);
    let clients: Vec<_> = (0..100)
        .map(|c| {
            let url = url.clone();
            let ready = ready_tx.clone();
            rt.spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                ready.send(()).await.unwrap();
                // Keep echoing until the server closes.
                let mut i = 0u64;
                loop {
                    let _ = ws.send(Message::Text(format!("{c}:{i}"))).await;
                    i += 1;
                    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                        Ok(Some(Ok(Message::Text(_)))) => continue,
                        Ok(Some(Ok(Message::Close(Some(f))))) => return u16::from(f.code),
                        other => panic!("client {c}: unexpected {other:?}"),
                    }
                }
            })
        })
        .collect();
    rt.block_on(async {
        for _ in 0..100 {
            ready_rx.recv().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let status = std::thread::scope(|s| {
        let term = s.spawn(|| server.terminate());
        let codes: Vec<u16> = rt.block_on(async {
            let mut codes = Vec::new();
            for c in clients {
                codes.push(c.await.unwrap());
            }
            codes
        });
        assert!(codes.iter().all(|&c| c == 1001), "{codes:?}");
        term.join().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{}", server.log());
});

both_drivers!(the_server_closes_tcp_right_after_the_close_handshake, |driver| {
    // RFC 6455 7.1.1: the server closes the TCP connection first, and a
    // client waits for it. Clients that were busy echoing up to their close
    // must see the end of the stream at once, not only once they give up.
    let server = Server::start(driver, &[]);
    let addr = server.addr;
    let clients: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut raw = Raw::open(addr, "/echo");
                let until = Instant::now() + Duration::from_millis(500);
                let batch: Vec<u8> = (0..16).flat_map(|_| masked_frame(0x82, &[7u8; 32])).collect();
                raw.send(&batch);
                while Instant::now() < until {
                    raw.send(&batch);
                    for _ in 0..16 {
                        assert_eq!(raw.read_frame().expect("echo").payload, [7u8; 32]);
                    }
                }
                // The close follows echoes still on their way back.
                raw.send_frame(0x88, &1000u16.to_be_bytes());
                assert_eq!(raw.expect_close(), Some(1000));
                raw.stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let asked = Instant::now();
                assert!(raw.is_closed_by_server(), "no FIN within 1 s of the close handshake");
                asked.elapsed()
            })
        })
        .collect();
    for c in clients {
        let took = c.join().unwrap();
        assert!(took < Duration::from_millis(500), "FIN after {took:?}");
    }
});
