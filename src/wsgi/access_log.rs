//! Access log lines in gunicorn's format language (`%(h)s %(r)s %(s)s ...`), parsed once.

use std::fmt::Write as _;
use std::time::Duration;

use base64::prelude::{Engine as _, BASE64_STANDARD};

/// gunicorn's default: the Apache combined log format.
pub const DEFAULT_FORMAT: &str = r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#;

/// What one finished request tells the access log.
pub trait AccessFacts {
    /// Appends the peer's address as text ("-" when unknown); the log escapes it after.
    fn write_peer(&self, out: &mut String);
    fn method(&self) -> &str;
    /// The request target as sent.
    fn target(&self) -> &str;
    /// The path before `?`, as sent (still percent-encoded).
    fn path(&self) -> &str;
    fn query(&self) -> &str;
    fn protocol(&self) -> &str;
    fn status(&self) -> u16;
    /// Body bytes of the response, as gunicorn counts them: no head, no chunk framing.
    fn bytes(&self) -> u64;
    fn duration(&self) -> Duration;
    /// The first request field named `name` (lower case), as sent.
    fn request_header(&self, name: &str) -> Option<&[u8]>;
    /// The first response field named `name` (lower case), as the app gave it.
    fn response_header(&self, name: &str) -> Option<&[u8]>;
}

#[derive(Debug, Clone, PartialEq)]
enum Atom {
    Host,
    Dash,
    User,
    Time,
    RequestLine,
    Method,
    Path,
    Query,
    Protocol,
    Status,
    Bytes,
    BytesOrDash,
    Referer,
    UserAgent,
    Seconds,
    Millis,
    Micros,
    DecimalSeconds,
    RequestHeader(String),
    ResponseHeader(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Atom(Atom),
}

/// A parsed format; rendering it allocates nothing beyond the line it appends to.
#[derive(Debug, Clone)]
pub struct AccessFormat {
    parts: Vec<Part>,
}

/// Why a format string was refused, said the way the user wrote it.
#[derive(Debug, PartialEq)]
pub struct FormatError(pub String);

const KNOWN: &str = "h l u t r m U q H s B b f a T M D L p {header}i {header}o {variable}e";

impl AccessFormat {
    /// Parses `%(name)s` atoms (`d` is accepted for numbers too) and `%%`. `{name}e` and `p`
    /// are fixed for the process, so they are resolved here, through `env`.
    pub fn parse(format: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, FormatError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = format;
        while let Some(at) = rest.find('%') {
            text.push_str(&rest[..at]);
            rest = &rest[at + 1..];
            if let Some(after) = rest.strip_prefix('%') {
                text.push('%');
                rest = after;
                continue;
            }
            let Some(body) = rest.strip_prefix('(') else {
                return Err(FormatError(format!(
                    "access log format {format:?}: a '%' must start %(name)s or be written %%"
                )));
            };
            let Some(close) = body.find(')') else {
                return Err(FormatError(format!(
                    "access log format {format:?}: unclosed %( ... )"
                )));
            };
            let name = &body[..close];
            let after = &body[close + 1..];
            let conversion = after.chars().next();
            if !matches!(conversion, Some('s') | Some('d')) {
                return Err(FormatError(format!(
                    "access log format {format:?}: %({name}) must end in 's' (as in %({name})s)"
                )));
            }
            rest = &after[1..];
            match atom(name) {
                Some(Resolved::Atom(a)) => {
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Atom(a));
                }
                Some(Resolved::Pid) => text.push_str(&format!("<{}>", std::process::id())),
                Some(Resolved::Env(var)) => {
                    text.push_str(env(&var.to_ascii_uppercase()).as_deref().unwrap_or("-"))
                }
                None => {
                    return Err(FormatError(format!(
                        "access log format {format:?}: unknown atom %({name})s; known: {KNOWN}"
                    )))
                }
            }
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(AccessFormat { parts })
    }

    /// The response fields the format shows (`%({name}o)s`), lower case.
    pub fn response_fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Atom(Atom::ResponseHeader(name)) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Appends the line for one request to `out`. `now` appends the local time, formatted as
    /// `[21/Nov/2026:09:13:24 +0000]`; it is only called when the format shows it.
    pub fn render(&self, facts: &impl AccessFacts, now: impl Fn(&mut String), out: &mut String) {
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Atom(a) => render_atom(a, facts, &now, out),
            }
        }
    }
}

enum Resolved {
    Atom(Atom),
    Pid,
    Env(String),
}

fn atom(name: &str) -> Option<Resolved> {
    let simple = match name {
        "h" => Atom::Host,
        "l" => Atom::Dash,
        "u" => Atom::User,
        "t" => Atom::Time,
        "r" => Atom::RequestLine,
        "m" => Atom::Method,
        "U" => Atom::Path,
        "q" => Atom::Query,
        "H" => Atom::Protocol,
        "s" => Atom::Status,
        "B" => Atom::Bytes,
        "b" => Atom::BytesOrDash,
        "f" => Atom::Referer,
        "a" => Atom::UserAgent,
        "T" => Atom::Seconds,
        "M" => Atom::Millis,
        "D" => Atom::Micros,
        "L" => Atom::DecimalSeconds,
        "p" => return Some(Resolved::Pid),
        _ => {
            let inner = name.strip_prefix('{')?;
            let (key, kind) = inner.split_once('}')?;
            if key.is_empty() {
                return None;
            }
            let key = key.to_ascii_lowercase();
            return match kind {
                "i" => Some(Resolved::Atom(Atom::RequestHeader(key))),
                "o" => Some(Resolved::Atom(Atom::ResponseHeader(key))),
                "e" => Some(Resolved::Env(key)),
                _ => None,
            };
        }
    };
    Some(Resolved::Atom(simple))
}

/// Field values are bytes on the wire; the log is text, so anything else is escaped.
fn push_field(value: Option<&[u8]>, out: &mut String) {
    match value {
        None => out.push('-'),
        Some(v) => match std::str::from_utf8(v) {
            Ok(s) => push_escaped(s, out),
            Err(_) => {
                for &b in v {
                    match b {
                        b'"' => out.push_str("\\\""),
                        b'\\' => out.push_str("\\\\"),
                        b' ' => out.push(' '),
                        b if b.is_ascii_graphic() => out.push(b as char),
                        b => {
                            let _ = write!(out, "\\x{b:02x}");
                        }
                    }
                }
            }
        },
    }
}

/// Quotes and control characters would let a client forge log lines or fields.
fn needs_escape(c: char) -> bool {
    c == '"' || c == '\\' || c.is_control()
}

fn push_escaped(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

fn basic_auth_user(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, creds) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64_STANDARD.decode(creds.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(
        text.split_once(':')
            .map_or(text.clone(), |(u, _)| u.to_owned()),
    )
}

fn render_atom(atom: &Atom, f: &impl AccessFacts, now: &impl Fn(&mut String), out: &mut String) {
    match atom {
        Atom::Host => {
            // Written in place, then escaped only if it has to be: an address needs no
            // string of its own per request.
            let start = out.len();
            f.write_peer(out);
            if out[start..].chars().any(needs_escape) {
                let raw = out.split_off(start);
                push_escaped(&raw, out);
            }
        }
        Atom::Dash => out.push('-'),
        Atom::User => match f.request_header("authorization").and_then(basic_auth_user) {
            Some(user) => push_escaped(&user, out),
            None => out.push('-'),
        },
        Atom::Time => now(out),
        Atom::RequestLine => {
            push_escaped(f.method(), out);
            out.push(' ');
            push_escaped(f.target(), out);
            out.push(' ');
            out.push_str(f.protocol());
        }
        Atom::Method => push_escaped(f.method(), out),
        Atom::Path => push_escaped(f.path(), out),
        Atom::Query => push_escaped(f.query(), out),
        Atom::Protocol => out.push_str(f.protocol()),
        Atom::Status => {
            let _ = write!(out, "{}", f.status());
        }
        Atom::Bytes => {
            let _ = write!(out, "{}", f.bytes());
        }
        Atom::BytesOrDash => match f.bytes() {
            0 => out.push('-'),
            n => {
                let _ = write!(out, "{n}");
            }
        },
        Atom::Referer => push_field(f.request_header("referer"), out),
        Atom::UserAgent => push_field(f.request_header("user-agent"), out),
        Atom::Seconds => {
            let _ = write!(out, "{}", f.duration().as_secs());
        }
        Atom::Millis => {
            let _ = write!(out, "{}", f.duration().as_millis());
        }
        Atom::Micros => {
            let _ = write!(out, "{}", f.duration().as_micros());
        }
        Atom::DecimalSeconds => {
            let _ = write!(out, "{:.6}", f.duration().as_secs_f64());
        }
        Atom::RequestHeader(name) => push_field(f.request_header(name), out),
        Atom::ResponseHeader(name) => push_field(f.response_header(name), out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Facts {
        peer: &'static str,
        headers: Vec<(&'static str, &'static [u8])>,
    }

    impl AccessFacts for Facts {
        fn write_peer(&self, out: &mut String) {
            out.push_str(self.peer);
        }
        fn method(&self) -> &str {
            "GET"
        }
        fn target(&self) -> &str {
            "/a%20b?x=1"
        }
        fn path(&self) -> &str {
            "/a%20b"
        }
        fn query(&self) -> &str {
            "x=1"
        }
        fn protocol(&self) -> &str {
            "HTTP/1.1"
        }
        fn status(&self) -> u16 {
            200
        }
        fn bytes(&self) -> u64 {
            42
        }
        fn duration(&self) -> Duration {
            Duration::from_micros(1_234_567)
        }
        fn request_header(&self, name: &str) -> Option<&[u8]> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        }
        fn response_header(&self, name: &str) -> Option<&[u8]> {
            (name == "content-type").then_some(b"text/plain")
        }
    }

    fn line(format: &str, facts: &Facts) -> String {
        let fmt = AccessFormat::parse(format, |k| (k == "HOME").then(|| "/root".into())).unwrap();
        let mut out = String::new();
        fmt.render(
            facts,
            |out| out.push_str("[21/Nov/2026:09:13:24 +0000]"),
            &mut out,
        );
        out
    }

    #[test]
    fn default_format_is_the_combined_log_format() {
        let facts = Facts {
            peer: "127.0.0.1",
            headers: vec![
                ("User-Agent", b"curl/8"),
                ("Referer", b"http://x/"),
                ("Authorization", b"Basic YWxpY2U6c2VjcmV0"),
            ],
        };
        assert_eq!(
            line(DEFAULT_FORMAT, &facts),
            "127.0.0.1 - alice [21/Nov/2026:09:13:24 +0000] \"GET /a%20b?x=1 HTTP/1.1\" 200 42 \
             \"http://x/\" \"curl/8\""
        );
        let bare = Facts {
            peer: "127.0.0.1",
            headers: vec![],
        };
        assert!(line(DEFAULT_FORMAT, &bare).ends_with("200 42 \"-\" \"-\""));
    }

    #[test]
    fn every_atom_renders() {
        let facts = Facts {
            peer: "127.0.0.1",
            headers: vec![("X-Forwarded-For", b"10.0.0.1")],
        };
        assert_eq!(
            line(
                "%(m)s %(U)s %(q)s %(H)s %(s)d %(B)s %(T)s %(M)s %(D)s %(L)s 100%% \
                 %({x-forwarded-for}i)s %({Content-Type}o)s %({home}e)s %({nope}e)s",
                &facts
            ),
            "GET /a%20b x=1 HTTP/1.1 200 42 1 1234 1234567 1.234567 100% 10.0.0.1 text/plain \
             /root -"
        );
        assert_eq!(line("%(p)s", &facts), format!("<{}>", std::process::id()));
    }

    #[test]
    fn client_bytes_cannot_forge_quotes_or_lines() {
        let facts = Facts {
            peer: "127.0.0.1",
            headers: vec![("User-Agent", b"a\"b\\c\x01\xff")],
        };
        assert_eq!(line("%(a)s", &facts), "a\\\"b\\\\c\\x01\\xff");
        // The peer is written in place, then escaped like any other text.
        let odd_peer = Facts {
            peer: "x\"y\n",
            headers: vec![],
        };
        assert_eq!(line("%(h)s %(h)s", &odd_peer), "x\\\"y\\x0a x\\\"y\\x0a");
    }

    #[test]
    fn bad_formats_say_what_is_wrong() {
        let err = |f: &str| AccessFormat::parse(f, |_| None).unwrap_err().0;
        assert!(err("%(zz)s").contains("unknown atom %(zz)s"));
        assert!(err("%(h)").contains("must end in 's'"));
        assert!(err("%(h").contains("unclosed"));
        assert!(err("50% off").contains("%%"));
        assert!(err("%({}i)s").contains("unknown atom"));
    }
}
