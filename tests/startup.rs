//! Starting up: driver choice, bad flags and files, a port already held.

mod common;

use common::{start_error, Raw, Server};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn auto_takes_epoll() {
    let server = Server::start("auto", &[]);
    assert!(server.log().contains("driver=epoll"), "{}", server.log());
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send_frame(0x81, b"ok");
    assert_eq!(raw.read_frame().unwrap().payload, b"ok");
}

#[test]
fn each_driver_is_reported() {
    for driver in common::DRIVERS {
        let server = Server::start(driver, &[]);
        let expected = if driver == "uring" {
            "driver=io_uring"
        } else {
            "driver=epoll"
        };
        assert!(server.log().contains(expected), "{}", server.log());
    }
}

#[test]
fn bad_flags_are_clear_errors() {
    let (code, err) = start_error(&["--workers", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("workers: 0 is outside 1..="), "{err}");
    // More workers than CPUs only when asked for, and never so many that
    // the mesh cannot be built: a clear error, not an abort.
    let (code, err) = start_error(&["--workers", "1024"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("workers: 1024 is more than the") && err.contains("--oversubscribe"),
        "{err}"
    );
    let (code, err) = start_error(&["--workers", "1024", "--oversubscribe"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("workers: 1024 is outside 1..=256"), "{err}");
    let (code, err) = start_error(&["--workers", "4", "--oversubscribe", "--mesh-ring-capacity", "1048576"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("mesh_ring_capacity: 1048576 envelopes in each of 12 rings"),
        "{err}"
    );
    // A key that cannot be used is named by its own option.
    let junk = std::env::temp_dir().join(format!("sluice-junk-key-{}.pem", std::process::id()));
    std::fs::write(&junk, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap();
    let (code, err) = start_error(&["--jwt-public-key", junk.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("jwt_public_key: the JWT public key is not"), "{err}");
    let _ = std::fs::remove_file(junk);
    // Two options naming one address say so.
    let (code, err) = start_error(&["--listen", "127.0.0.1:47811", "--admin-listen", "127.0.0.1:47811"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("admin_listen: 127.0.0.1:47811 is --listen's address too"),
        "{err}"
    );
    let (code, err) = start_error(&["--listen", "0.0.0.0:47811", "--admin-listen", "127.0.0.1:47811"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("admin_listen: 127.0.0.1:47811 is --listen's address too"),
        "{err}"
    );
    let (code, err) = start_error(&["--driver", "kqueue"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("invalid value 'kqueue'"), "{err}");
    let (code, err) = start_error(&["--ping-interval-ms", "1000", "--idle-timeout-ms", "500"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("idle_timeout_ms"), "{err}");
}

#[test]
fn bad_config_file_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("sluice-bad-{}.toml", std::process::id()));
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nmax_frame_bytes = \"big\"\n").unwrap();
    let (code, err) = start_error(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("config file") && err.contains("max_frame_bytes"), "{err}");
    let (code, err) = start_error(&["--config", "/nonexistent/sluice.toml"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/sluice.toml"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn port_held_by_another_process_is_refused() {
    let first = Server::start("epoll", &[]);
    let addr = first.addr.to_string();
    let (code, err) = start_error(&["--listen", &addr]);
    assert_eq!(code, Some(2));
    assert!(err.contains("in use by another process"), "{err}");
    // Said once, not once as a log line and again as a plain one.
    assert_eq!(err.matches("in use by another process").count(), 1, "{err}");
}

/// The start log names each address once and lists every route with what
/// it speaks.
#[test]
fn the_start_log_lists_the_routes() {
    let server = Server::start("epoll", &["--deflate", "dedicated"]);
    let log = server.log();
    let line = log.lines().find(|l| l.contains("listening on")).unwrap();
    assert_eq!(line.matches(&server.addr.to_string()).count(), 1, "{line}");
    for (path, protocol) in [("/echo", "echo"), ("/ws", "pubsub"), ("/stomp", "stomp")] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("route {path} ")) || l.ends_with(&format!("route {path}")))
            .unwrap_or_else(|| panic!("no {path} in {log}"));
        assert!(line.contains(&format!("protocol={protocol}")), "{line}");
        assert!(
            line.contains("auth=none") && line.contains("deflate=dedicated"),
            "{line}"
        );
    }
}

/// `--log-format json` (or `log_format` in the file): every line one JSON
/// object, the start error included.
#[test]
fn json_logs_are_one_object_per_line() {
    let path = std::env::temp_dir().join(format!("sluice-json-{}.toml", std::process::id()));
    std::fs::write(&path, "log_format = \"json\"\n").unwrap();
    for args in [&["--log-format", "json"][..], &["--config", path.to_str().unwrap()]] {
        let mut server = Server::start("epoll", args);
        assert!(server.terminate().success());
        let log = server.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let route = lines
            .iter()
            .find(|l| l["fields"]["message"] == "route /ws")
            .unwrap_or_else(|| panic!("{log}"));
        assert_eq!(route["fields"]["protocol"], "pubsub");
        assert_eq!(route["level"], "INFO");
        assert!(lines.iter().any(|l| l["fields"]["message"] == "stopped"), "{log}");
    }
    let (code, err) = start_error(&["--config", path.to_str().unwrap(), "--max-frame-bytes", "0"]);
    assert_eq!(code, Some(2));
    let line: serde_json::Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(line["level"], "ERROR");
    assert!(
        line["fields"]["message"].as_str().unwrap().contains("max_frame_bytes"),
        "{err}"
    );
    // A file that asks for JSON but does not read as options.
    std::fs::write(&path, "log_format = \"json\"\nbogus_key = 1\n").unwrap();
    let (code, err) = start_error(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    let line: serde_json::Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert!(
        line["fields"]["message"].as_str().unwrap().contains("bogus_key"),
        "{err}"
    );
    let _ = std::fs::remove_file(path);
}

/// A worker that cannot start (here: too few open files for the second)
/// is reported at once: the workers that started do not wait for it in
/// their shutdown.
#[test]
fn a_worker_that_fails_to_start_is_reported_at_once() {
    for nofile in 12..40u64 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--workers", "2", "--driver", "epoll"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let started = Instant::now();
        let mut status = None;
        while started.elapsed() < Duration::from_secs(15) {
            if let Some(s) = child.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            if lines.lock().unwrap().iter().any(|l| l.contains("listening on")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = started.elapsed();
        // Exited already, or still serving: either way, reaped here.
        let _ = child.kill();
        let _ = child.wait();
        let log = lines.lock().unwrap().join("\n");
        if log.contains("listening on") {
            // Enough descriptors: nothing more to learn.
            return;
        }
        if log.contains("failed to start") || status.is_some() {
            assert!(
                took < Duration::from_secs(3),
                "with {nofile} open files the start error took {took:?}:\n{log}"
            );
        }
    }
}
