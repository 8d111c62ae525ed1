//! What a finished request tells the access log and the metrics; with both off, a request
//! costs nothing here, not even a clock read.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::http::{push_log_time_now, Request};
use crate::metrics::Slot;

use super::access_log::{AccessFacts, AccessFormat, DEFAULT_FORMAT};
use super::environ::{Peer, PeerHost};
use super::start_response::{lock, Reply, SharedReply};

/// How long a verdict on the access logger's configuration holds: a change a user makes at
/// runtime (a handler, a filter, a level, a dictConfig) governs every line from at most this
/// long after it. Asking `logging` per request would cost about what the fast path saves.
const RECHECK: Duration = Duration::from_millis(100);

/// logging.INFO.
const INFO: u8 = 20;

struct AccessLog {
    /// logging.Logger "uringserve.access".
    logger: Py<PyAny>,
    /// uringserve.logs.default_access_encoding, which says whether `logger` is in its default
    /// state (see `Route`).
    probe: Py<PyAny>,
    format: AccessFormat,
    route: Mutex<Verdict>,
}

/// Where lines go, decided at `checked` for the next `RECHECK`.
struct Verdict {
    checked: Option<Instant>,
    route: Route,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Route {
    /// Through `logging`, which then decides everything.
    Logging,
    /// The logger is exactly as logs.default_handlers left it: one AccessStreamHandler with
    /// its "%(message)s" formatter on fd 2, nothing filtering, INFO enabled. The line plus
    /// "\n" goes to fd 2 from here, the bytes that handler would write, in one write(2) and
    /// unbuffered (as the error log's StreamHandler flushes each record, the two stay in
    /// order). `utf8` false: stderr has another codec, so only ASCII lines are written here.
    Stderr { utf8: bool },
}

pub struct Observer {
    access: Option<AccessLog>,
    metrics: Option<Slot>,
}

/// Parses an access log format the way the server will (`{NAME}e` from the environment).
pub fn parse_format(format: &str) -> Result<AccessFormat, super::access_log::FormatError> {
    AccessFormat::parse(format, |name| std::env::var(name).ok())
}

/// Raises ValueError saying what is wrong with an access log format.
#[pyfunction]
pub fn check_access_log_format(format: &str) -> PyResult<()> {
    parse_format(format)?;
    Ok(())
}

impl Observer {
    /// `format` None is gunicorn's default (the combined log format).
    pub fn new(
        py: Python<'_>,
        access_log: bool,
        format: Option<&str>,
        metrics: Option<Slot>,
    ) -> PyResult<Self> {
        // Checked even with the log off: a bad format is a mistake to report, not to hide.
        let format = parse_format(format.unwrap_or(DEFAULT_FORMAT))?;
        let access = if access_log {
            let logger = py
                .import("logging")?
                .call_method1("getLogger", ("uringserve.access",))?
                .unbind();
            let probe = py
                .import("uringserve.logs")?
                .getattr("default_access_encoding")?
                .unbind();
            Some(AccessLog {
                logger,
                probe,
                format,
                route: Mutex::new(Verdict {
                    checked: None,
                    route: Route::Logging,
                }),
            })
        } else {
            None
        };
        Ok(Observer { access, metrics })
    }

    pub fn metrics(&self) -> Option<&Slot> {
        self.metrics.as_ref()
    }

    /// When a request starts, if anything will want to know how long it took.
    pub fn start(&self) -> Option<Instant> {
        (self.access.is_some() || self.metrics.is_some()).then(Instant::now)
    }

    /// Counts a request the HTTP core refused before any app saw it (400, 413, 431...). It
    /// was answered at once, so it lands in the lowest duration bucket; it is not
    /// access-logged, as gunicorn does not log requests it cannot parse.
    pub fn rejected(&self, status: u16) {
        if let Some(slot) = &self.metrics {
            slot.record(status, Duration::ZERO);
        }
    }

    /// Logs and counts one answered request: `failed` is the status sent for a failure, else
    /// the app's own; `bytes` the response bytes produced for it.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        py: Python<'_>,
        started: Instant,
        req: &Request,
        peer: &Peer,
        failed: Option<u16>,
        bytes: u64,
        reply: &SharedReply,
    ) {
        let now = Instant::now();
        let took = now.saturating_duration_since(started);
        let reply = lock(reply);
        let status = failed.unwrap_or_else(|| {
            let code = reply.status().and_then(|s| s.get(..3));
            code.and_then(|c| c.parse().ok()).unwrap_or(500)
        });
        if let Some(slot) = &self.metrics {
            slot.record(status, took);
        }
        let Some(access) = &self.access else {
            return;
        };
        let facts = Finished {
            req,
            peer: &peer.host,
            status,
            bytes,
            took,
            // Copied only when the format shows them: the reply lends its headers to a closure.
            response: access
                .format
                .response_fields()
                .map(|name| (name, response_field(&reply, name)))
                .collect(),
        };
        let mut line = String::with_capacity(160);
        access.format.render(&facts, push_log_time_now, &mut line);
        drop(facts);
        drop(reply);
        access.log(py, now, line);
    }
}

impl AccessLog {
    fn log(&self, py: Python<'_>, now: Instant, mut line: String) {
        if let Route::Stderr { utf8 } = self.route(py, now) {
            if utf8 || line.is_ascii() {
                line.push('\n');
                // Unbuffered: one write(2). Should it fail, logging gets the line, and reports
                // the failure its own way (a StreamHandler's handleError).
                if std::io::stderr().write_all(line.as_bytes()).is_ok() {
                    return;
                }
                line.pop();
            }
        }
        // A failing handler must not fail the request: logging reports its handlers' errors,
        // and what escapes it (a filter or record factory that raises) is reported here.
        if let Err(err) = self.through_logging(py, line) {
            err.write_unraisable(py, Some(self.logger.bind(py)));
        }
    }

    /// What `logger.info(line)` does, without looking for the caller (this call comes from
    /// Rust, so the record's file, line and function were never the user's anyway).
    fn through_logging(&self, py: Python<'_>, line: String) -> PyResult<()> {
        let logger = self.logger.bind(py);
        if !logger
            .call_method1(intern!(py, "isEnabledFor"), (INFO,))?
            .is_truthy()?
        {
            return Ok(());
        }
        let record = logger.call_method1(
            intern!(py, "makeRecord"),
            (
                intern!(py, "uringserve.access"),
                INFO,
                intern!(py, "(unknown file)"),
                0,
                line,
                PyTuple::empty(py),
                py.None(),
            ),
        )?;
        logger.call_method1(intern!(py, "handle"), (record,))?;
        Ok(())
    }

    /// The route for a line logged at `now`: the last verdict if younger than `RECHECK`.
    fn route(&self, py: Python<'_>, now: Instant) -> Route {
        {
            let verdict = self.lock_verdict();
            let fresh = verdict
                .checked
                .is_some_and(|at| now.saturating_duration_since(at) < RECHECK);
            if fresh {
                return verdict.route;
            }
        }
        // Not under the lock: Python may switch threads inside the probe, and another thread
        // waiting here with the GIL would then wait forever.
        let route = self.probe(py);
        *self.lock_verdict() = Verdict {
            checked: Some(now),
            route,
        };
        route
    }

    fn lock_verdict(&self) -> std::sync::MutexGuard<'_, Verdict> {
        self.route.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn probe(&self, py: Python<'_>) -> Route {
        let codec = self
            .probe
            .call1(py, (self.logger.bind(py),))
            .and_then(|c| c.extract::<Option<String>>(py));
        match codec {
            Ok(Some(codec)) => Route::Stderr {
                utf8: codec == "utf-8",
            },
            Ok(None) => Route::Logging,
            Err(err) => {
                // A bug in the probe, not a logging configuration: said, and logging decides.
                err.write_unraisable(py, Some(self.probe.bind(py)));
                Route::Logging
            }
        }
    }
}

struct Finished<'a> {
    req: &'a Request,
    peer: &'a PeerHost,
    status: u16,
    bytes: u64,
    took: Duration,
    response: Vec<(&'a str, Option<Vec<u8>>)>,
}

fn response_field(reply: &Reply, name: &str) -> Option<Vec<u8>> {
    reply.with_headers(|headers| {
        let found = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()));
        found.map(|(_, v)| v.to_vec())
    })
}

impl AccessFacts for Finished<'_> {
    fn write_peer(&self, out: &mut String) {
        match self.peer {
            PeerHost::Name(name) if name.is_empty() => out.push('-'),
            // PeerHost's Display (the environ's REMOTE_ADDR); writing to a String cannot fail.
            host => {
                let _ = write!(out, "{host}");
            }
        }
    }
    fn method(&self) -> &str {
        self.req.method()
    }
    fn target(&self) -> &str {
        self.req.target()
    }
    fn path(&self) -> &str {
        self.req.raw_path()
    }
    fn query(&self) -> &str {
        self.req.query()
    }
    fn protocol(&self) -> &str {
        self.req.version.as_str()
    }
    fn status(&self) -> u16 {
        self.status
    }
    fn bytes(&self) -> u64 {
        self.bytes
    }
    fn duration(&self) -> Duration {
        self.took
    }
    fn request_header(&self, name: &str) -> Option<&[u8]> {
        self.req.header(name)
    }
    fn response_header(&self, name: &str) -> Option<&[u8]> {
        let (_, value) = self.response.iter().find(|(n, _)| *n == name)?;
        value.as_deref()
    }
}
