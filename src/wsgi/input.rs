//! wsgi.input: a file-like reader that decodes the request body as the app asks for it,
//! waiting on the loop for bytes that have not arrived yet.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::errors::BodyError;
use crate::http::Event;
use crate::transport::{lock_io, SharedIo, Transport};

/// How much of the decoded body a read needs before it can return.
#[derive(Clone, Copy)]
enum Want {
    Bytes(usize),
    /// Up to and including a newline, or `limit` bytes.
    Line {
        limit: usize,
    },
    All,
}

struct Body {
    io: SharedIo,
    transport: Arc<dyn Transport>,
    /// Decoded bytes the app has not read yet: `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    /// How far `buf[pos..]` is known to hold no newline, so long lines are scanned once.
    scanned: usize,
    /// The body is complete, failed, or its exchange is over: nothing more is decoded.
    ended: bool,
}

impl Body {
    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn satisfied(&mut self, want: Want) -> bool {
        match want {
            Want::Bytes(n) => self.pending().len() >= n,
            Want::Line { limit } => {
                let from = self.scanned;
                let rest = &self.buf[self.pos + from..];
                if rest.contains(&b'\n') {
                    return true;
                }
                self.scanned += rest.len();
                self.pending().len() >= limit
            }
            Want::All => false,
        }
    }

    /// Decodes what the connection already holds. Returns the bytes to send before waiting
    /// for more (100 Continue, and responses queued ahead of it), or None when `want` is met.
    fn decode(&mut self, want: Want) -> Result<Option<Vec<u8>>, BodyError> {
        if self.ended || self.satisfied(want) {
            return Ok(None);
        }
        let shared = self.io.clone();
        let mut guard = lock_io(&shared);
        let io = &mut *guard;
        loop {
            match io.conn.next_event() {
                Event::Data(data) => {
                    if self.pos == self.buf.len() {
                        self.buf.clear();
                        self.pos = 0;
                        self.scanned = 0;
                    }
                    self.buf.extend_from_slice(data);
                    if self.satisfied(want) {
                        return Ok(None);
                    }
                }
                Event::NeedData => break,
                Event::Error(e) => {
                    self.ended = true;
                    return Err(if io.conn.input_ended() {
                        BodyError::Disconnected(None)
                    } else {
                        BodyError::Malformed(e)
                    });
                }
                Event::EndOfMessage
                | Event::Paused
                | Event::ConnectionClosed
                | Event::Request(_) => {
                    self.ended = true;
                    return Ok(None);
                }
            }
        }
        io.arrivals_seen = io.arrivals;
        // The client may be holding its body back until it hears 100 Continue.
        io.conn.send_continue(&mut io.out);
        Ok(Some(io.take_out()))
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.pending().len());
        let start = self.pos;
        self.pos += n;
        self.scanned = 0;
        &self.buf[start..self.pos]
    }

    fn take_line(&mut self, limit: usize) -> &[u8] {
        let rest = self.pending();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1)
            .min(limit);
        self.take(n)
    }
}

/// wsgi.input for a request without a body: one shared, stateless object, so a GET costs
/// no stream of its own.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct EmptyInput;

#[pymethods]
impl EmptyInput {
    #[pyo3(signature = (size = None))]
    fn read<'py>(&self, py: Python<'py>, size: Option<isize>) -> Bound<'py, PyBytes> {
        let _ = size;
        PyBytes::new(py, b"")
    }

    #[pyo3(signature = (size = None))]
    fn readline<'py>(&self, py: Python<'py>, size: Option<isize>) -> Bound<'py, PyBytes> {
        let _ = size;
        PyBytes::new(py, b"")
    }

    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(&self, py: Python<'py>, hint: Option<isize>) -> Bound<'py, PyList> {
        let _ = hint;
        PyList::empty(py)
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self) -> Option<Py<PyBytes>> {
        None
    }
}

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct InputStream {
    body: Mutex<Body>,
}

fn size_arg(size: Option<isize>) -> Option<usize> {
    size.and_then(|s| usize::try_from(s).ok())
}

impl InputStream {
    pub fn new(io: SharedIo, transport: Arc<dyn Transport>) -> Self {
        InputStream {
            body: Mutex::new(Body {
                io,
                transport,
                buf: Vec::new(),
                pos: 0,
                scanned: 0,
                ended: false,
            }),
        }
    }

    fn body(&self) -> MutexGuard<'_, Body> {
        self.body.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends reading once the response is done, so a stream the app kept cannot read into
    /// the next request on the connection.
    pub fn finish(&self) {
        self.body().ended = true;
    }

    /// Decodes until `want` is met or the body ends. The lock is not held while waiting, so
    /// the GIL can be released without another reader thread deadlocking on it.
    fn fill(&self, py: Python<'_>, want: Want) -> PyResult<MutexGuard<'_, Body>> {
        loop {
            let mut body = self.body();
            let Some(early) = body.decode(want)? else {
                return Ok(body);
            };
            let transport = body.transport.clone();
            let io = body.io.clone();
            drop(body);
            if !early.is_empty() {
                transport.send_now(py, &io, early)?;
            }
            transport.pull(py, &io)?;
        }
    }

    fn line<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut body = self.fill(py, Want::Line { limit })?;
        Ok(PyBytes::new(py, body.take_line(limit)))
    }
}

#[pymethods]
impl InputStream {
    #[pyo3(signature = (size = None))]
    fn read<'py>(&self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let want = size_arg(size).map_or(Want::All, Want::Bytes);
        let mut body = self.fill(py, want)?;
        let n = size_arg(size).unwrap_or(usize::MAX);
        Ok(PyBytes::new(py, body.take(n)))
    }

    #[pyo3(signature = (size = None))]
    fn readline<'py>(&self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        self.line(py, size_arg(size).unwrap_or(usize::MAX))
    }

    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(&self, py: Python<'py>, hint: Option<isize>) -> PyResult<Bound<'py, PyList>> {
        let lines = PyList::empty(py);
        let mut total = 0usize;
        loop {
            let line = self.line(py, usize::MAX)?;
            if line.as_bytes().is_empty() {
                break;
            }
            total += line.as_bytes().len();
            lines.append(line)?;
            if size_arg(hint).is_some_and(|h| h > 0 && total >= h) {
                break;
            }
        }
        Ok(lines)
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.line(py, usize::MAX)?;
        Ok((!line.as_bytes().is_empty()).then_some(line))
    }
}
