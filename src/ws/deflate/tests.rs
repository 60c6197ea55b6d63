use super::*;
use proptest::prelude::*;

fn shared(lines: &[&str]) -> Option<Agreement> {
    negotiate(lines.iter().map(|l| l.as_bytes()), Mode::Shared)
}

fn response(a: &Agreement) -> String {
    let mut out = Vec::new();
    a.write_response(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn a_plain_offer_is_agreed_with_no_context_takeover_either_way() {
    let a = shared(&["permessage-deflate"]).unwrap();
    assert_eq!(
        response(&a),
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
    );
    assert_eq!(a.server_window_bits, 15);
    // What browsers send.
    let a = shared(&["permessage-deflate; client_max_window_bits"]).unwrap();
    assert!(a.client_no_context_takeover && a.client_window_bits.is_none());
}

#[test]
fn server_max_window_bits_is_answered_with_the_value_offered() {
    for bits in 8..=15u8 {
        let a = shared(&[&format!("permessage-deflate; server_max_window_bits={bits}")]).unwrap();
        assert_eq!(a.server_window_bits, bits);
        assert!(response(&a).contains(&format!("; server_max_window_bits={bits}\r\n")));
    }
    // A quoted-string whose value is a token (RFC 6455 9.1).
    let a = shared(&["permessage-deflate; server_max_window_bits=\"10\""]).unwrap();
    assert_eq!(a.server_window_bits, 10);
}

#[test]
fn offers_breaking_a_rule_are_declined() {
    for bad in [
        // 7.1: unknown parameters.
        "permessage-deflate; foo",
        "permessage-deflate; server_no_context_takeover; x=1",
        // Duplicates.
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_no_context_takeover; CLIENT_NO_CONTEXT_TAKEOVER",
        "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
        "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
        // Values where none is allowed, or missing where one is required.
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover=\"\"",
        "permessage-deflate; server_max_window_bits",
        // Out of range, leading zeros, not a number.
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=08",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; client_max_window_bits=1a",
        "permessage-deflate; client_max_window_bits=",
        "permessage-deflate; client_max_window_bits=\"1\\0\"",
        "permessage-deflate; server_max_window_bits=1 0",
    ] {
        assert_eq!(shared(&[bad]), None, "{bad}");
    }
}

#[test]
fn the_first_acceptable_of_several_offers_is_taken() {
    let a = shared(&[
        "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=16, permessage-deflate; server_max_window_bits=12",
        "permessage-deflate; server_max_window_bits=9",
    ])
    .unwrap();
    assert_eq!(a.server_window_bits, 12);
    // Across header lines, in order.
    let a = shared(&[
        "permessage-deflate; bad",
        "PerMessage-Deflate ;  server_max_window_bits = 11 ",
    ])
    .unwrap();
    assert_eq!(a.server_window_bits, 11);
    // Other extensions alone, or nothing, agree to nothing.
    assert_eq!(shared(&["x-webkit-deflate-frame", "", " , ,"]), None);
    assert_eq!(shared(&[]), None);
}

#[test]
fn quotes_are_respected_when_splitting() {
    // A comma or semicolon inside a quoted value does not split.
    assert_eq!(shared(&["permessage-deflate; client_max_window_bits=\"1,5\""]), None);
    // An unclosed quote swallows the rest of its line.
    assert_eq!(shared(&["foo; a=\"x, permessage-deflate"]), None);
    assert!(shared(&["foo; a=\"x, y\", permessage-deflate"]).is_some());
}

#[test]
fn dedicated_keeps_context_unless_asked_not_to() {
    let d = |l: &str| negotiate([l.as_bytes()], Mode::Dedicated).unwrap();
    let a = d("permessage-deflate");
    assert!(!a.server_no_context_takeover && !a.client_no_context_takeover);
    assert_eq!(response(&a), "Sec-WebSocket-Extensions: permessage-deflate\r\n");
    let a = d("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    assert!(a.server_no_context_takeover && a.client_no_context_takeover);
    // zlib cannot compress with an 8-bit window: each message stands alone.
    let a = d("permessage-deflate; server_max_window_bits=8");
    assert!(a.server_no_context_takeover);
}

fn inflate(inf: &mut Inflater, input: &[u8], takeover: bool) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::new();
    inf.inflate(input, &mut out, 1 << 20, takeover).map(|()| out)
}

#[test]
fn rfc_7692_examples_inflate() {
    let mut inf = Inflater::default();
    // 7.2.3.1: "Hello" compressed.
    assert_eq!(
        inflate(&mut inf, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], true).unwrap(),
        b"Hello"
    );
    // 7.2.3.2: the same again, referring to the first's window.
    assert_eq!(
        inflate(&mut inf, &[0xf2, 0x00, 0x11, 0x00, 0x00], true).unwrap(),
        b"Hello"
    );
    let mut inf = Inflater::default();
    // 7.2.3.3: a stored block.
    let stored = [0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00];
    assert_eq!(inflate(&mut inf, &stored, false).unwrap(), b"Hello");
    // 7.2.3.4: BFINAL set.
    let last = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
    assert_eq!(inflate(&mut inf, &last, true).unwrap(), b"Hello");
    // 7.2.3.5: two blocks.
    let two = [
        0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
    ];
    assert_eq!(inflate(&mut inf, &two, false).unwrap(), b"Hello");
    // 7.2.3.6: an empty message.
    assert_eq!(inflate(&mut inf, &[0x00], false).unwrap(), b"");
}

#[test]
fn what_we_compress_matches_the_rfc_and_inflates_back() {
    let mut def = Deflater::new(6, 15);
    let mut out = Vec::new();
    def.compress(b"Hello", &mut out, false);
    assert_eq!(out, [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
    // With the window kept, the second is the RFC's 7.2.3.2.
    let mut def = Deflater::new(6, 15);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    def.compress(b"Hello", &mut a, true);
    def.compress(b"Hello", &mut b, true);
    assert_eq!(b, [0xf2, 0x00, 0x11, 0x00, 0x00]);
}

#[test]
fn inflating_stops_at_the_limit_exactly() {
    let body = vec![b'a'; 10_000];
    let mut packed = Vec::new();
    Deflater::new(6, 15).compress(&body, &mut packed, false);
    let mut inf = Inflater::default();
    let mut out = Vec::new();
    assert_eq!(inf.inflate(&packed, &mut out, 10_000, false), Ok(()));
    assert_eq!(out, body);
    let mut out = Vec::new();
    assert_eq!(inf.inflate(&packed, &mut out, 9_999, false), Err(InflateError::TooBig));
    assert!(out.capacity() <= 10_000 + 1024, "{}", out.capacity());
    // The decompressor is whole again after a refusal.
    let mut out = Vec::new();
    assert_eq!(inf.inflate(&packed, &mut out, 10_000, false), Ok(()));
}

#[test]
fn a_deflate_bomb_costs_the_limit_and_no_more() {
    // 64 MiB of zeros, compressed to about 64 KiB.
    let mut def = Deflater::new(9, 15);
    let zeros = vec![0u8; 1 << 20];
    let mut bomb = Vec::new();
    for i in 0..64 {
        if i > 0 {
            // One message: the flush points keep their empty blocks.
            bomb.extend_from_slice(&TAIL);
        }
        def.compress(&zeros, &mut bomb, true);
    }
    assert!(bomb.len() < 80 * 1024, "{}", bomb.len());
    let mut inf = Inflater::default();
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    assert_eq!(inf.inflate(&bomb, &mut out, 1 << 20, false), Err(InflateError::TooBig));
    assert!(out.capacity() <= (1 << 20) + 1024, "{}", out.capacity());
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

#[test]
fn nothing_may_follow_a_final_block_but_the_start_of_an_empty_one() {
    let mut inf = Inflater::default();
    // 7.2.3.4's final block alone, and with the 0x00 its example ends
    // with (an empty stored block's first octet: 7.2.1 has the sender
    // append one and take its last four off).
    let last = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    for trailer in [&[][..], &[0x00]] {
        let input = [&last[..], trailer].concat();
        assert_eq!(inflate(&mut inf, &input, false).unwrap(), b"Hello", "{trailer:?}");
    }
    // Anything else after it is refused, and the next message is fine.
    for trailer in [&[0x01][..], &[0x00, 0x00], &[1, 2, 3], &last] {
        let input = [&last[..], trailer].concat();
        assert_eq!(
            inflate(&mut inf, &input, false),
            Err(InflateError::Corrupt),
            "{trailer:?}"
        );
    }
    assert_eq!(inflate(&mut inf, &last, false).unwrap(), b"Hello");
}

#[test]
fn garbage_is_corrupt_not_a_panic() {
    let mut inf = Inflater::default();
    // Block type 3 is reserved (RFC 1951 3.2.3).
    assert_eq!(
        inflate(&mut inf, &[0xff, 0xff, 0xff], false),
        Err(InflateError::Corrupt)
    );
    // A stored block whose NLEN is not LEN's complement.
    assert_eq!(
        inflate(&mut inf, &[0x00, 0x05, 0x00, 0x00, 0x00, 1, 2, 3, 4, 5], false),
        Err(InflateError::Corrupt)
    );
    // And it inflates the next message afresh.
    assert_eq!(
        inflate(&mut inf, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], false).unwrap(),
        b"Hello"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn round_trip(
        messages in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..3000),
                proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'{'), Just(b'"')], 0..5000),
            ],
            1..5,
        ),
        bits in 9u8..=15,
        takeover in any::<bool>(),
        level in 0u32..=9,
    ) {
        let mut def = Deflater::new(level, bits);
        let mut inf = Inflater::default();
        for m in &messages {
            let mut packed = Vec::new();
            def.compress(m, &mut packed, takeover);
            let mut out = Vec::new();
            inf.inflate(&packed, &mut out, m.len(), takeover).unwrap();
            prop_assert_eq!(&out, m);
        }
    }

    #[test]
    fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..2000), limit in 0usize..5000) {
        let mut out = Vec::new();
        let _ = Inflater::default().inflate(&input, &mut out, limit, false);
        prop_assert!(out.len() <= limit + 1024);
    }

    #[test]
    fn arbitrary_headers_never_panic(lines in proptest::collection::vec(".{0,80}", 0..4)) {
        let _ = negotiate(lines.iter().map(|l| l.as_bytes()), Mode::Shared);
    }
}

#[test]
fn a_prefix_only_inflater_returns_the_start_of_each_message() {
    let body: Vec<u8> = (0..10_000u32)
        .map(|i| b"{\"id\":1,\"x\":\"yz\"},"[(i % 18) as usize])
        .collect();
    let mut packed = Vec::new();
    Deflater::new(6, 15).compress(&body, &mut packed, false);
    let mut inf = Inflater::prefix_only(256);
    for _ in 0..2 {
        let mut out = Vec::new();
        assert_eq!(inf.inflate(&packed, &mut out, 1 << 20, false), Ok(()));
        assert_eq!(out, &body[..256]);
    }
    // A message shorter than the prefix comes whole.
    let mut out = Vec::new();
    inf.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], &mut out, 1 << 20, false)
        .unwrap();
    assert_eq!(out, b"Hello");
}

/// The memory a compressor (of each window) and an inflater hold once
/// used, as docs/ARCHITECTURE.md gives it and `deflater_bytes` and
/// `INFLATER_BYTES` count it: `cargo test --lib context_memory --
/// --ignored --nocapture` (RSS grown by 200 of each, each having
/// compressed or inflated 256 KiB of varied text, which touches all of it).
#[test]
#[ignore]
fn context_memory() {
    fn rss_kib() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let message: Vec<u8> = (0..256 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"{\"id\":12,\"side\":\"buy\",\"px\":0.5}"[(x % 31) as usize]
        })
        .collect();
    for bits in 9..=MAX_WINDOW_BITS {
        let before = rss_kib();
        let deflaters: Vec<Deflater> = (0..200)
            .map(|_| {
                let mut d = Deflater::new(6, bits);
                d.compress(&message, &mut Vec::new(), true);
                d
            })
            .collect();
        let kib = (rss_kib() - before) / 200;
        println!(
            "compressor, window {bits}: {kib} KiB (counted: {} KiB)",
            deflater_bytes(bits) / 1024
        );
        assert!(kib * 1024 <= deflater_bytes(bits), "window {bits}");
        drop(deflaters);
    }
    let mut packed = Vec::new();
    Deflater::new(6, 15).compress(&message, &mut packed, false);
    let before = rss_kib();
    let inflaters: Vec<Inflater> = (0..200)
        .map(|_| {
            let mut i = Inflater::default();
            i.inflate(&packed, &mut Vec::new(), 1 << 20, true).unwrap();
            i
        })
        .collect();
    let kib = (rss_kib() - before) / 200;
    println!("inflater: {kib} KiB (counted: {} KiB)", INFLATER_BYTES / 1024);
    assert!(kib * 1024 <= INFLATER_BYTES);
    drop(inflaters);
}

/// What a message costs a compressor that keeps its window (context
/// takeover), hot in cache, as docs/ARCHITECTURE.md and docs/bench/README.md give it:
/// `cargo test --release --lib takeover_cost -- --ignored --nocapture`
/// (20,000 messages of 1 KiB of JSON-like text, 41 variants in turn, so
/// none has a twin in the window).
#[test]
#[ignore]
fn takeover_cost() {
    let variant = |n: u64| {
        let mut out = b"{\"items\":[".to_vec();
        let mut x = 0x2545_F491_4F6C_DD1Du64 ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        while out.len() < 1024 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let side = ["buy", "sell"][(x & 1) as usize];
            let (id, price, cents, qty) = ((x >> 8) % 1_000_000, (x >> 28) % 1000, (x >> 40) % 100, (x >> 48) % 500);
            out.extend_from_slice(
                format!("{{\"id\":{id},\"price\":{price}.{cents:02},\"qty\":{qty},\"side\":\"{side}\"}},").as_bytes(),
            );
        }
        out.truncate(1024);
        out
    };
    let messages: Vec<Vec<u8>> = (0..41).map(variant).collect();
    for level in [1, 6] {
        for bits in [10, 15] {
            let mut deflater = Deflater::new(level, bits);
            let (n, mut bytes, mut out) = (20_000, 0, Vec::new());
            let started = std::time::Instant::now();
            for i in 0..n {
                out.clear();
                deflater.compress(&messages[i % messages.len()], &mut out, true);
                bytes += out.len();
            }
            let us = started.elapsed().as_secs_f64() / n as f64 * 1e6;
            println!(
                "level {level}, window {bits}: {us:.1} µs a message, {} bytes",
                bytes / n
            );
        }
    }
}

/// With the context kept, an empty message straight after another is one
/// octet (the start of an empty stored block, RFC 7692 7.2.3.6), not
/// nothing: one inflater that keeps its window reads every message.
#[test]
fn an_empty_message_with_the_context_kept_is_an_empty_stored_block() {
    let mut deflater = Deflater::new(6, 15);
    let mut inflater = Inflater::default();
    for message in [&b"a"[..], b"", b"", b"b", b"", &[b'x'; 3000][..]] {
        let mut packed = Vec::new();
        deflater.compress(message, &mut packed, true);
        assert!(!packed.is_empty(), "{message:?}");
        let mut out = Vec::new();
        inflater.inflate(&packed, &mut out, 1 << 20, true).unwrap();
        assert_eq!(out, message);
    }
    let mut packed = Vec::new();
    deflater.compress(b"", &mut packed, true);
    assert_eq!(packed, [0x00]);
}
