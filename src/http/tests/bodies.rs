//! Request bodies: Content-Length, chunked (extensions, trailers, every split), limits, EOF.

use super::*;

/// The decoded body, or the status the request is refused with.
type Outcome = Result<&'static [u8], u16>;

/// The body of the only request in `input`, or the status it fails with.
fn body_of_with(limits: Limits, input: &[u8]) -> Result<Vec<u8>, u16> {
    let mut conn = conn_with(limits, input);
    conn.receive_eof();
    let events = drain_events(&mut conn);
    match events.as_slice() {
        [Ev::Req(_), Ev::End, Ev::Paused] => Ok(Vec::new()),
        [Ev::Req(_), Ev::Data(d), Ev::End, Ev::Paused] => Ok(d.clone()),
        [.., Ev::Error(status)] => Err(*status),
        other => panic!("unexpected {other:?}"),
    }
}

fn body_of(input: &[u8]) -> Result<Vec<u8>, u16> {
    body_of_with(Limits::default(), input)
}

#[test]
fn content_length_bodies() {
    let table: &[(&[u8], Outcome)] = &[
        (b"GET / HTTP/1.1\r\n\r\n", Ok(b"")),
        (b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", Ok(b"")),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            Ok(b"hello"),
        ),
        (
            b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n\r\n\0",
            Ok(b"\r\n\0"),
        ),
        // The peer closed before sending all it announced.
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhell",
            Err(400),
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", Err(400)),
    ];
    for &(input, want) in table {
        assert_eq!(
            body_of(input),
            want.map(<[u8]>::to_vec),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn chunked_bodies() {
    let head = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let table: &[(&str, Outcome)] = &[
        ("0\r\n\r\n", Ok(b"")),
        ("5\r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        ("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", Ok(b"hello world")),
        ("A\r\n0123456789\r\n0\r\n\r\n", Ok(b"0123456789")),
        ("a\r\n0123456789\r\n0\r\n\r\n", Ok(b"0123456789")),
        ("00005\r\nhello\r\n000\r\n\r\n", Ok(b"hello")),
        ("5;name=value\r\nhello\r\n0;last\r\n\r\n", Ok(b"hello")),
        ("5 ; a=\"q;uoted\"\r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        ("5\t\r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        (
            "5\r\nhello\r\n0\r\nX-Trailer: 1\r\nOther: 2\r\n\r\n",
            Ok(b"hello"),
        ),
        ("3\r\n\r\n\r\r\n0\r\n\r\n", Ok(b"\r\n\r")),
        ("", Err(400)),
        ("5\r\nhel", Err(400)),
        ("5\r\nhello\r\n", Err(400)),
        ("5\r\nhello\r\n0\r\n", Err(400)),
        ("zz\r\nhello\r\n0\r\n\r\n", Err(400)),
        ("\r\nhello\r\n0\r\n\r\n", Err(400)),
        (" 5\r\nhello\r\n0\r\n\r\n", Err(400)),
        ("-5\r\nhello\r\n0\r\n\r\n", Err(400)),
        ("0x5\r\nhello\r\n0\r\n\r\n", Err(400)),
        ("5 5\r\nhello\r\n0\r\n\r\n", Err(400)),
        ("5\nhello\r\n0\r\n\r\n", Err(400)),
        ("5\rhello\r\n0\r\n\r\n", Err(400)),
        ("5\r\nhelloXX0\r\n\r\n", Err(400)),
        ("5\r\nhello\n0\r\n\r\n", Err(400)),
        ("5;ext\nhello\r\n0\r\n\r\n", Err(400)),
        ("10000000000000000\r\n", Err(400)),
        ("5\r\nhello\r\n0\r\nX: 1\n\r\n", Err(400)),
        ("5\r\nhello\r\n0\r\n folded\r\n\r\n", Err(400)),
        ("5\r\nhello\r\n0\r\n\n", Err(400)),
    ];
    for &(body, want) in table {
        let input = format!("{head}{body}");
        assert_eq!(
            body_of(input.as_bytes()),
            want.map(<[u8]>::to_vec),
            "{body:?}"
        );
    }
}

#[test]
fn chunked_limits() {
    let limits = Limits {
        max_body_size: 8,
        max_header_bytes: 64,
        ..Limits::default()
    };
    let head = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let table: &[(&str, Outcome)] = &[
        ("8\r\n12345678\r\n0\r\n\r\n", Ok(b"12345678")),
        ("4\r\n1234\r\n4\r\n5678\r\n0\r\n\r\n", Ok(b"12345678")),
        ("9\r\n123456789\r\n0\r\n\r\n", Err(413)),
        // The running total crosses the limit at the second chunk.
        ("5\r\n12345\r\n4\r\n6789\r\n0\r\n\r\n", Err(413)),
        ("ffffffffffffffff\r\n", Err(413)),
    ];
    for &(body, want) in table {
        let input = format!("{head}{body}");
        assert_eq!(
            body_of_with(limits, input.as_bytes()),
            want.map(<[u8]>::to_vec),
            "{body:?}"
        );
    }

    // The 413 comes before the oversized chunk's data is even sent.
    let mut conn = conn_with(limits, format!("{head}5\r\n12345\r\n4\r\n").as_bytes());
    assert_eq!(
        drain_events(&mut conn)[1..],
        [Ev::Data(b"12345".to_vec()), Ev::Error(413)]
    );

    let big_trailer = format!("{head}0\r\nX: {}\r\n\r\n", "t".repeat(64));
    assert_eq!(body_of_with(limits, big_trailer.as_bytes()), Err(431));
    let long_extension = format!("{head}1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(5000));
    assert_eq!(body_of(long_extension.as_bytes()), Err(400));
}

/// Every way to split the input in two and in three must decode to the same events.
#[test]
fn chunked_body_at_every_split_point() {
    let input: &[u8] = b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        3;x=y\r\nabc\r\n\
        A\r\n0123456789\r\n\
        0\r\nT: v\r\n\r\n\
        GET /next HTTP/1.1\r\n";
    let want_body: &[u8] = b"abc0123456789";
    let next = b"GET /next HTTP/1.1\r\n".len();
    let check = |cuts: &[usize]| {
        let mut conn = Connection::new(Limits::default());
        let mut body = Vec::new();
        let mut ended = false;
        let mut from = 0;
        for &cut in cuts.iter().chain([input.len()].iter()) {
            conn.receive(&input[from..cut]);
            from = cut;
            for ev in drain_events(&mut conn) {
                match ev {
                    Ev::Req(r) => assert_eq!(r.raw_path, "/u"),
                    Ev::Data(d) => body.extend_from_slice(&d),
                    Ev::End => ended = true,
                    Ev::NeedData | Ev::Paused => {}
                    other => panic!("cuts {cuts:?}: {other:?}"),
                }
            }
        }
        assert_eq!(body, want_body, "cuts {cuts:?}");
        assert!(ended, "cuts {cuts:?}");
        assert_eq!(
            conn.buffered(),
            next,
            "cuts {cuts:?}: the next request stays buffered"
        );
    };
    for a in 0..=input.len() {
        check(&[a]);
        for b in a..=input.len() {
            check(&[a, b]);
        }
    }
}

#[test]
fn chunked_body_one_byte_at_a_time() {
    let input: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n";
    let mut conn = Connection::new(Limits::default());
    let mut events = Vec::new();
    for b in input {
        conn.receive(std::slice::from_ref(b));
        events.extend(
            drain_events(&mut conn)
                .into_iter()
                .filter(|e| *e != Ev::NeedData),
        );
    }
    let data: Vec<u8> = events
        .iter()
        .filter_map(|e| {
            if let Ev::Data(d) = e {
                Some(d.as_slice())
            } else {
                None
            }
        })
        .flatten()
        .copied()
        .collect();
    assert_eq!(data, b"wikipedia");
    assert_eq!(events.last(), Some(&Ev::Paused));
    assert_eq!(events[events.len() - 2], Ev::End);
}

#[test]
fn body_bytes_are_not_mistaken_for_the_next_request() {
    let input: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 19\r\n\r\nGET /x HTTP/1.1\r\n\r\n";
    assert_eq!(body_of(input), Ok(b"GET /x HTTP/1.1\r\n\r\n".to_vec()));
}
