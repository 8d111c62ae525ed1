//! start_response and write(): what the app says about its response, before the body.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyAssertionError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

/// The app's status, headers and anything it passed to write(), shared with the bridge.
#[derive(Default)]
pub struct Reply {
    pub status: Option<String>,
    /// Every header name and value as latin-1 bytes, ready for the wire, back to back in one
    /// buffer (one allocation for all of them); `spans` says where each pair lies.
    pub header_bytes: Vec<u8>,
    pub spans: Vec<HeaderSpan>,
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

impl Reply {
    /// The headers as (name, value) byte slices, in the app's order.
    pub fn headers(&self) -> Vec<(&[u8], &[u8])> {
        let b = &self.header_bytes;
        self.spans
            .iter()
            .map(|s| (&b[s.name.0..s.name.1], &b[s.value.0..s.value.1]))
            .collect()
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

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct StartResponse {
    reply: SharedReply,
}

impl StartResponse {
    pub fn new(reply: SharedReply) -> Self {
        StartResponse { reply }
    }
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None))]
    fn __call__(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Writer> {
        let exc_info = exc_info.filter(|e| !e.is_none());
        {
            let reply = lock(&self.reply);
            if reply.status.is_some() && exc_info.is_none() {
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
        }
        let mut status_bytes = Vec::new();
        latin1(status, "status", &mut status_bytes)?;
        let status_text = if status_bytes.is_ascii() {
            String::from_utf8(status_bytes).unwrap_or_default()
        } else {
            status_bytes.iter().map(|&b| char::from(b)).collect()
        };
        let list = headers
            .cast::<PyList>()
            .map_err(|_| PyTypeError::new_err("headers must be a list of (name, value) tuples"))?;
        let mut header_bytes = Vec::with_capacity(64 * list.len());
        let mut spans = Vec::with_capacity(list.len());
        for item in list.iter() {
            let pair = item
                .cast::<PyTuple>()
                .map_err(|_| PyTypeError::new_err("each header must be a (name, value) tuple"))?;
            if pair.len() != 2 {
                return Err(PyTypeError::new_err(
                    "each header must be a (name, value) tuple",
                ));
            }
            let name = latin1(&pair.get_item(0)?, "header name", &mut header_bytes)?;
            let value = latin1(&pair.get_item(1)?, "header value", &mut header_bytes)?;
            spans.push(HeaderSpan { name, value });
        }
        let _ = py;
        let mut reply = lock(&self.reply);
        reply.status = Some(status_text);
        reply.header_bytes = header_bytes;
        reply.spans = spans;
        Ok(Writer {
            reply: self.reply.clone(),
        })
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
        if reply.status.is_none() {
            return Err(PyAssertionError::new_err(
                "write() called before start_response()",
            ));
        }
        reply.written.extend_from_slice(bytes.as_bytes());
        Ok(())
    }
}
