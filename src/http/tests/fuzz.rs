//! Property-based fuzzing of `Connection`: arbitrary, well-formed and mutated input in any split.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};

use super::*;

/// Bytes that print as an escaped byte string, so a shrunk failure can be pasted into a
/// byte-table test.
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

// Every property runs PROPTEST_CASES cases (proptest reads the variable itself; 256 when it is
// unset), so `cargo test` is a quick smoke run and `make fuzz` a long one. The RNG is seeded
// afresh each run, so long runs keep exploring; a shrunk failure is printed and belongs in the
// byte-table tests, hence no seed files.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Driving a connection the way a server does, checking the API contract at every step.

/// How the driver plays the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum App {
    /// Reads each body to its end, then answers.
    Read,
    /// Answers as soon as the head arrives and has `drain_body` discard the body (at most
    /// `max` bytes of it). `send_continue` comes first so the keep-alive verdict does not
    /// depend on how much body happened to be buffered.
    Drain { max: u64 },
}

/// What one run amounts to. `NeedData` is left out: how often it shows up depends on the split.
#[derive(Debug, PartialEq, Eq)]
enum Obs {
    Ev(Ev),
    Drained(Drain),
    /// The result of `start_next_cycle` after answering.
    Cycle(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Body,
    Ended,
    Draining,
}

struct Driver {
    conn: Connection,
    app: App,
    seen: Vec<Obs>,
    out: Vec<u8>,
    phase: Phase,
    finished: bool,
    /// Bound on calls without new input: every event but the last of a pump consumes input
    /// or moves the cycle on, so a count past this means `next_event` is not settling.
    max_calls: usize,
}

impl Driver {
    fn new(limits: Limits, app: App, input_len: usize) -> Self {
        Driver {
            conn: Connection::new(limits),
            app,
            seen: Vec::new(),
            out: Vec::new(),
            phase: Phase::Head,
            finished: false,
            max_calls: 2 * input_len + 16,
        }
    }

    fn feed(&mut self, piece: &[u8]) {
        if !self.finished {
            self.conn.receive(piece);
            self.pump();
        }
    }

    fn eof(&mut self) {
        if !self.finished {
            self.conn.receive_eof();
            self.pump();
        }
    }

    fn record(&mut self, obs: Obs) {
        // Data events are cut wherever the input was; only their concatenation is meaningful.
        if let (Some(Obs::Ev(Ev::Data(acc))), Obs::Ev(Ev::Data(more))) =
            (self.seen.last_mut(), &obs)
        {
            acc.extend_from_slice(more);
            return;
        }
        self.seen.push(obs);
    }

    fn pump(&mut self) {
        let mut calls = 0;
        while !self.finished {
            calls += 1;
            assert!(
                calls <= self.max_calls,
                "no settled state after {calls} calls"
            );
            if let (App::Drain { max }, Phase::Draining) = (self.app, self.phase) {
                match self.conn.drain_body(max) {
                    Drain::NeedData => return,
                    Drain::Complete => {
                        assert!(self.conn.body_fully_received());
                        self.record(Obs::Drained(Drain::Complete));
                        self.next_cycle();
                    }
                    Drain::Abandon => {
                        assert!(!self.conn.keep_alive(), "abandoned body but keep-alive");
                        self.record(Obs::Drained(Drain::Abandon));
                        self.finished = true;
                    }
                }
                continue;
            }
            let event = owned(self.conn.next_event());
            match &event {
                Ev::NeedData => return,
                Ev::Req(req) => {
                    assert_eq!(self.phase, Phase::Head, "request inside a message");
                    assert_eq!(self.conn.body_fully_received(), !req.has_body());
                    self.phase = Phase::Body;
                }
                Ev::Data(d) => {
                    assert_eq!(self.phase, Phase::Body, "data outside a body");
                    assert!(!d.is_empty(), "empty data event");
                }
                Ev::End => {
                    assert_eq!(self.phase, Phase::Body, "end outside a body");
                    assert!(self.conn.body_fully_received());
                    self.phase = Phase::Ended;
                }
                Ev::Paused => assert_eq!(self.phase, Phase::Ended, "paused mid-message"),
                Ev::Closed => {
                    assert_eq!(self.phase, Phase::Head, "closed mid-message");
                    assert!(!self.conn.keep_alive());
                    assert_eq!(owned(self.conn.next_event()), Ev::Closed);
                    self.finished = true;
                }
                Ev::Error(status) => {
                    self.check_failed(*status);
                    self.finished = true;
                }
            }
            let drain_now = matches!(event, Ev::Req(_)) && matches!(self.app, App::Drain { .. });
            let answer_now = event == Ev::Paused;
            self.record(Obs::Ev(event));
            if drain_now {
                self.conn.send_continue(&mut self.out);
                self.respond();
                self.phase = Phase::Draining;
            } else if answer_now {
                self.respond();
                self.next_cycle();
            }
        }
    }

    /// A peer error is one of the statuses we answer peers with, and the connection stays
    /// failed whatever comes after.
    fn check_failed(&mut self, status: u16) {
        assert!(
            matches!(status, 400 | 413 | 431),
            "peer error with status {status}"
        );
        assert!(
            matches!(self.phase, Phase::Head | Phase::Body),
            "error after the message ended"
        );
        assert_eq!(owned(self.conn.next_event()), Ev::Error(status));
        self.conn.receive(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(owned(self.conn.next_event()), Ev::Error(status));
        self.conn.receive_eof();
        assert_eq!(owned(self.conn.next_event()), Ev::Error(status));
        assert!(!self.conn.keep_alive());
        assert!(self.conn.send_error(status, &mut self.out));
        assert!(!self.conn.start_next_cycle());
    }

    fn respond(&mut self) {
        let framing = self
            .conn
            .start_response("200 OK", &headers(&[]), Some(2), &mut self.out)
            .expect("a valid response to a parsed request");
        self.conn.write_body(b"ok", &mut self.out);
        self.conn.finish_response(&mut self.out);
        assert!(matches!(
            framing,
            ResponseFraming::ContentLength(2) | ResponseFraming::NoBody
        ));
    }

    fn next_cycle(&mut self) {
        let again = self.conn.start_next_cycle();
        self.record(Obs::Cycle(again));
        if again {
            self.phase = Phase::Head;
        } else {
            self.finished = true;
        }
    }
}

/// Where the input is cut into `receive` calls.
#[derive(Debug, Clone)]
enum Split {
    Cuts(Vec<Index>),
    Bytewise,
}

fn split() -> impl Strategy<Value = Split> {
    prop_oneof![
        6 => vec(any::<Index>(), 0..10).prop_map(Split::Cuts),
        1 => Just(Split::Bytewise),
    ]
}

fn pieces<'a>(input: &'a [u8], split: &Split) -> Vec<&'a [u8]> {
    match split {
        Split::Bytewise => input.chunks(1).collect(),
        Split::Cuts(cuts) => {
            // Repeated cuts stay: they become empty `receive` calls, which must be harmless.
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            at.sort_unstable();
            let mut pieces = Vec::with_capacity(at.len() + 1);
            let mut start = 0;
            for cut in at {
                pieces.push(&input[start..cut]);
                start = cut;
            }
            pieces.push(&input[start..]);
            pieces
        }
    }
}

fn run(limits: Limits, app: App, input: &[u8], split: &Split, eof: bool) -> Vec<Obs> {
    let mut driver = Driver::new(limits, app, input.len());
    for piece in pieces(input, split) {
        driver.feed(piece);
    }
    if eof {
        driver.eof();
    }
    driver.seen
}

fn whole() -> Split {
    Split::Cuts(Vec::new())
}

fn app() -> impl Strategy<Value = App> {
    prop_oneof![
        Just(App::Read),
        select(vec![0, 1, 7, 64, u64::MAX]).prop_map(|max| App::Drain { max }),
    ]
}

/// The defaults, or limits small enough for short inputs to run into every one of them.
fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![3 => Just(Limits::default()), 1 => tight_limits()]
}

fn tight_limits() -> impl Strategy<Value = Limits> {
    (1usize..96, 0usize..320, 0usize..10, 0u64..700).prop_map(|(line, head, n, body)| Limits {
        max_request_line: line,
        max_header_bytes: head,
        max_headers: n,
        max_body_size: body,
    })
}

// ---------------------------------------------------------------------------------------------
// Input: HTTP-flavoured noise, well-formed requests with their expected parse, and mutations.

/// Pieces of HTTP syntax, so that random input gets past the request line often enough.
const WORDS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"OPTIONS * ",
    b"/",
    b"/a?b=c",
    b"%2F",
    b"http://h",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b" HTTP/2",
    b"\r\n",
    b"\r",
    b"\n",
    b"\r\n\r\n",
    b": ",
    b":",
    b" ",
    b"\t",
    b",",
    b";",
    b"Host: h\r\n",
    b"Content-Length: ",
    b"content-length:",
    b"Transfer-Encoding: ",
    b"chunked",
    b"identity",
    b"Connection: ",
    b"close",
    b"keep-alive",
    b"Expect: 100-continue\r\n",
    b"0",
    b"1",
    b"5",
    b"a",
    b"F",
    b"00",
    b"18446744073709551616",
    b"ffffffffffffffff0",
    b"0\r\n\r\n",
    b"3\r\nabc\r\n",
    b";x=\"y\"",
    b"\0",
    b"\x7f",
    b"\xff",
    b"\xc3\xa9",
];

fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => select(WORDS).prop_map(<[u8]>::to_vec),
        1 => vec(any::<u8>(), 1..6),
    ]
}

fn fragments(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(fragment(), 0..max).prop_map(|f| f.concat())
}

const NOISY_FIELDS: &[&[u8]] = &[
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"Expect",
    b"Host",
    b"X-a",
];

/// Messages whose skeleton is right (request line, field lines, empty line) but whose every
/// part is noise, so the body framing and field handling see random input too.
fn shaped_noise() -> impl Strategy<Value = Vec<u8>> {
    let line = (select(NOISY_FIELDS), fragments(4))
        .prop_map(|(name, value)| [name, b": ", &value, b"\r\n"].concat());
    let message = (
        select(vec![&b"GET"[..], b"POST", b"HEAD", b"PUT"]),
        prop_oneof![
            3 => vec(select(&b"az09%2F?=&/."[..]), 0..8),
            1 => fragments(3),
        ],
        select(vec![&b" HTTP/1.1\r\n"[..], b" HTTP/1.0\r\n"]),
        vec(line, 0..5),
        fragments(6),
    )
        .prop_map(|(method, target, version, lines, body)| {
            [
                method,
                b" /",
                &target,
                version,
                &lines.concat(),
                b"\r\n",
                &body,
            ]
            .concat()
        });
    vec(message, 1..4).prop_map(|m| m.concat())
}

fn noise() -> impl Strategy<Value = Bytes> {
    prop_oneof![fragments(48), shaped_noise()].prop_map(Bytes)
}

/// One well-formed request: its bytes, the `Request` they must parse to, and its body.
#[derive(Debug, Clone)]
struct Valid {
    wire: Bytes,
    request: Parsed,
    body: Vec<u8>,
}

const TCHARS: &[u8] = b"abcxyzABCXYZ0189!#$%&'*+-.^_`|~";

fn token(max_len: usize) -> impl Strategy<Value = String> {
    vec(select(TCHARS), 1..max_len).prop_map(|b| String::from_utf8(b).unwrap())
}

fn field_name() -> impl Strategy<Value = String> {
    // The prefix keeps random names clear of the fields that change framing or keep-alive.
    token(10).prop_map(|t| format!("X-{t}"))
}

/// A field value as the parser reports it: OWS around it is not part of it.
fn field_value() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        6 => 0x21u8..=0x7e,
        1 => 0x80u8..=0xff,
        1 => select(&b" \t"[..]),
    ];
    vec(byte, 0..16).prop_map(|v| v.trim_ascii().to_vec())
}

fn ows() -> impl Strategy<Value = &'static str> {
    select(&["", " ", "\t", "  \t"][..])
}

/// A field line: name, value, and the OWS written around the value.
type Field = (String, Vec<u8>, &'static str, &'static str);

fn field() -> impl Strategy<Value = Field> {
    (field_name(), field_value(), ows(), ows())
}

fn write_field(wire: &mut Vec<u8>, (name, value, before, after): &Field) {
    wire.extend_from_slice(name.as_bytes());
    wire.push(b':');
    wire.extend_from_slice(before.as_bytes());
    wire.extend_from_slice(value);
    wire.extend_from_slice(after.as_bytes());
    wire.extend_from_slice(b"\r\n");
}

/// One piece of a path: a character sent as is, or a byte sent percent-encoded.
#[derive(Debug, Clone)]
enum Atom {
    Plain(&'static str),
    Escaped { byte: u8, upper: bool },
}

const PLAIN: &[&str] = &[
    "a", "Z", "0", "-", ".", "_", "~", "!", "$", "&", "'", "(", ")", "*", "+", ",", ";", "=", ":",
    "@", "/", "#", "\u{e9}",
];

fn atom() -> impl Strategy<Value = Atom> {
    prop_oneof![
        3 => select(PLAIN).prop_map(Atom::Plain),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(byte, upper)| Atom::Escaped { byte, upper }),
    ]
}

const QUERY_CHARS: &[char] = &[
    'a', 'B', '1', '=', '&', '?', '%', '/', '+', ';', '#', '\u{e9}',
];

#[derive(Debug, Clone)]
struct Target {
    atoms: Vec<Atom>,
    query: Option<String>,
    /// Absolute-form scheme and authority.
    absolute: Option<&'static str>,
    /// Absolute-form without a path (`http://h` or `http://h?q`) when there are no atoms.
    bare: bool,
}

fn target() -> impl Strategy<Value = Target> {
    (
        vec(atom(), 0..6),
        option::of(vec(select(QUERY_CHARS), 0..8).prop_map(String::from_iter)),
        option::weighted(
            0.2,
            select(&["http://example.com", "HTTP://h:8080", "https://[::1]"][..]),
        ),
        any::<bool>(),
    )
        .prop_map(|(atoms, query, absolute, bare)| Target {
            atoms,
            query,
            absolute,
            bare,
        })
}

/// The target as sent, its raw path and its decoded path, built from the atoms so the
/// expectation does not rely on the decoder under test.
fn render_target(t: &Target) -> (String, String, Vec<u8>) {
    let mut raw = String::from("/");
    let mut decoded = b"/".to_vec();
    for a in &t.atoms {
        match *a {
            Atom::Plain(s) => {
                raw.push_str(s);
                decoded.extend_from_slice(s.as_bytes());
            }
            Atom::Escaped { byte, upper: true } => {
                raw.push_str(&format!("%{byte:02X}"));
                decoded.push(byte);
            }
            Atom::Escaped { byte, upper: false } => {
                raw.push_str(&format!("%{byte:02x}"));
                decoded.push(byte);
            }
        }
    }
    let mut target = String::new();
    if let Some(authority) = t.absolute {
        target.push_str(authority);
    }
    if !(t.absolute.is_some() && t.bare && t.atoms.is_empty()) {
        target.push_str(&raw);
    }
    if let Some(q) = &t.query {
        target.push('?');
        target.push_str(q);
    }
    (target, raw, decoded)
}

#[derive(Debug, Clone)]
struct ChunkSpec {
    data: Vec<u8>,
    upper: bool,
    zeros: usize,
    ext: &'static str,
}

#[derive(Debug, Clone)]
enum BodySpec {
    None,
    /// `form` picks how Content-Length is spelled (see `content_length_fields`).
    Length {
        data: Vec<u8>,
        form: usize,
    },
    Chunked {
        chunks: Vec<ChunkSpec>,
        last_zeros: usize,
        last_ext: &'static str,
        trailers: Vec<Field>,
        te: &'static str,
    },
}

const CHUNK_EXTS: &[&str] = &["", ";a", ";a=b", "; a=\"x;y\"", " ;q", "\t;x=1", ";\u{e9}"];

fn chunk_ext() -> impl Strategy<Value = &'static str> {
    select(CHUNK_EXTS)
}

fn body_spec() -> impl Strategy<Value = BodySpec> {
    let chunk = (
        vec(any::<u8>(), 1..40),
        any::<bool>(),
        0usize..3,
        chunk_ext(),
    )
        .prop_map(|(data, upper, zeros, ext)| ChunkSpec {
            data,
            upper,
            zeros,
            ext,
        });
    prop_oneof![
        Just(BodySpec::None),
        (vec(any::<u8>(), 0..64), 0usize..4)
            .prop_map(|(data, form)| BodySpec::Length { data, form }),
        (
            vec(chunk, 0..5),
            0usize..3,
            chunk_ext(),
            vec(field(), 0..3),
            select(&["chunked", "Chunked", "CHUNKED"][..]),
        )
            .prop_map(|(chunks, last_zeros, last_ext, trailers, te)| {
                BodySpec::Chunked {
                    chunks,
                    last_zeros,
                    last_ext,
                    trailers,
                    te,
                }
            }),
    ]
}

/// Harmless spellings of one length: padded, repeated in a list, repeated on two lines.
fn content_length_fields(n: usize, form: usize) -> Vec<(String, Vec<u8>)> {
    let one = |name: &str, value: String| (name.to_owned(), value.into_bytes());
    match form {
        0 => vec![one("Content-Length", n.to_string())],
        1 => vec![one("content-length", format!("000{n}"))],
        2 => vec![one("Content-Length", format!("{n}, {n}"))],
        _ => vec![
            one("Content-Length", n.to_string()),
            one("CONTENT-LENGTH", n.to_string()),
        ],
    }
}

/// `Connection` values with whether they hold `close` and `keep-alive`.
const CONNECTION: &[(&str, bool, bool)] = &[
    ("close", true, false),
    ("keep-alive", false, true),
    ("Keep-Alive, Upgrade", false, true),
    ("upgrade", false, false),
    ("x, CLOSE", true, false),
];

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "M-SEARCH", "X~!",
];

/// The choices behind one well-formed request; `build_valid` turns them into bytes and the
/// expected parse.
#[derive(Debug, Clone)]
struct Shape {
    method: &'static str,
    target: Target,
    http10: bool,
    /// Extra fields, each inserted at a random place among those before it.
    extra: Vec<(Field, Index)>,
    /// A `Connection` value (with whether it holds `close` and `keep-alive`) and its place.
    connection: Option<((&'static str, bool, bool), Index)>,
    expect: Option<Index>,
    body: BodySpec,
    body_at: Index,
}

fn valid_request() -> impl Strategy<Value = Valid> {
    (
        select(METHODS),
        target(),
        any::<bool>(),
        vec((field(), any::<Index>()), 0..6),
        option::of((select(CONNECTION), any::<Index>())),
        option::weighted(0.2, any::<Index>()),
        (body_spec(), any::<Index>()),
    )
        .prop_map(
            |(method, target, http10, extra, connection, expect, (body, body_at))| Shape {
                method,
                target,
                http10,
                extra,
                connection,
                expect,
                body,
                body_at,
            },
        )
        .prop_map(build_valid)
}

fn build_valid(shape: Shape) -> Valid {
    let Shape {
        method,
        target,
        http10,
        extra,
        connection,
        expect,
        body,
        body_at,
    } = shape;
    // HTTP/1.0 cannot carry chunked framing, so such a body goes by length instead.
    let body = match body {
        BodySpec::Chunked { chunks, .. } if http10 => BodySpec::Length {
            data: chunks.into_iter().flat_map(|c| c.data).collect(),
            form: 0,
        },
        other => other,
    };
    // Field lines with the OWS to write around each value; specials go in at random places.
    let mut lines: Vec<Field> = Vec::new();
    for (f, at) in extra {
        lines.insert(at.index(lines.len() + 1), f);
    }
    let (close, keep_alive_token) = match connection {
        Some(((value, close, ka), at)) => {
            let line = ("Connection".to_owned(), value.as_bytes().to_vec(), " ", "");
            lines.insert(at.index(lines.len() + 1), line);
            (close, ka)
        }
        None => (false, false),
    };
    if let Some(at) = expect {
        let line = ("Expect".to_owned(), b"100-continue".to_vec(), " ", "");
        lines.insert(at.index(lines.len() + 1), line);
    }
    let (framing_fields, content_length, chunked) = match &body {
        BodySpec::None => (Vec::new(), None, false),
        BodySpec::Length { data, form } => (
            content_length_fields(data.len(), *form),
            Some(data.len() as u64),
            false,
        ),
        BodySpec::Chunked { te, .. } => (
            vec![("Transfer-Encoding".to_owned(), te.as_bytes().to_vec())],
            None,
            true,
        ),
    };
    let at = body_at.index(lines.len() + 1);
    for (i, (name, value)) in framing_fields.into_iter().enumerate() {
        lines.insert(at + i, (name, value, " ", ""));
    }

    let (target_text, raw_path, path) = render_target(&target);
    let version = if http10 {
        Version::Http10
    } else {
        Version::Http11
    };
    let mut wire = format!("{method} {target_text} {}\r\n", version.as_str()).into_bytes();
    for line in &lines {
        write_field(&mut wire, line);
    }
    wire.extend_from_slice(b"\r\n");
    let body_bytes = match body {
        BodySpec::None => Vec::new(),
        BodySpec::Length { data, .. } => {
            wire.extend_from_slice(&data);
            data
        }
        BodySpec::Chunked {
            chunks,
            last_zeros,
            last_ext,
            trailers,
            ..
        } => {
            let mut data = Vec::new();
            for c in chunks {
                let size = if c.upper {
                    format!("{:X}", c.data.len())
                } else {
                    format!("{:x}", c.data.len())
                };
                wire.extend_from_slice("0".repeat(c.zeros).as_bytes());
                wire.extend_from_slice(size.as_bytes());
                wire.extend_from_slice(c.ext.as_bytes());
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&c.data);
                wire.extend_from_slice(b"\r\n");
                data.extend_from_slice(&c.data);
            }
            wire.extend_from_slice("0".repeat(last_zeros + 1).as_bytes());
            wire.extend_from_slice(last_ext.as_bytes());
            wire.extend_from_slice(b"\r\n");
            for line in &trailers {
                write_field(&mut wire, line);
            }
            wire.extend_from_slice(b"\r\n");
            data
        }
    };

    let request = Parsed {
        method: method.to_owned(),
        target: target_text,
        raw_path,
        path,
        query: target.query.clone().unwrap_or_default(),
        version,
        headers: lines
            .into_iter()
            .map(|(name, value, _, _)| (name, value))
            .collect(),
        content_length,
        chunked,
        keep_alive: !close && (!http10 || keep_alive_token),
        expect_continue: expect.is_some() && !http10,
    };
    Valid {
        wire: Bytes(wire),
        request,
        body: body_bytes,
    }
}

fn pipeline() -> impl Strategy<Value = Vec<Valid>> {
    vec(valid_request(), 1..5)
}

fn concat_wire(requests: &[Valid]) -> Vec<u8> {
    requests
        .iter()
        .flat_map(|r| r.wire.0.iter().copied())
        .collect()
}

/// What a run over `requests` must observe: each request and its body in order, up to the
/// first one that does not keep the connection alive.
fn expected(requests: &[Valid], app: App, eof: bool) -> Vec<Obs> {
    let mut want = Vec::new();
    for r in requests {
        want.push(Obs::Ev(Ev::Req(Box::new(r.request.clone()))));
        match app {
            App::Read => {
                if !r.body.is_empty() {
                    want.push(Obs::Ev(Ev::Data(r.body.clone())));
                }
                want.push(Obs::Ev(Ev::End));
                want.push(Obs::Ev(Ev::Paused));
            }
            App::Drain { .. } => want.push(Obs::Drained(Drain::Complete)),
        }
        want.push(Obs::Cycle(r.request.keep_alive));
        if !r.request.keep_alive {
            return want;
        }
    }
    if eof {
        want.push(Obs::Ev(Ev::Closed));
    }
    want
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Duplicate(Index, usize),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<Index>(),
            prop_oneof![
                select(WORDS).prop_map(<[u8]>::to_vec),
                vec(any::<u8>(), 1..4)
            ]
        )
            .prop_map(|(i, bytes)| Mutation::Insert(i, bytes)),
        (any::<Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<Index>(), 1usize..24).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut input: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = input.len();
        match m {
            Mutation::Set(i, b) if len > 0 => input[i.index(len)] = *b,
            Mutation::Set(..) => {}
            Mutation::Insert(i, bytes) => {
                let at = i.index(len + 1);
                input.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let at = i.index(len + 1);
                input.drain(at..(at + n).min(len));
            }
            Mutation::Duplicate(i, n) => {
                let at = i.index(len + 1);
                let copy = input[at..(at + n).min(len)].to_vec();
                input.splice(at..at, copy);
            }
            Mutation::Truncate(i) => input.truncate(i.index(len + 1)),
        }
    }
    input
}

// ---------------------------------------------------------------------------------------------
// Request smuggling: heads whose body boundary two parties could disagree on.

const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";

/// Framing fields no receiver may accept. The body after them is `0\r\n\r\n` and then
/// `SMUGGLED`, 40 bytes in all: a second request to a reader that takes the chunked or the
/// zero-length view, none to one that takes 40.
const AMBIGUOUS_HEADS: &[&str] = &[
    "Content-Length: 40\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding: chunked\r\nContent-Length: 40\r\n",
    "transfer-encoding: CHUNKED\r\ncontent-length: 0\r\n",
    "Content-Length: 0\r\nContent-Length: 40\r\n",
    "Content-Length: 40, 0\r\n",
    "Content-Length: 0,40\r\n",
    "Content-Length: +0\r\n",
    "Content-Length: 0x0\r\n",
    "Content-Length: -1\r\n",
    "Content-Length: 0 0\r\n",
    "Content-Length: 18446744073709551616\r\n",
    "Content-Length : 0\r\n",
    "Content-Length:\r\n 0\r\n",
    "Transfer-Encoding: chunked, identity\r\n",
    "Transfer-Encoding: identity, chunked\r\n",
    "Transfer-Encoding: identity\r\n",
    "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding: xchunked\r\n",
    "Transfer-Encoding : chunked\r\n",
    "Transfer-Encoding:\r\n chunked\r\n",
    "Transfer-Encoding:\tchunked\r\n\tchunked\r\n",
    "Transfer-Encoding\r\n",
];

/// Chunked bodies broken in their framing (size line, data end, trailer), so where the body
/// ends, and so where `SMUGGLED` would start, is unknowable.
const BAD_CHUNKS: &[&str] = &[
    "0x0\r\n\r\n",
    "-0\r\n\r\n",
    " 0\r\n\r\n",
    "+0\r\n\r\n",
    "0 0\r\n\r\n",
    "\r\n\r\n",
    "0\n\r\n",
    "0\r\r\n\r\n",
    "ffffffffffffffffff\r\n",
    "1_0\r\n",
    "0;\x01\r\n\r\n",
    "0\r\n\n",
    "0\r\nX: y\n\r\n",
    "0\r\n X: y\r\n\r\n",
    "3\r\nabcd\r\n0\r\n\r\n",
    "3\r\nab\r\n0\r\n\r\n",
];

#[derive(Debug, Clone)]
enum Smuggle {
    /// The head itself is ambiguous: refused before any request is reported.
    Head { fields: &'static str, http10: bool },
    /// Chunked framing that breaks before its end.
    Chunk(&'static str),
    /// A chunked request on HTTP/1.0, where Transfer-Encoding cannot be trusted.
    ChunkedHttp10,
}

fn smuggle() -> impl Strategy<Value = Smuggle> {
    prop_oneof![
        (select(AMBIGUOUS_HEADS), any::<bool>())
            .prop_map(|(fields, http10)| Smuggle::Head { fields, http10 }),
        select(BAD_CHUNKS).prop_map(Smuggle::Chunk),
        Just(Smuggle::ChunkedHttp10),
    ]
}

fn smuggling_input(case: &Smuggle) -> Vec<u8> {
    let (version, fields, body) = match case {
        Smuggle::Head { fields, http10 } => {
            (if *http10 { "1.0" } else { "1.1" }, *fields, "0\r\n\r\n")
        }
        Smuggle::Chunk(body) => ("1.1", "Transfer-Encoding: chunked\r\n", *body),
        Smuggle::ChunkedHttp10 => ("1.0", "Transfer-Encoding: chunked\r\n", "0\r\n\r\n"),
    };
    let mut input =
        format!("POST /first HTTP/{version}\r\nHost: h\r\n{fields}\r\n{body}").into_bytes();
    input.extend_from_slice(SMUGGLED);
    input
}

// ---------------------------------------------------------------------------------------------
// Responses, read back by a plain reference decoder.

#[derive(Debug, Clone, Copy)]
enum AppLength {
    None,
    Exact,
    /// A Content-Length this much below the body: the excess must not reach the wire.
    Short(usize),
    /// This much above the body: the peer is left waiting, so the connection must close.
    Long(usize),
}

#[derive(Debug, Clone)]
struct ResponseCase {
    http10: bool,
    head: bool,
    request_connection: Option<&'static str>,
    status: &'static str,
    length: AppLength,
    app_chunked: bool,
    app_close: bool,
    hint: bool,
    extra: Vec<(String, String)>,
    body: Vec<Vec<u8>>,
}

const STATUSES: &[&str] = &[
    "100 Continue",
    "101",
    "200 OK",
    "201 Created",
    "204 No Content",
    "206",
    "301 Moved Permanently",
    "304 Not Modified",
    "404 Not Found",
    "500 Internal Server Error",
    "599 Custom \u{e9}",
];

fn response_case() -> impl Strategy<Value = ResponseCase> {
    let length = prop_oneof![
        Just(AppLength::None),
        Just(AppLength::Exact),
        (1usize..8).prop_map(AppLength::Short),
        (1usize..8).prop_map(AppLength::Long),
    ];
    let extra = vec(
        (
            field_name(),
            vec(select(&b"abc XYZ-=;/0"[..]), 0..10)
                .prop_map(|v| String::from_utf8(v.trim_ascii().to_vec()).unwrap()),
        ),
        0..3,
    );
    (
        (
            any::<bool>(),
            any::<bool>(),
            option::of(select(&["close", "keep-alive"][..])),
        ),
        select(STATUSES),
        (length, any::<bool>(), any::<bool>(), any::<bool>()),
        extra,
        vec(vec(any::<u8>(), 0..24), 0..5),
    )
        .prop_map(
            |(
                (http10, head, request_connection),
                status,
                (length, chunked, app_close, hint),
                extra,
                body,
            )| {
                ResponseCase {
                    http10,
                    head,
                    request_connection,
                    status,
                    length,
                    app_chunked: chunked && matches!(length, AppLength::None),
                    app_close,
                    hint,
                    extra,
                    body,
                }
            },
        )
}

/// A response as a plain client reads it: status line, fields (names lowercased), and the body
/// per RFC 9112 §6.3.
#[derive(Debug)]
struct ReadBack {
    status_line: String,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body's framing was satisfied by the bytes available.
    complete: bool,
    /// Bytes after the message (none is right unless the body is close-delimited).
    trailing: usize,
}

impl ReadBack {
    fn values(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn read_response(out: &[u8], head_request: bool) -> ReadBack {
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head ends with an empty line")
        + 4;
    let head = std::str::from_utf8(&out[..head_end - 4]).expect("test heads are UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap().to_owned();
    let fields: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(": ").expect("field line with ': '");
            (n.to_ascii_lowercase(), v.to_owned())
        })
        .collect();
    let code: u16 = status_line["HTTP/1.1 ".len()..][..3].parse().unwrap();
    let mut rb = ReadBack {
        status_line,
        fields,
        body: Vec::new(),
        complete: true,
        trailing: 0,
    };
    let rest = &out[head_end..];
    if head_request || code < 200 || code == 204 || code == 304 {
        rb.trailing = rest.len();
    } else if let Some(te) = rb.values("transfer-encoding").first() {
        assert_eq!(*te, "chunked");
        let (body, used) = read_chunked(rest).expect("well-formed chunked body");
        rb.body = body;
        rb.trailing = rest.len() - used;
    } else if let Some(cl) = rb.values("content-length").first() {
        let n: usize = cl.parse().unwrap();
        rb.complete = rest.len() >= n;
        rb.body = rest[..n.min(rest.len())].to_vec();
        rb.trailing = rest.len().saturating_sub(n);
    } else {
        rb.body = rest.to_vec();
    }
    rb
}

/// Decodes a chunked body with no extensions or trailers; returns it and the bytes used.
fn read_chunked(wire: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_len = wire[at..].windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&wire[at..at + line_len]).ok()?, 16).ok()?;
        at += line_len + 2;
        if size == 0 {
            return (wire.get(at..at + 2)? == b"\r\n").then_some((body, at + 2));
        }
        assert!(size > 0);
        body.extend_from_slice(wire.get(at..at + size)?);
        at += size;
        if wire.get(at..at + 2)? != b"\r\n" {
            return None;
        }
        at += 2;
    }
}

fn check_response(case: &ResponseCase) -> Result<(), TestCaseError> {
    let mut request = format!(
        "{} / HTTP/1.{}\r\n",
        if case.head { "HEAD" } else { "GET" },
        if case.http10 { 0 } else { 1 }
    );
    if let Some(c) = case.request_connection {
        request.push_str(&format!("Connection: {c}\r\n"));
    }
    request.push_str("\r\n");
    let mut conn = conn_with(Limits::default(), request.as_bytes());
    let events = drain_events(&mut conn);
    prop_assert_eq!(events.last(), Some(&Ev::Paused));

    let total: Vec<u8> = case.body.concat();
    let mut app_headers = case.extra.clone();
    let app_length = match case.length {
        AppLength::None => None,
        AppLength::Exact => Some(total.len()),
        AppLength::Short(k) => Some(total.len().saturating_sub(k)),
        AppLength::Long(k) => Some(total.len() + k),
    };
    if let Some(n) = app_length {
        app_headers.push(("Content-Length".into(), n.to_string()));
    }
    if case.app_chunked {
        app_headers.push(("Transfer-Encoding".into(), "chunked".into()));
    }
    if case.app_close {
        app_headers.push(("Connection".into(), "close".into()));
    }
    let hint = (case.hint && app_length.is_none()).then_some(total.len() as u64);

    let mut out = Vec::new();
    let framing = conn
        .start_response(case.status, &app_headers, hint, &mut out)
        .expect("valid status and headers");
    for piece in &case.body {
        conn.write_body(piece, &mut out);
    }
    conn.finish_response(&mut out);
    let keep_alive = conn.keep_alive();

    let rb = read_response(&out, case.head);
    let code: u16 = case.status[..3].parse().unwrap();
    let sent_status = if case.status.len() == 3 {
        format!("HTTP/1.1 {} ", case.status)
    } else {
        format!("HTTP/1.1 {}", case.status)
    };
    prop_assert_eq!(&rb.status_line, &sent_status);
    prop_assert_eq!(rb.values("date").len(), 1);
    prop_assert_eq!(rb.values("server").len(), 1);
    let lengths = rb.values("content-length");
    let encodings = rb.values("transfer-encoding");
    prop_assert!(lengths.len() <= 1, "{lengths:?}");
    prop_assert!(encodings.is_empty() || lengths.is_empty());
    if code < 200 || code == 204 {
        prop_assert!(lengths.is_empty());
    }
    // The head goes out before the app can fall short of its Content-Length, so that is the
    // one way to close without having said so.
    let said_close = rb.values("connection").contains(&"close");
    prop_assert!(
        !said_close || !keep_alive,
        "Connection: close on a kept connection"
    );
    prop_assert!(
        said_close || keep_alive || !rb.complete,
        "closing without Connection: close"
    );

    let bodyless = case.head || code < 200 || code == 204 || code == 304;
    let want: &[u8] = match app_length {
        _ if bodyless => b"",
        Some(n) => &total[..n.min(total.len())],
        None => &total,
    };
    prop_assert_eq!(&rb.body, &want);
    match framing {
        ResponseFraming::NoBody => prop_assert!(bodyless),
        ResponseFraming::Chunked => prop_assert_eq!(encodings, vec!["chunked"]),
        ResponseFraming::ContentLength(n) => {
            let n = n.to_string();
            prop_assert_eq!(lengths, vec![n.as_str()]);
        }
        ResponseFraming::CloseDelimited => {
            prop_assert!(!keep_alive);
            prop_assert!(lengths.is_empty() && encodings.is_empty());
        }
    }
    if framing != ResponseFraming::CloseDelimited {
        prop_assert_eq!(rb.trailing, 0, "bytes after the message");
    }
    if !rb.complete {
        prop_assert!(!keep_alive, "short body on a kept connection");
    }
    if code < 200 {
        prop_assert!(!keep_alive, "interim status as the final answer");
    }
    prop_assert_eq!(conn.start_next_cycle(), keep_alive);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The properties.

proptest! {
    #![proptest_config(config())]

    /// Noise never panics or loops, errors are peer statuses and sticky, and how the input is
    /// split into `receive` calls changes nothing.
    #[test]
    fn fuzz_noise_is_split_invariant(
        input in noise(),
        limits in limits(),
        app in app(),
        split in split(),
        eof in any::<bool>(),
    ) {
        let once = run(limits, app, &input.0, &whole(), eof);
        let split_up = run(limits, app, &input.0, &split, eof);
        prop_assert_eq!(once, split_up);
    }

    /// The same for well-formed pipelines with a few bytes damaged, inserted or removed.
    #[test]
    fn fuzz_mutated_requests_are_split_invariant(
        requests in pipeline(),
        mutations in vec(mutation(), 1..4),
        limits in limits(),
        app in app(),
        split in split(),
        eof in any::<bool>(),
    ) {
        let input = mutate(concat_wire(&requests), &mutations);
        let once = run(limits, app, &input, &whole(), eof);
        let split_up = run(limits, app, &input, &split, eof);
        prop_assert_eq!(once, split_up, "input {:?}", Bytes(input));
    }

    /// Pipelined well-formed requests come out in order, each parsed to what was sent and with
    /// its body intact (Content-Length or chunked), however the bytes arrive.
    #[test]
    fn fuzz_pipelines_parse_to_what_was_sent(
        requests in pipeline(),
        split in split(),
        eof in any::<bool>(),
        drain in any::<bool>(),
    ) {
        let app = if drain { App::Drain { max: u64::MAX } } else { App::Read };
        let input = concat_wire(&requests);
        let seen = run(Limits::default(), app, &input, &split, eof);
        prop_assert_eq!(seen, expected(&requests, app, eof));
    }

    /// Under limits that well-formed requests may exceed, they are served as sent until one is
    /// refused as too large (413/431, never 400), possibly after part of its body.
    #[test]
    fn fuzz_limits_refuse_only_as_too_large(
        requests in pipeline(),
        limits in tight_limits(),
        split in split(),
        eof in any::<bool>(),
    ) {
        let input = concat_wire(&requests);
        let seen = run(limits, App::Read, &input, &split, eof);
        let want = expected(&requests, App::Read, eof);
        let Some((Obs::Ev(Ev::Error(status)), before)) = seen.split_last() else {
            prop_assert_eq!(seen, want);
            return Ok(());
        };
        prop_assert!(matches!(status, 413 | 431), "{:?}", seen);
        prop_assert!(before.len() <= want.len(), "{:?}", seen);
        if let Some((last, rest)) = before.split_last() {
            prop_assert_eq!(rest, &want[..rest.len()]);
            match (last, &want[rest.len()]) {
                (Obs::Ev(Ev::Data(got)), Obs::Ev(Ev::Data(all))) => {
                    prop_assert!(all.starts_with(got), "{:?}", seen);
                }
                (got, want) => prop_assert_eq!(got, want),
            }
        }
    }

    /// An ambiguous body boundary is refused; the request hidden behind it never surfaces.
    #[test]
    fn fuzz_smuggled_requests_never_surface(
        case in smuggle(),
        app in app(),
        split in split(),
        eof in any::<bool>(),
    ) {
        let input = smuggling_input(&case);
        let seen = run(Limits::default(), app, &input, &split, eof);
        let requests: Vec<&Parsed> = seen
            .iter()
            .filter_map(|o| match o {
                Obs::Ev(Ev::Req(r)) => Some(&**r),
                _ => None,
            })
            .collect();
        prop_assert!(requests.iter().all(|r| r.raw_path == "/first"), "{:?}", seen);
        match case {
            Smuggle::Head { .. } | Smuggle::ChunkedHttp10 => {
                prop_assert_eq!(&seen[..], &[Obs::Ev(Ev::Error(400))][..]);
            }
            Smuggle::Chunk(_) => {
                prop_assert_eq!(requests.len(), 1);
                prop_assert!(
                    matches!(
                        seen.last(),
                        Some(Obs::Ev(Ev::Error(400)) | Obs::Drained(Drain::Abandon))
                    ),
                    "{:?}", seen
                );
            }
        }
    }

    /// Whatever the status, headers and body pieces, the response reads back as the body the
    /// app wrote (cut to its Content-Length), with framing and keep-alive in agreement.
    #[test]
    fn fuzz_responses_read_back(case in response_case()) {
        check_response(&case)?;
    }
}
