//! Response framing, added headers, app mistakes, canned error and 100 Continue responses.

use super::*;

type Pairs = &'static [(&'static str, &'static str)];

const GET11: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
const GET10: &[u8] = b"GET / HTTP/1.0\r\n\r\n";
const GET10_KA: &[u8] = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
const HEAD11: &[u8] = b"HEAD / HTTP/1.1\r\n\r\n";
const HEAD10: &[u8] = b"HEAD / HTTP/1.0\r\n\r\n";
const CLOSE11: &[u8] = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";

/// Runs one full exchange and returns the wire bytes (Date normalized), the framing and the
/// keep-alive verdict.
fn respond(
    request: &[u8],
    status: &str,
    app_headers: &[(&str, &str)],
    hint: Option<u64>,
    body: &[&[u8]],
) -> (String, ResponseFraming, bool) {
    let mut conn = conn_with(Limits::default(), request);
    assert!(matches!(drain_events(&mut conn).last(), Some(Ev::Paused)));
    let mut out = Vec::new();
    let framing = conn
        .start_response(status, &headers(app_headers), hint, &mut out)
        .unwrap();
    for chunk in body {
        conn.write_body(chunk, &mut out);
    }
    conn.finish_response(&mut out);
    (normalize_date(&out), framing, conn.keep_alive())
}

#[test]
fn framing_table() {
    use ResponseFraming::*;
    type Row = (
        &'static str,
        &'static [u8],
        &'static str,
        Pairs,
        Option<u64>,
        &'static [&'static [u8]],
        &'static str,
        ResponseFraming,
        bool,
    );
    let ds = "Date: *\r\nServer: uringserve\r\n";
    #[rustfmt::skip]
    let table: &[Row] = &[
        (
            "single known chunk → computed Content-Length",
            GET11, "200 OK", &[("Content-Type", "text/plain")], Some(5), &[b"hello"],
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{ds}Content-Length: 5\r\n\r\nhello",
            ContentLength(5), true,
        ),
        (
            "app Content-Length wins over the hint",
            GET11, "200 OK", &[("content-length", "5")], Some(7), &[b"he", b"llo"],
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n{ds}\r\nhello",
            ContentLength(5), true,
        ),
        (
            "unknown length on 1.1 → chunked",
            GET11, "200 OK", &[], None, &[b"hello", b"", b" world!"],
            "HTTP/1.1 200 OK\r\n{ds}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n",
            Chunked, true,
        ),
        (
            "chunk sizes are hex",
            GET11, "200 OK", &[], None, &[b"0123456789abcdefXYZ"],
            "HTTP/1.1 200 OK\r\n{ds}Transfer-Encoding: chunked\r\n\r\n13\r\n0123456789abcdefXYZ\r\n0\r\n\r\n",
            Chunked, true,
        ),
        (
            "empty chunked body",
            GET11, "200 OK", &[], None, &[],
            "HTTP/1.1 200 OK\r\n{ds}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Chunked, true,
        ),
        (
            "app's Transfer-Encoding: chunked is replaced by ours",
            GET11, "200 OK", &[("Transfer-Encoding", "Chunked")], Some(2), &[b"hi"],
            "HTTP/1.1 200 OK\r\n{ds}Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            Chunked, true,
        ),
        (
            "unknown length on 1.0 → close-delimited",
            GET10, "200 OK", &[], None, &[b"hello"],
            "HTTP/1.1 200 OK\r\n{ds}Connection: close\r\n\r\nhello",
            CloseDelimited, false,
        ),
        (
            "1.0 with a length still closes without keep-alive",
            GET10, "200 OK", &[], Some(5), &[b"hello"],
            "HTTP/1.1 200 OK\r\n{ds}Content-Length: 5\r\nConnection: close\r\n\r\nhello",
            ContentLength(5), false,
        ),
        (
            "1.0 keep-alive with a length",
            GET10_KA, "200 OK", &[], Some(5), &[b"hello"],
            "HTTP/1.1 200 OK\r\n{ds}Content-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
            ContentLength(5), true,
        ),
        (
            "1.0 keep-alive without a length must close",
            GET10_KA, "200 OK", &[], None, &[b"hello"],
            "HTTP/1.1 200 OK\r\n{ds}Connection: close\r\n\r\nhello",
            CloseDelimited, false,
        ),
        (
            "HEAD keeps the computed Content-Length, sends no body",
            HEAD11, "200 OK", &[], Some(5), &[b"hello"],
            "HTTP/1.1 200 OK\r\n{ds}Content-Length: 5\r\n\r\n",
            NoBody, true,
        ),
        (
            "HEAD keeps the app's Content-Length",
            HEAD11, "200 OK", &[("Content-Length", "1234")], None, &[b"ignored"],
            "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n{ds}\r\n",
            NoBody, true,
        ),
        (
            "HEAD of unknown length says what GET would",
            HEAD11, "200 OK", &[], None, &[b"ignored"],
            "HTTP/1.1 200 OK\r\n{ds}Transfer-Encoding: chunked\r\n\r\n",
            NoBody, true,
        ),
        (
            "HEAD on 1.0 of unknown length",
            HEAD10, "200 OK", &[], None, &[],
            "HTTP/1.1 200 OK\r\n{ds}Connection: close\r\n\r\n",
            NoBody, false,
        ),
        (
            "204: no body, no framing headers, app's Content-Length dropped",
            GET11, "204 No Content", &[("Content-Length", "0"), ("X-A", "b")], Some(0), &[b"ignored"],
            "HTTP/1.1 204 No Content\r\nX-A: b\r\n{ds}\r\n",
            NoBody, true,
        ),
        (
            "304 keeps the app's Content-Length but sends no body",
            GET11, "304 Not Modified", &[("Content-Length", "42"), ("ETag", "\"x\"")], None, &[b"ignored"],
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nETag: \"x\"\r\n{ds}\r\n",
            NoBody, true,
        ),
        (
            "304 without headers adds no framing",
            GET11, "304 Not Modified", &[], Some(10), &[],
            "HTTP/1.1 304 Not Modified\r\n{ds}\r\n",
            NoBody, true,
        ),
        (
            "1xx as a final status: no body, and the connection closes",
            GET11, "103 Early Hints", &[], None, &[b"x"],
            "HTTP/1.1 103 Early Hints\r\n{ds}Connection: close\r\n\r\n",
            NoBody, false,
        ),
        (
            "app Date and Server are kept, case-insensitively, never duplicated",
            GET11, "200 OK", &[("date", "Sun, 06 Nov 1994 08:49:37 GMT"), ("SERVER", "app")], Some(0), &[],
            "HTTP/1.1 200 OK\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\nSERVER: app\r\nContent-Length: 0\r\n\r\n",
            ContentLength(0), true,
        ),
        (
            "client asked to close",
            CLOSE11, "200 OK", &[], Some(2), &[b"ok"],
            "HTTP/1.1 200 OK\r\n{ds}Content-Length: 2\r\nConnection: close\r\n\r\nok",
            ContentLength(2), false,
        ),
        (
            "app asked to close; its Connection header is replaced by ours",
            GET11, "200 OK", &[("Connection", "Close")], Some(2), &[b"ok"],
            "HTTP/1.1 200 OK\r\n{ds}Content-Length: 2\r\nConnection: close\r\n\r\nok",
            ContentLength(2), false,
        ),
        (
            "app's Connection: keep-alive is not echoed on 1.1",
            GET11, "200 OK", &[("Connection", "keep-alive")], Some(2), &[b"ok"],
            "HTTP/1.1 200 OK\r\n{ds}Content-Length: 2\r\n\r\nok",
            ContentLength(2), true,
        ),
        (
            "bytes past the app's Content-Length are dropped",
            GET11, "200 OK", &[("Content-Length", "3")], None, &[b"ab", b"cdef"],
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n{ds}\r\nabc",
            ContentLength(3), true,
        ),
        (
            "a body shorter than Content-Length forces close",
            GET11, "200 OK", &[("Content-Length", "3")], None, &[b"ab"],
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n{ds}\r\nab",
            ContentLength(3), false,
        ),
        (
            "status without reason phrase still has its space",
            GET11, "200", &[], Some(0), &[],
            "HTTP/1.1 200 \r\n{ds}Content-Length: 0\r\n\r\n",
            ContentLength(0), true,
        ),
        (
            "custom status and reason pass through",
            GET11, "299 Fine Thanks", &[], Some(0), &[],
            "HTTP/1.1 299 Fine Thanks\r\n{ds}Content-Length: 0\r\n\r\n",
            ContentLength(0), true,
        ),
    ];
    for &(label, request, status, app_headers, hint, body, want, framing, keep_alive) in table {
        let want = want.replace("{ds}", ds);
        assert_eq!(
            respond(request, status, app_headers, hint, body),
            (want, framing, keep_alive),
            "{label}"
        );
    }
}

#[test]
fn non_ascii_header_values_pass_as_bytes() {
    let mut conn = conn_with(Limits::default(), GET11);
    drain_events(&mut conn);
    let mut out = Vec::new();
    let app: [(&[u8], &[u8]); 1] = [(b"X-Latin", b"caf\xe9")];
    conn.start_response("200 OK", &app, Some(0), &mut out)
        .unwrap();
    assert!(out.windows(14).any(|w| w == b"X-Latin: caf\xe9\r"));
}

#[test]
fn application_mistakes_are_500_and_write_nothing() {
    let table: &[(&str, &str, Pairs)] = &[
        ("empty status", "", &[]),
        ("short status", "20", &[]),
        ("non-numeric status", "2x0 OK", &[]),
        ("leading zero", "099 Odd", &[]),
        ("no space after code", "200OK", &[]),
        ("CRLF in status", "200 OK\r\nX-Injected: 1", &[]),
        (
            "CRLF in value",
            "200 OK",
            &[("X-A", "a\r\nSet-Cookie: x=1")],
        ),
        ("LF in value", "200 OK", &[("X-A", "a\nb")]),
        ("NUL in value", "200 OK", &[("X-A", "a\0b")]),
        ("space in name", "200 OK", &[("X A", "b")]),
        ("colon in name", "200 OK", &[("X:A", "b")]),
        ("empty name", "200 OK", &[("", "b")]),
        (
            "invalid Content-Length",
            "200 OK",
            &[("Content-Length", "five")],
        ),
        (
            "conflicting Content-Length",
            "200 OK",
            &[("Content-Length", "5"), ("Content-Length", "6")],
        ),
        (
            "Transfer-Encoding gzip",
            "200 OK",
            &[("Transfer-Encoding", "gzip")],
        ),
        (
            "Content-Length with chunked",
            "200 OK",
            &[("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        ),
    ];
    for &(label, status, app_headers) in table {
        let mut conn = conn_with(Limits::default(), GET11);
        drain_events(&mut conn);
        let mut out = Vec::new();
        let err = conn
            .start_response(status, &headers(app_headers), None, &mut out)
            .unwrap_err();
        assert_eq!((err.status, out.len()), (500, 0), "{label}");
        // The app can still be answered with a 500.
        assert!(conn.send_error(500, &mut out), "{label}");
        assert!(
            out.starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"),
            "{label}"
        );
    }
}

#[test]
fn response_calls_out_of_order_are_refused() {
    let mut out = Vec::new();
    let mut conn = Connection::new(Limits::default());
    assert_eq!(
        conn.start_response("200 OK", &headers(&[]), None, &mut out)
            .map_err(|e| e.status),
        Err(500)
    );
    conn.receive(GET11);
    drain_events(&mut conn);
    conn.start_response("200 OK", &headers(&[]), Some(0), &mut out)
        .unwrap();
    let written = out.len();
    assert_eq!(
        conn.start_response("200 OK", &headers(&[]), None, &mut out)
            .map_err(|e| e.status),
        Err(500)
    );
    assert!(
        !conn.send_error(500, &mut out),
        "no error response once a head is out"
    );
    assert_eq!(out.len(), written);
    assert!(!conn.keep_alive());
}

#[test]
fn canned_error_responses() {
    let table: &[(u16, &str)] = &[
        (400, "400 Bad Request"),
        (413, "413 Content Too Large"),
        (431, "431 Request Header Fields Too Large"),
        (500, "500 Internal Server Error"),
        (503, "503 Service Unavailable"),
    ];
    for &(status, line) in table {
        let reason = &line[4..];
        let want = format!(
            "HTTP/1.1 {line}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\nDate: *\r\nServer: uringserve\r\n\r\n{reason}\n",
            reason.len() + 1
        );
        let mut out = Vec::new();
        write_error_response(status, &mut out);
        assert_eq!(normalize_date(&out), want, "{status}");

        // The connection's version also works before any request parsed and marks closing.
        let mut conn = conn_with(Limits::default(), b"GET / HTTP/1.1\r\n\r\n");
        let mut via_conn = Vec::new();
        assert!(conn.send_error(status, &mut via_conn));
        assert_eq!(normalize_date(&via_conn), want);
        assert!(!conn.keep_alive());
    }
    assert_eq!(reason_phrase(418), "Client Error");
    assert_eq!(reason_phrase(599), "Server Error");
}

#[test]
fn error_response_to_head_has_no_body() {
    let mut conn = conn_with(Limits::default(), HEAD11);
    drain_events(&mut conn);
    let mut out = Vec::new();
    assert!(conn.send_error(500, &mut out));
    assert!(normalize_date(&out).ends_with(
        "Content-Length: 22\r\nConnection: close\r\nDate: *\r\nServer: uringserve\r\n\r\n"
    ));
}

#[test]
fn continue_is_written_only_when_useful() {
    let mut out = Vec::new();
    write_continue(&mut out);
    assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");

    let expecting: &[u8] = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
    let mut conn = conn_with(Limits::default(), expecting);
    assert!(matches!(owned(conn.next_event()), Ev::Req(r) if r.expect_continue));
    let mut out = Vec::new();
    assert!(conn.send_continue(&mut out));
    assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
    assert!(!conn.send_continue(&mut out), "only once");
    assert_eq!(out.len(), 25);

    let without: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n";
    let body_already_here: &[u8] =
        b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc";
    let no_body: &[u8] = b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n";
    for input in [without, no_body] {
        let mut conn = conn_with(Limits::default(), input);
        conn.next_event();
        assert!(!conn.send_continue(&mut out));
    }
    let mut conn = conn_with(Limits::default(), body_already_here);
    drain_events(&mut conn);
    assert!(!conn.send_continue(&mut out));
    assert_eq!(out.len(), 25);
}

#[test]
fn final_response_without_continue_closes_when_body_is_pending() {
    let expecting: &[u8] = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
    let mut conn = conn_with(Limits::default(), expecting);
    conn.next_event();
    let mut out = Vec::new();
    conn.start_response("417 Expectation Failed", &headers(&[]), Some(0), &mut out)
        .unwrap();
    assert!(normalize_date(&out).ends_with("Content-Length: 0\r\nConnection: close\r\n\r\n"));
    conn.finish_response(&mut out);
    assert!(!conn.keep_alive());
    assert!(!conn.start_next_cycle());

    // After 100 Continue the client sends the body, so keep-alive survives.
    let mut conn = conn_with(Limits::default(), expecting);
    conn.next_event();
    let mut out = Vec::new();
    assert!(conn.send_continue(&mut out));
    conn.receive(b"abc");
    assert_eq!(
        drain_events(&mut conn),
        [Ev::Data(b"abc".to_vec()), Ev::End, Ev::Paused]
    );
    conn.start_response("200 OK", &headers(&[]), Some(0), &mut out)
        .unwrap();
    conn.finish_response(&mut out);
    assert!(conn.start_next_cycle());
}

#[test]
fn body_sent_counts_the_body_as_the_app_gave_it() {
    let sent = |request: &[u8], app_headers: &[(&str, &str)], body: &[&[u8]]| {
        let mut conn = conn_with(Limits::default(), request);
        drain_events(&mut conn);
        let mut out = Vec::new();
        conn.start_response("200 OK", &headers(app_headers), None, &mut out)
            .unwrap();
        for chunk in body {
            conn.write_body(chunk, &mut out);
        }
        conn.finish_response(&mut out);
        conn.body_sent()
    };
    // Chunk framing is not counted; bytes past Content-Length are dropped, so not sent.
    assert_eq!(sent(GET11, &[], &[b"hello", b" world"]), 11);
    assert_eq!(sent(GET11, &[("Content-Length", "3")], &[b"hello"]), 3);
    assert_eq!(sent(HEAD11, &[("Content-Length", "5")], &[b"hello"]), 0);
    let mut conn = conn_with(Limits::default(), GET11);
    drain_events(&mut conn);
    let mut out = Vec::new();
    conn.send_error(404, &mut out);
    assert_eq!(conn.body_sent(), "Not Found\n".len() as u64);
}
