//! start_response and write(): what the app says about its response, before the body.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyAssertionError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

/// The app's status, headers and anything it passed to write(), shared with the bridge.
///
/// Recycled from request to request (see [`Responders`]), so its buffers are kept and only
/// cleared: a steady stream of requests answers without allocating here.
#[derive(Default)]
pub struct Reply {
    /// The status line's text; meaningful once `started`.
    status: String,
    started: bool,
    /// Every header name and value as latin-1 bytes, ready for the wire, back to back in one
    /// buffer; `spans` says where each pair lies.
    header_bytes: Vec<u8>,
    spans: Vec<HeaderSpan>,
    /// Where a start_response call builds its status and headers before they replace the
    /// ones above: a call that fails leaves the previous ones intact.
    next_status: String,
    next_bytes: Vec<u8>,
    next_spans: Vec<HeaderSpan>,
    /// Set once the head went out: start_response may then only re-raise exc_info.
    pub head_sent: bool,
    /// Bytes the app passed to the legacy write() callable.
    pub written: Vec<u8>,
}

/// Where one header's name and value lie in `Reply::header_bytes`.
#[derive(Clone, Copy)]
pub struct HeaderSpan {
    name: (usize, usize),
    value: (usize, usize),
}

/// Headers answered without a heap list of slices; more spill to one.
const INLINE_HEADERS: usize = 16;

/// Buffers grown past these by one odd response are dropped rather than kept for the next.
const KEEP_HEADER_BYTES: usize = 16 * 1024;
const KEEP_WRITTEN: usize = 64 * 1024;

impl Reply {
    /// The status the app gave, once it called start_response.
    pub fn status(&self) -> Option<&str> {
        self.started.then_some(self.status.as_str())
    }

    /// Calls `f` with the headers as (name, value) byte slices, in the app's order.
    pub fn with_headers<R>(&self, f: impl FnOnce(&[(&[u8], &[u8])]) -> R) -> R {
        let b = &self.header_bytes;
        let pair = |s: &HeaderSpan| (&b[s.name.0..s.name.1], &b[s.value.0..s.value.1]);
        if self.spans.len() <= INLINE_HEADERS {
            let mut inline: [(&[u8], &[u8]); INLINE_HEADERS] = [(&[], &[]); INLINE_HEADERS];
            for (slot, span) in inline.iter_mut().zip(&self.spans) {
                *slot = pair(span);
            }
            f(&inline[..self.spans.len()])
        } else {
            let all: Vec<(&[u8], &[u8])> = self.spans.iter().map(pair).collect();
            f(&all)
        }
    }

    /// Back to the state of a request that has not answered yet. False when the buffers grew
    /// too big to be worth keeping.
    fn reset(&mut self) -> bool {
        self.started = false;
        self.head_sent = false;
        self.status.clear();
        self.header_bytes.clear();
        self.spans.clear();
        self.written.clear();
        self.header_bytes.capacity() <= KEEP_HEADER_BYTES
            && self.next_bytes.capacity() <= KEEP_HEADER_BYTES
            && self.written.capacity() <= KEEP_WRITTEN
    }
}

pub type SharedReply = Arc<Mutex<Reply>>;

pub fn lock(reply: &SharedReply) -> MutexGuard<'_, Reply> {
    reply.lock().unwrap_or_else(|p| p.into_inner())
}

/// PEP 3333 strings are latin-1 "native strings": anything beyond U+00FF is the app's bug.
/// Appends the latin-1 bytes to `out` and returns where they lie.
fn latin1(s: &Bound<'_, PyAny>, what: &str, out: &mut Vec<u8>) -> PyResult<(usize, usize)> {
    let s = s
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a str")))?;
    // Borrowed, not copied: most names and values are ASCII and go to the wire as they are.
    let text = s.to_str()?;
    let start = out.len();
    if text.is_ascii() {
        out.extend_from_slice(text.as_bytes());
        return Ok((start, out.len()));
    }
    for c in text.chars() {
        let Ok(b) = u8::try_from(u32::from(c)) else {
            out.truncate(start);
            return Err(PyTypeError::new_err(format!(
                "{what} must be latin-1 encodable: {text:?}"
            )));
        };
        out.push(b);
    }
    Ok((start, out.len()))
}

/// Fills `status`, `bytes` and `spans` (all empty) from start_response's arguments.
fn convert(
    status: &Bound<'_, PyAny>,
    headers: &Bound<'_, PyAny>,
    status_out: &mut String,
    bytes: &mut Vec<u8>,
    spans: &mut Vec<HeaderSpan>,
) -> PyResult<()> {
    let (start, end) = latin1(status, "status", bytes)?;
    // The status travels as text: latin-1 bytes back to the chars they stand for.
    status_out.extend(bytes[start..end].iter().map(|&b| char::from(b)));
    bytes.clear();
    let list = headers
        .cast::<PyList>()
        .map_err(|_| PyTypeError::new_err("headers must be a list of (name, value) tuples"))?;
    bytes.reserve(64 * list.len());
    spans.reserve(list.len());
    for item in list.iter() {
        let pair = item
            .cast::<PyTuple>()
            .map_err(|_| PyTypeError::new_err("each header must be a (name, value) tuple"))?;
        if pair.len() != 2 {
            return Err(PyTypeError::new_err(
                "each header must be a (name, value) tuple",
            ));
        }
        let name = latin1(&pair.get_item(0)?, "header name", bytes)?;
        let value = latin1(&pair.get_item(1)?, "header value", bytes)?;
        spans.push(HeaderSpan { name, value });
    }
    Ok(())
}

/// The start_response callable; the app receives its bound `start_response` method, which
/// CPython calls without building an argument tuple.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct StartResponse {
    reply: SharedReply,
    writer: Py<Writer>,
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None))]
    fn start_response(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<Writer>> {
        let exc_info = exc_info.filter(|e| !e.is_none());
        let mut guard = lock(&self.reply);
        let reply = &mut *guard;
        if reply.started && exc_info.is_none() {
            return Err(PyAssertionError::new_err(
                "start_response() called a second time without exc_info",
            ));
        }
        if reply.head_sent {
            if let Some(info) = exc_info {
                // PEP 3333: too late to change the response; re-raise the app's error.
                let err = info.cast::<PyTuple>()?.get_item(1)?;
                return Err(PyErr::from_value(err));
            }
        }
        reply.next_status.clear();
        reply.next_bytes.clear();
        reply.next_spans.clear();
        convert(
            status,
            headers,
            &mut reply.next_status,
            &mut reply.next_bytes,
            &mut reply.next_spans,
        )?;
        std::mem::swap(&mut reply.status, &mut reply.next_status);
        std::mem::swap(&mut reply.header_bytes, &mut reply.next_bytes);
        std::mem::swap(&mut reply.spans, &mut reply.next_spans);
        reply.started = true;
        Ok(self.writer.clone_ref(py))
    }
}

/// The write() callable start_response returns (PEP 3333's legacy imperative API).
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct Writer {
    reply: SharedReply,
}

#[pymethods]
impl Writer {
    fn __call__(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = data
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("write() takes bytes"))?;
        let mut reply = lock(&self.reply);
        if !reply.started {
            return Err(PyAssertionError::new_err(
                "write() called before start_response()",
            ));
        }
        reply.written.extend_from_slice(bytes.as_bytes());
        Ok(())
    }
}

/// One request's start_response callable with the reply behind it.
pub struct Responder {
    pub reply: SharedReply,
    start_response: Py<StartResponse>,
    /// `start_response.start_response`, made once: what the app is called with.
    pub callable: Py<PyAny>,
}

impl Responder {
    fn new(py: Python<'_>) -> PyResult<Self> {
        let reply: SharedReply = Arc::default();
        let writer = Py::new(
            py,
            Writer {
                reply: reply.clone(),
            },
        )?;
        let start_response = Py::new(
            py,
            StartResponse {
                reply: reply.clone(),
                writer,
            },
        )?;
        let callable = start_response
            .bind(py)
            .getattr(pyo3::intern!(py, "start_response"))?
            .unbind();
        Ok(Responder {
            reply,
            start_response,
            callable,
        })
    }

    /// Whether only this Responder still refers to its objects: an app that kept its
    /// start_response or write() must not see them serve another request.
    fn unshared(&self, py: Python<'_>) -> bool {
        // The bound method holds one reference to the StartResponse, this Responder another.
        refcount(py, self.callable.as_any()) == 1
            && refcount(py, self.start_response.as_any()) == 2
            && refcount(py, self.start_response.get().writer.as_any()) == 1
    }
}

/// PyO3 deprecates its safe reference-count getter in favour of the raw FFI call, which
/// would need `unsafe` here; the count itself is as reliable either way (the GIL is held).
#[allow(deprecated)]
fn refcount(py: Python<'_>, obj: &Py<PyAny>) -> isize {
    obj.get_refcnt(py)
}

/// Responders whose requests are over, ready for the next ones: creating the Python objects
/// and buffers per request is measurable at hundreds of thousands of requests a second.
#[derive(Default)]
pub struct Responders {
    free: Mutex<Vec<Responder>>,
}

/// More than one only when apps of one server run concurrently (threads); a few cover that.
const KEEP_RESPONDERS: usize = 4;

impl Responders {
    pub fn take(&self, py: Python<'_>) -> PyResult<Responder> {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match free {
            Some(r) => Ok(r),
            None => Responder::new(py),
        }
    }

    /// Gives a Responder back once its request is over; kept only if nothing else holds on
    /// to it and it did not grow too big.
    pub fn give_back(&self, py: Python<'_>, responder: Responder) {
        if !responder.unshared(py) || !lock(&responder.reply).reset() {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < KEEP_RESPONDERS {
            free.push(responder);
        }
    }
}
