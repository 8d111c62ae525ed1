//! Byte-table tests for the HTTP core, driven through the public `Connection` API.

mod bodies;
mod cycles;
mod fuzz;
mod requests;
mod responses;

use super::*;

/// A request head as plain owned fields, so tests can build the one they expect and match on
/// its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    method: String,
    target: String,
    raw_path: String,
    path: Vec<u8>,
    query: String,
    version: Version,
    headers: Vec<(String, Vec<u8>)>,
    content_length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
    expect_continue: bool,
}

impl Parsed {
    fn of(r: &Request) -> Parsed {
        Parsed {
            method: r.method().to_owned(),
            target: r.target().to_owned(),
            raw_path: r.raw_path().to_owned(),
            path: r.path().to_vec(),
            query: r.query().to_owned(),
            version: r.version,
            headers: r
                .headers()
                .map(|(n, v)| (n.to_owned(), v.to_vec()))
                .collect(),
            content_length: r.content_length,
            chunked: r.chunked,
            keep_alive: r.keep_alive,
            expect_continue: r.expect_continue,
        }
    }

    fn has_body(&self) -> bool {
        self.chunked || self.content_length.is_some_and(|n| n > 0)
    }
}

/// An owned copy of an [`Event`], so whole sequences can be compared.
#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Req(Box<Parsed>),
    Data(Vec<u8>),
    End,
    NeedData,
    Paused,
    Closed,
    Error(u16),
}

fn owned(event: Event<'_>) -> Ev {
    match event {
        Event::Request(r) => Ev::Req(Box::new(Parsed::of(&r))),
        Event::Data(d) => Ev::Data(d.to_vec()),
        Event::EndOfMessage => Ev::End,
        Event::NeedData => Ev::NeedData,
        Event::Paused => Ev::Paused,
        Event::ConnectionClosed => Ev::Closed,
        Event::Error(e) => Ev::Error(e.status),
    }
}

fn conn_with(limits: Limits, input: &[u8]) -> Connection {
    let mut conn = Connection::new(limits);
    conn.receive(input);
    conn
}

/// Pulls events until the connection needs something from outside (input, a response, or
/// closing); consecutive data events are merged since their split is not significant.
fn drain_events(conn: &mut Connection) -> Vec<Ev> {
    let mut events = Vec::new();
    loop {
        let ev = owned(conn.next_event());
        let stop = matches!(ev, Ev::NeedData | Ev::Paused | Ev::Closed | Ev::Error(_));
        match (events.last_mut(), ev) {
            (Some(Ev::Data(acc)), Ev::Data(more)) => acc.extend_from_slice(&more),
            (_, ev) => events.push(ev),
        }
        if stop {
            return events;
        }
    }
}

/// The first request in `input` under `limits`, or the status it is refused with.
fn parse_with(limits: Limits, input: &[u8]) -> Result<Parsed, u16> {
    let mut conn = conn_with(limits, input);
    match conn.next_event() {
        Event::Request(r) => Ok(Parsed::of(&r)),
        Event::Error(e) => Err(e.status),
        other => panic!(
            "unexpected {other:?} for {:?}",
            String::from_utf8_lossy(input)
        ),
    }
}

fn parse(input: &[u8]) -> Result<Parsed, u16> {
    parse_with(Limits::default(), input)
}

/// Replaces the Date value (the one thing that varies between runs) with `*`.
fn normalize_date(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out).into_owned();
    let mut normalized = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("\r\nDate: ") {
        let value_start = at + "\r\nDate: ".len();
        normalized.push_str(&rest[..value_start]);
        let value_len = rest[value_start..].find("\r\n").unwrap();
        assert_eq!(
            value_len, HTTP_DATE_LEN,
            "Date value has the IMF-fixdate length"
        );
        normalized.push('*');
        rest = &rest[value_start + value_len..];
    }
    normalized.push_str(rest);
    normalized
}

/// Header list with the type `start_response` takes from the Python layer.
fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|&(n, v)| (n.to_owned(), v.to_owned()))
        .collect()
}
