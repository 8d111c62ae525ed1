//! Whole cycles: pipelining, the keep-alive decision, draining unread bodies, buffer reuse.

use super::*;

/// Answers the current request with a small fixed-length response.
fn answer(conn: &mut Connection, out: &mut Vec<u8>) {
    conn.start_response("200 OK", &headers(&[]), Some(2), out)
        .unwrap();
    conn.write_body(b"ok", out);
    conn.finish_response(out);
}

#[test]
fn pipelined_requests_are_served_in_order() {
    let input: &[u8] = b"GET /1 HTTP/1.1\r\n\r\n\
        POST /2 HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody\
        POST /3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n\
        GET /4 HTTP/1.1\r\n\r\n\
        GET /5 HT";
    let mut conn = conn_with(Limits::default(), input);
    let mut out = Vec::new();
    let mut seen = Vec::new();
    loop {
        let events = drain_events(&mut conn);
        if events == [Ev::NeedData] {
            break;
        }
        let [Ev::Req(req), rest @ ..] = events.as_slice() else {
            panic!("{events:?}")
        };
        let body: Vec<u8> = rest
            .iter()
            .filter_map(|e| {
                if let Ev::Data(d) = e {
                    Some(d.clone())
                } else {
                    None
                }
            })
            .flatten()
            .collect();
        assert_eq!(rest.last(), Some(&Ev::Paused));
        seen.push((req.raw_path.clone(), body));
        answer(&mut conn, &mut out);
        assert!(conn.start_next_cycle());
    }
    let want: Vec<(String, Vec<u8>)> = vec![
        ("/1".into(), vec![]),
        ("/2".into(), b"body".to_vec()),
        ("/3".into(), b"ab".to_vec()),
        ("/4".into(), vec![]),
    ];
    assert_eq!(seen, want);
    assert_eq!(conn.buffered(), b"GET /5 HT".len());
    assert_eq!(
        out.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count(),
        4
    );
    conn.receive(b"TP/1.1\r\n\r\n");
    assert!(matches!(owned(conn.next_event()), Ev::Req(r) if r.raw_path == "/5"));
}

#[test]
fn the_next_request_waits_for_the_cycle() {
    let mut conn = conn_with(
        Limits::default(),
        b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
    );
    assert!(matches!(owned(conn.next_event()), Ev::Req(r) if r.raw_path == "/a"));
    assert_eq!(owned(conn.next_event()), Ev::End);
    assert_eq!(owned(conn.next_event()), Ev::Paused);
    assert_eq!(owned(conn.next_event()), Ev::Paused);
    assert!(!conn.start_next_cycle(), "no response yet");
}

/// How a cycle ends, for the keep-alive table.
#[derive(Clone, Copy, Debug)]
enum Finish {
    /// Read the whole body, answer with a fixed length.
    Normal,
    /// Answer without reading the body, then drain with this bound.
    UnreadThenDrain(u64),
    /// Answer with an unknown length (chunked on 1.1, close-delimited on 1.0).
    UnknownLength,
}

#[test]
fn keep_alive_decision() {
    use Finish::*;
    let table: &[(&str, &[u8], Finish, bool)] = &[
        ("1.1 default", b"GET / HTTP/1.1\r\n\r\n", Normal, true),
        ("1.1 close", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", Normal, false),
        ("1.0 default", b"GET / HTTP/1.0\r\n\r\n", Normal, false),
        ("1.0 keep-alive", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", Normal, true),
        ("1.1 chunked response", b"GET / HTTP/1.1\r\n\r\n", UnknownLength, true),
        ("1.0 close-delimited", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", UnknownLength, false),
        ("unread small body drained", b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", UnreadThenDrain(5), true),
        ("unread body over the bound", b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", UnreadThenDrain(4), false),
        (
            "large Content-Length abandoned upfront",
            b"POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n",
            UnreadThenDrain(65536),
            false,
        ),
        (
            "unread chunked body drained",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            UnreadThenDrain(5),
            true,
        ),
        (
            "unread chunked body over the bound",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n",
            UnreadThenDrain(5),
            false,
        ),
        (
            "unread body with a framing error",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX",
            UnreadThenDrain(100),
            false,
        ),
    ];
    for &(label, input, finish, want) in table {
        let mut conn = conn_with(Limits::default(), input);
        let mut out = Vec::new();
        match finish {
            Normal => {
                drain_events(&mut conn);
                answer(&mut conn, &mut out);
            }
            UnknownLength => {
                drain_events(&mut conn);
                conn.start_response("200 OK", &headers(&[]), None, &mut out)
                    .unwrap();
                conn.write_body(b"x", &mut out);
                conn.finish_response(&mut out);
            }
            UnreadThenDrain(max) => {
                assert!(matches!(owned(conn.next_event()), Ev::Req(_)), "{label}");
                answer(&mut conn, &mut out);
                assert!(!conn.body_fully_received(), "{label}");
                let drained = conn.drain_body(max);
                assert_eq!(drained == Drain::Complete, want, "{label}: {drained:?}");
            }
        }
        assert_eq!(conn.keep_alive(), want, "{label}");
        assert_eq!(conn.start_next_cycle(), want, "{label}");
    }
}

#[test]
fn drain_waits_for_more_input_within_the_bound() {
    let mut conn = conn_with(
        Limits::default(),
        b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc",
    );
    conn.next_event();
    let mut out = Vec::new();
    answer(&mut conn, &mut out);
    assert!(!conn.start_next_cycle(), "refused while the body is unread");

    let mut conn = conn_with(
        Limits::default(),
        b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc",
    );
    conn.next_event();
    answer(&mut conn, &mut out);
    assert_eq!(conn.drain_body(10), Drain::NeedData);
    assert!(conn.keep_alive());
    conn.receive(b"defGET /next HTTP/1.1\r\n\r\n");
    assert_eq!(conn.drain_body(10), Drain::Complete);
    assert!(conn.body_fully_received());
    assert!(conn.start_next_cycle());
    assert!(matches!(owned(conn.next_event()), Ev::Req(r) if r.raw_path == "/next"));

    // EOF before the rest arrives.
    let mut conn = conn_with(
        Limits::default(),
        b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc",
    );
    conn.next_event();
    answer(&mut conn, &mut out);
    conn.receive_eof();
    assert_eq!(conn.drain_body(10), Drain::Abandon);
    assert!(!conn.start_next_cycle());
}

#[test]
fn partly_read_body_counts_only_what_is_drained() {
    let mut conn = conn_with(
        Limits::default(),
        b"POST / HTTP/1.1\r\nContent-Length: 8\r\n\r\nabcd",
    );
    assert!(matches!(owned(conn.next_event()), Ev::Req(_)));
    assert_eq!(owned(conn.next_event()), Ev::Data(b"abcd".to_vec()));
    let mut out = Vec::new();
    answer(&mut conn, &mut out);
    conn.receive(b"efgh");
    assert_eq!(conn.drain_body(4), Drain::Complete);
    assert!(conn.start_next_cycle());
}

#[test]
fn input_buffer_is_reused_across_cycles() {
    let request: &[u8] = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789";
    let mut conn = Connection::new(Limits::default());
    let mut out = Vec::with_capacity(256);
    let mut capacity_after_warmup = None;
    for round in 0..2000 {
        // Two requests per read, split mid-request, so leftovers must be carried over.
        let mut chunk = request.to_vec();
        chunk.extend_from_slice(request);
        let (a, b) = chunk.split_at(request.len() + 7 + round % 20);
        for part in [a, b] {
            conn.receive(part);
            loop {
                match conn.next_event() {
                    Event::Request(_) | Event::Data(_) => {}
                    Event::EndOfMessage => {}
                    Event::Paused => {
                        out.clear();
                        answer(&mut conn, &mut out);
                        assert!(conn.start_next_cycle());
                    }
                    Event::NeedData => break,
                    other => panic!("{other:?}"),
                }
            }
        }
        if round == 100 {
            capacity_after_warmup = Some(conn.buf_capacity_for_tests());
        }
    }
    assert_eq!(conn.buffered(), 0);
    assert_eq!(Some(conn.buf_capacity_for_tests()), capacity_after_warmup);
}

#[test]
fn at_rest_only_between_requests_and_reuse_makes_it_fresh() {
    let mut conn = Connection::new(Limits::default());
    assert!(conn.at_rest());
    conn.receive(b"GET / HTTP/1.0\r\n\r\nGET /next HT");
    assert!(!conn.at_rest(), "bytes received");
    assert!(matches!(conn.next_event(), Event::Request(_)));
    assert!(matches!(conn.next_event(), Event::EndOfMessage));
    let mut out = Vec::new();
    answer(&mut conn, &mut out);
    // HTTP/1.0 without keep-alive: this connection is over, never at rest again.
    assert!(!conn.start_next_cycle());
    assert!(!conn.at_rest());
    let kept = conn.buf_capacity_for_tests();
    conn.reuse(kept);
    assert!(conn.at_rest());
    assert_eq!(
        conn.buf_capacity_for_tests(),
        kept,
        "the allocation is kept"
    );
    assert_eq!(conn.next_event(), Event::NeedData);
    // The next peer's HTTP/1.1 request is served as on a new connection.
    conn.receive(b"GET / HTTP/1.1\r\n\r\n");
    assert!(matches!(conn.next_event(), Event::Request(_)));
    assert!(matches!(conn.next_event(), Event::EndOfMessage));
    out.clear();
    answer(&mut conn, &mut out);
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(conn.start_next_cycle());
    assert!(conn.at_rest());
    conn.receive_eof();
    assert!(!conn.at_rest(), "input ended");
    conn.reuse(0);
    assert!(conn.at_rest());
    assert_eq!(
        conn.buf_capacity_for_tests(),
        0,
        "a larger buffer is let go"
    );
}

/// Not a benchmark harness, just a sanity number: `cargo test --release --lib http:: -- --ignored --nocapture`.
#[test]
#[ignore]
fn parse_and_respond_throughput() {
    let request: &[u8] = b"GET /plaintext?x=1 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: bench/1.0\r\n\
        Accept: text/plain,text/html;q=0.9\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\r\n";
    let n = 200_000;
    let mut conn = Connection::new(Limits::default());
    let mut out = Vec::with_capacity(4096);
    let started = std::time::Instant::now();
    for _ in 0..n {
        conn.receive(request);
        let Event::Request(req) = conn.next_event() else {
            panic!()
        };
        std::hint::black_box(&req);
        assert_eq!(conn.next_event(), Event::EndOfMessage);
        out.clear();
        conn.start_response(
            "200 OK",
            &[("Content-Type", "text/plain")],
            Some(13),
            &mut out,
        )
        .unwrap();
        conn.write_body(b"Hello, World!", &mut out);
        conn.finish_response(&mut out);
        assert!(conn.start_next_cycle());
    }
    let per = started.elapsed() / n;
    println!("{per:?} per request/response cycle");
}

#[test]
fn refusing_keep_alive_closes_after_the_current_response_and_later_ones() {
    let mut conn = conn_with(Limits::default(), b"GET /1 HTTP/1.1\r\n\r\n");
    assert!(!conn.is_idle(), "a request is buffered");
    let mut out = Vec::new();
    assert!(matches!(owned(conn.next_event()), Ev::Req(_)));
    conn.refuse_keep_alive();
    answer(&mut conn, &mut out);
    assert!(out.windows(17).any(|w| w == b"Connection: close"));
    assert!(!conn.start_next_cycle());

    // Refused before the first request: that request (keep-alive by default) is the last one.
    let mut conn = Connection::new(Limits::default());
    assert!(!conn.is_idle(), "its first request may be on its way");
    conn.refuse_keep_alive();
    conn.receive(b"GET /2 HTTP/1.1\r\n\r\n");
    assert!(!conn.is_idle());
    assert!(matches!(owned(conn.next_event()), Ev::Req(_)));
    let mut out = Vec::new();
    answer(&mut conn, &mut out);
    assert!(out.windows(17).any(|w| w == b"Connection: close"));
    assert!(!conn.start_next_cycle());
}

#[test]
fn idle_only_between_requests_with_nothing_received() {
    let mut conn = conn_with(Limits::default(), b"GET /1 HTTP/1.1\r\n\r\n");
    assert!(matches!(owned(conn.next_event()), Ev::Req(_)));
    assert!(!conn.is_idle(), "the request is being answered");
    let mut out = Vec::new();
    let _ = drain_events(&mut conn);
    answer(&mut conn, &mut out);
    assert!(conn.start_next_cycle());
    assert!(conn.is_idle());
    conn.receive(b"GET /2 HTT");
    assert!(!conn.is_idle(), "half a request head is in flight");
}
