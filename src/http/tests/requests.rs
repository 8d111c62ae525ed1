//! Request heads: accepted forms, refusals (400/413/431), partial input, keep-alive, Expect.

use super::*;

#[test]
fn request_lines_and_targets() {
    // input → (method, target, raw_path, decoded path, query, version)
    type Row = (
        &'static [u8],
        &'static str,
        &'static str,
        &'static str,
        &'static [u8],
        &'static str,
        Version,
    );
    use Version::{Http10 as V10, Http11 as V11};
    #[rustfmt::skip]
    let table: &[Row] = &[
        (b"GET / HTTP/1.1\r\n\r\n", "GET", "/", "/", b"/", "", V11),
        (b"GET /a/b?x=1&y=%20 HTTP/1.1\r\n\r\n", "GET", "/a/b?x=1&y=%20", "/a/b", b"/a/b", "x=1&y=%20", V11),
        (b"GET /a?b?c HTTP/1.0\r\n\r\n", "GET", "/a?b?c", "/a", b"/a", "b?c", V10),
        (b"GET /a%2Fb%zz%41 HTTP/1.1\r\n\r\n", "GET", "/a%2Fb%zz%41", "/a%2Fb%zz%41", b"/a/b%zzA", "", V11),
        (b"GET /caf%C3%A9 HTTP/1.1\r\n\r\n", "GET", "/caf%C3%A9", "/caf%C3%A9", "/caf\u{e9}".as_bytes(), "", V11),
        (b"GET /%FF HTTP/1.1\r\n\r\n", "GET", "/%FF", "/%FF", b"/\xff", "", V11),
        (b"GET /a+b%2B HTTP/1.1\r\n\r\n", "GET", "/a+b%2B", "/a+b%2B", b"/a+b+", "", V11),
        (
            b"GET http://example.com:8080/p/q?s=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "GET", "http://example.com:8080/p/q?s=1", "/p/q", b"/p/q", "s=1", V11,
        ),
        (b"GET http://example.com HTTP/1.1\r\n\r\n", "GET", "http://example.com", "/", b"/", "", V11),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", "OPTIONS", "*", "*", b"*", "", V11),
        (b"PURGE /x HTTP/1.1\r\n\r\n", "PURGE", "/x", "/x", b"/x", "", V11),
        (b"\r\n\r\nGET /after-blank-lines HTTP/1.1\r\n\r\n", "GET", "/after-blank-lines", "/after-blank-lines", b"/after-blank-lines", "", V11),
    ];
    for &(input, method, target, raw_path, path, query, version) in table {
        let req =
            parse(input).unwrap_or_else(|s| panic!("{s} for {:?}", String::from_utf8_lossy(input)));
        assert_eq!(
            (
                req.method.as_str(),
                req.target.as_str(),
                req.raw_path.as_str(),
                req.path.as_slice(),
                req.query.as_str(),
                req.version
            ),
            (method, target, raw_path, path, query, version),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn headers_keep_order_case_and_raw_bytes() {
    let mut conn = conn_with(
        Limits::default(),
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Dup: 1\r\nx-dup: 2\r\nX-Empty:\r\nX-Latin: caf\xe9 \t\r\n\r\n",
    );
    let Event::Request(req) = conn.next_event() else {
        panic!("no request")
    };
    let names: Vec<(&str, &[u8])> = req.headers().collect();
    assert_eq!(
        names,
        [
            ("Host", &b"a"[..]),
            ("X-Dup", b"1"),
            ("x-dup", b"2"),
            ("X-Empty", b""),
            ("X-Latin", b"caf\xe9")
        ]
    );
    assert_eq!(req.header("HOST"), Some(&b"a"[..]));
    assert_eq!(req.header("x-DUP"), Some(&b"1"[..]));
    assert_eq!(req.header("missing"), None);
}

#[test]
fn malformed_requests_are_400() {
    let table: &[(&str, &[u8])] = &[
        ("no version", b"GET /\r\n\r\n"),
        ("unknown version 1.2", b"GET / HTTP/1.2\r\n\r\n"),
        ("unknown version 2.0", b"GET / HTTP/2.0\r\n\r\n"),
        ("version 0.9 style", b"GET / HTTP/0.9\r\n\r\n"),
        ("lowercase protocol", b"GET / http/1.1\r\n\r\n"),
        ("double space", b"GET  / HTTP/1.1\r\n\r\n"),
        ("trailing space", b"GET / HTTP/1.1 \r\n\r\n"),
        ("space in target", b"GET /a b HTTP/1.1\r\n\r\n"),
        ("control in target", b"GET /a\x01b HTTP/1.1\r\n\r\n"),
        ("invalid UTF-8 in target", b"GET /\xff HTTP/1.1\r\n\r\n"),
        ("empty method", b" / HTTP/1.1\r\n\r\n"),
        ("bad method char", b"G(T / HTTP/1.1\r\n\r\n"),
        ("asterisk on GET", b"GET * HTTP/1.1\r\n\r\n"),
        (
            "authority-form",
            b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
        ),
        ("relative target", b"GET index.html HTTP/1.1\r\n\r\n"),
        ("bare LF request line", b"GET / HTTP/1.1\n\r\n"),
        ("bare LF everywhere", b"GET / HTTP/1.1\nHost: a\n\n"),
        ("bare LF after header", b"GET / HTTP/1.1\r\nHost: a\n\r\n"),
        ("bare LF end of head", b"GET / HTTP/1.1\r\nHost: a\r\n\n"),
        ("leading bare LF", b"\nGET / HTTP/1.1\r\n\r\n"),
        ("bare CR in header", b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n"),
        ("CR CR LF", b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n"),
        ("obs-fold space", b"GET / HTTP/1.1\r\nX-A: 1\r\n 2\r\n\r\n"),
        ("obs-fold tab", b"GET / HTTP/1.1\r\nX-A: 1\r\n\t2\r\n\r\n"),
        (
            "whitespace before first header",
            b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
        ),
        ("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
        ("no colon", b"GET / HTTP/1.1\r\nHost\r\n\r\n"),
        ("empty name", b"GET / HTTP/1.1\r\n: a\r\n\r\n"),
        ("bad name char", b"GET / HTTP/1.1\r\nX(A): a\r\n\r\n"),
        ("non-ASCII name", b"GET / HTTP/1.1\r\nX\xe9: a\r\n\r\n"),
        ("NUL in value", b"GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n"),
        (
            "CL and TE",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "TE and CL",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        ),
        (
            "CL disagree",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        ),
        (
            "CL list disagree",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
        ),
        (
            "CL non-numeric",
            b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        ),
        (
            "CL negative",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ),
        (
            "CL plus sign",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        ),
        ("CL hex", b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n"),
        ("CL empty", b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n"),
        (
            "CL overflow",
            b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n",
        ),
        (
            "CL huge overflow",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
        ),
        (
            "TE gzip",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        (
            "TE gzip, chunked",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        ),
        (
            "TE chunked, chunked",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        ),
        (
            "TE twice",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "TE identity",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
        ),
        ("TE empty", b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n"),
        (
            "TE chunked on HTTP/1.0",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
    ];
    for &(label, input) in table {
        assert_eq!(parse(input).map(|r| r.method), Err(400), "{label}");
    }
}

#[test]
fn refusals_name_the_problem_for_logs() {
    let table: &[(&[u8], &str)] = &[
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare LF line ending"),
        (
            b"GET / HTTP/1.1\r\nX-A: 1\r\n 2\r\n\r\n",
            "obsolete line folding",
        ),
        (b"GET / HTTP/1.1\r\nX(A): a\r\n\r\n", "invalid header name"),
        (
            b"GET / HTTP/1.1\r\nX-A: \x01\r\n\r\n",
            "invalid header value",
        ),
        (b"GET / HTTP/3.0\r\n\r\n", "unsupported HTTP version"),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "conflicting Content-Length values",
        ),
        (
            b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "Transfer-Encoding other than chunked",
        ),
    ];
    for &(input, reason) in table {
        let mut conn = conn_with(Limits::default(), input);
        match conn.next_event() {
            Event::Error(e) => assert_eq!((e.status, e.reason), (400, reason)),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn content_length_variants_accepted() {
    let table: &[(&[u8], Option<u64>, bool)] = &[
        (b"GET / HTTP/1.1\r\n\r\n", None, false),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            Some(0),
            false,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            Some(5),
            false,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
            Some(5),
            false,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            Some(5),
            false,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length:  007 \r\n\r\n",
            Some(7),
            false,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            None,
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: CHUNKED \r\n\r\n",
            None,
            true,
        ),
    ];
    for &(input, length, chunked) in table {
        let req = parse(input).unwrap();
        assert_eq!(
            (req.content_length, req.chunked),
            (length, chunked),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn oversized_heads_are_431() {
    let limits = Limits::default();
    let line = |target_len: usize| {
        // "GET " + target + " HTTP/1.1" = target_len + 13 bytes
        let mut l = b"GET /".to_vec();
        l.resize(4 + target_len, b'a');
        l.extend_from_slice(b" HTTP/1.1");
        l
    };
    let with_end = |mut l: Vec<u8>, rest: &[u8]| {
        l.extend_from_slice(rest);
        l
    };
    let at_limit = line(limits.max_request_line - 13);
    assert_eq!(at_limit.len(), limits.max_request_line);
    assert!(
        parse(&with_end(at_limit.clone(), b"\r\n\r\n")).is_ok(),
        "request line exactly at the limit"
    );
    let over = line(limits.max_request_line - 12);
    assert_eq!(
        parse(&with_end(over.clone(), b"\r\n\r\n")).map(|r| r.method),
        Err(431)
    );

    // A 9 KiB request line without its CRLF is refused without waiting for more.
    let mut partial = b"GET /".to_vec();
    partial.resize(9 * 1024, b'a');
    assert_eq!(parse(&partial).map(|r| r.method), Err(431));
    // At the limit plus a CR, it can still end in time.
    let mut conn = conn_with(limits, &with_end(at_limit, b"\r"));
    assert_eq!(owned(conn.next_event()), Ev::NeedData);

    // Header section: every field line plus the final CRLF, exactly at the limit.
    let head_with_section = |section_len: usize| {
        let mut h = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        h.resize(16 + section_len - 4, b'v');
        h.extend_from_slice(b"\r\n\r\n");
        h
    };
    assert!(parse(&head_with_section(limits.max_header_bytes)).is_ok());
    assert_eq!(
        parse(&head_with_section(limits.max_header_bytes + 1)).map(|r| r.method),
        Err(431)
    );
    let mut partial_headers = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    partial_headers.resize(16 + limits.max_header_bytes + 1, b'v');
    assert_eq!(
        parse(&partial_headers).map(|r| r.method),
        Err(431),
        "partial header section"
    );

    let many = |n: usize| {
        let mut h = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..n {
            h.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        h
    };
    assert_eq!(
        parse(&many(limits.max_headers)).unwrap().headers.len(),
        limits.max_headers
    );
    assert_eq!(
        parse(&many(limits.max_headers + 1)).map(|r| r.method),
        Err(431)
    );
    // Refused as soon as the 101st line is seen, before the head ends.
    let mut unfinished = many(limits.max_headers + 1);
    unfinished.truncate(unfinished.len() - 2);
    assert_eq!(parse(&unfinished).map(|r| r.method), Err(431));
}

#[test]
fn custom_limits_apply() {
    let limits = Limits {
        max_request_line: 20,
        max_header_bytes: 32,
        max_headers: 2,
        max_body_size: 10,
    };
    let table: &[(&[u8], Result<(), u16>)] = &[
        (b"GET /123 HTTP/1.1\r\n\r\n", Ok(())),
        (b"GET /123456 HTTP/1.1\r\n\r\n", Ok(())),
        (b"GET /1234567 HTTP/1.1\r\n\r\n", Err(431)),
        (b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", Ok(())),
        (b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", Err(431)),
        (
            b"GET / HTTP/1.1\r\nA: 1234567890123456789012345\r\n\r\n",
            Ok(()),
        ),
        (
            b"GET / HTTP/1.1\r\nA: 12345678901234567890123456\r\n\r\n",
            Err(431),
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n", Ok(())),
        (b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", Err(413)),
    ];
    for &(input, want) in table {
        assert_eq!(
            parse_with(limits, input).map(|_| ()),
            want,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

/// Found by fuzzing: a too-long line ending in a bare LF was 431 when the LF arrived later
/// but 400 when it came with the line. The size limit now wins in both cases.
#[test]
fn oversized_line_is_431_however_its_bare_lf_arrives() {
    let limits = Limits {
        max_request_line: 8,
        max_header_bytes: 16,
        ..Limits::default()
    };
    let table: &[&[u8]] = &[
        b"GET /abcdef\n",
        b"GET /abcdef\r\r\n",
        b"\0\0\0\0\0\0\0\0\0\n",
        b"GET / HTTP/1.1\r\nX-Long: abcdefghij\n",
        b"GET / HTTP/1.1\r\nX-Long: abcdefghij\n\r\n",
    ];
    for &input in table {
        let lf = input.iter().rposition(|&b| b == b'\n').unwrap();
        for cut in [input.len(), lf] {
            let mut conn = conn_with(limits, &input[..cut]);
            conn.receive(&input[cut..]);
            assert_eq!(
                owned(conn.next_event()),
                Ev::Error(431),
                "{:?} cut at {cut}",
                String::from_utf8_lossy(input)
            );
        }
    }
    // Within the limits a bare LF is still refused as such.
    assert_eq!(parse_with(limits, b"GET / A\n").map(|_| ()), Err(400));
}

#[test]
fn content_length_over_max_body_is_413_at_the_head() {
    let input = b"POST / HTTP/1.1\r\nContent-Length: 1073741825\r\n\r\n";
    assert_eq!(parse(input).map(|r| r.method), Err(413));
    let input = b"POST / HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n";
    assert_eq!(parse(input).unwrap().content_length, Some(1 << 30));
}

#[test]
fn partial_heads_need_more_data_at_every_prefix() {
    let input: &[u8] = b"\r\nPOST /p?q HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
    let head_end = input.len() - 2;
    for cut in 0..head_end {
        let mut conn = conn_with(Limits::default(), &input[..cut]);
        assert_eq!(owned(conn.next_event()), Ev::NeedData, "cut at {cut}");
        // Polling again without input changes nothing.
        assert_eq!(owned(conn.next_event()), Ev::NeedData, "cut at {cut}");
        conn.receive(&input[cut..]);
        let events = drain_events(&mut conn);
        assert!(
            matches!(&events[0], Ev::Req(r) if r.raw_path == "/p"),
            "cut at {cut}: {events:?}"
        );
        assert_eq!(
            events[1..],
            [Ev::Data(b"hi".to_vec()), Ev::End, Ev::Paused],
            "cut at {cut}"
        );
    }
}

#[test]
fn head_fed_one_byte_at_a_time() {
    let input: &[u8] = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\r\n";
    let mut conn = Connection::new(Limits::default());
    for (i, &b) in input.iter().enumerate() {
        conn.receive(&[b]);
        let ev = owned(conn.next_event());
        if i + 1 < input.len() {
            assert_eq!(ev, Ev::NeedData, "byte {i}");
        } else {
            assert!(matches!(ev, Ev::Req(r) if r.raw_path == "/slow" && r.headers.len() == 2));
        }
    }
}

#[test]
fn keep_alive_from_version_and_connection_header() {
    let table: &[(&[u8], bool)] = &[
        (b"GET / HTTP/1.1\r\n\r\n", true),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
        (b"GET / HTTP/1.1\r\nConnection: CLOSE\r\n\r\n", false),
        (
            b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
            false,
        ),
        (
            b"GET / HTTP/1.1\r\nConnection: upgrade\r\nConnection: close\r\n\r\n",
            false,
        ),
        (b"GET / HTTP/1.1\r\nConnection: closed\r\n\r\n", true),
        (b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", true),
        (b"GET / HTTP/1.0\r\n\r\n", false),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
        (
            b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
            false,
        ),
    ];
    for &(input, keep_alive) in table {
        assert_eq!(
            parse(input).unwrap().keep_alive,
            keep_alive,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn expect_continue_is_reported() {
    let table: &[(&[u8], bool)] = &[
        (
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nexpect: 100-Continue\r\nContent-Length: 3\r\n\r\n",
            true,
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n", false),
        (
            b"POST / HTTP/1.1\r\nExpect: something-else\r\nContent-Length: 3\r\n\r\n",
            false,
        ),
        // RFC 9110 §10.1.1: ignored on HTTP/1.0.
        (
            b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            false,
        ),
    ];
    for &(input, expect) in table {
        assert_eq!(
            parse(input).unwrap().expect_continue,
            expect,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn eof_between_and_inside_requests() {
    let mut conn = Connection::new(Limits::default());
    conn.receive_eof();
    assert_eq!(owned(conn.next_event()), Ev::Closed);

    let mut conn = conn_with(Limits::default(), b"\r\n");
    conn.receive_eof();
    assert_eq!(owned(conn.next_event()), Ev::Closed);

    let mut conn = conn_with(Limits::default(), b"GET / HT");
    assert_eq!(owned(conn.next_event()), Ev::NeedData);
    conn.receive_eof();
    assert_eq!(owned(conn.next_event()), Ev::Error(400));
    assert!(!conn.keep_alive());
}

#[test]
fn errors_are_sticky_and_close() {
    let mut conn = conn_with(
        Limits::default(),
        b"GET / HTTP/1.1\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    );
    assert_eq!(owned(conn.next_event()), Ev::Error(400));
    assert_eq!(owned(conn.next_event()), Ev::Error(400));
    assert!(!conn.keep_alive());
    let mut out = Vec::new();
    assert!(conn.send_error(400, &mut out));
    assert!(out.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
    assert!(!conn.start_next_cycle());
}

#[test]
fn utf8_target_beside_a_latin1_value() {
    // The head as a whole is not UTF-8 (the lone \xe9), while its target is: each piece must
    // still read back exactly as sent.
    let req =
        parse(b"GET /caf\xc3\xa9?q=\xc3\xa9 HTTP/1.1\r\nX-Latin: \xe9t\xe9\r\nHost: h\r\n\r\n")
            .unwrap();
    assert_eq!(req.target, "/caf\u{e9}?q=\u{e9}");
    assert_eq!(req.raw_path, "/caf\u{e9}");
    assert_eq!(req.path, "/caf\u{e9}".as_bytes());
    assert_eq!(req.query, "q=\u{e9}");
    assert_eq!(
        req.headers,
        [
            ("X-Latin".to_owned(), b"\xe9t\xe9".to_vec()),
            ("Host".to_owned(), b"h".to_vec())
        ]
    );
}
