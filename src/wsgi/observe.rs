//! What a finished request tells the access log and the metrics; with both off, a request
//! costs nothing here, not even a clock read.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use pyo3::intern;
use pyo3::prelude::*;

use crate::http::{push_log_time_now, Request};
use crate::metrics::Slot;

use super::access_log::{AccessFacts, AccessFormat, DEFAULT_FORMAT};
use super::environ::{Peer, PeerHost};
use super::start_response::{lock, Reply, SharedReply};

struct AccessLog {
    /// logging.Logger "uringserve.access".
    logger: Py<PyAny>,
    format: AccessFormat,
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
            Some(AccessLog { logger, format })
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
        let took = started.elapsed();
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
        // A failing handler must not fail the request; logging reports its own errors.
        let _ = access.logger.call_method1(py, intern!(py, "info"), (line,));
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
            PeerHost::Name(name) => out.push_str(name),
            PeerHost::Ip(ip) => {
                // Writing to a String cannot fail.
                let _ = write!(out, "{ip}");
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
