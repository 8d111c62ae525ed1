//! start_response and write(): what the app says about its response, before the body.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyAssertionError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

/// The app's status, headers and anything it passed to write(), shared with the bridge.
#[derive(Default)]
pub struct Reply {
    pub status: Option<String>,
    /// Names and values as latin-1 bytes, ready for the wire.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Set once the head went out: start_response may then only re-raise exc_info.
    pub head_sent: bool,
    /// Bytes the app passed to the legacy write() callable.
    pub written: Vec<u8>,
}

pub type SharedReply = Arc<Mutex<Reply>>;

pub fn lock(reply: &SharedReply) -> MutexGuard<'_, Reply> {
    reply.lock().unwrap_or_else(|p| p.into_inner())
}

/// PEP 3333 strings are latin-1 "native strings": anything beyond U+00FF is the app's bug.
fn latin1(s: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    let s = s
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a str")))?;
    // Borrowed, not copied: most names and values are ASCII and go to the wire as they are.
    let text = s.to_str()?;
    if text.is_ascii() {
        return Ok(text.as_bytes().to_vec());
    }
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| PyTypeError::new_err(format!("{what} must be latin-1 encodable: {text:?}")))
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
        let status_bytes = latin1(status, "status")?;
        let status_text: String = status_bytes.iter().map(|&b| char::from(b)).collect();
        let list = headers
            .cast::<PyList>()
            .map_err(|_| PyTypeError::new_err("headers must be a list of (name, value) tuples"))?;
        let mut parsed = Vec::with_capacity(list.len());
        for item in list.iter() {
            let pair = item
                .cast::<PyTuple>()
                .map_err(|_| PyTypeError::new_err("each header must be a (name, value) tuple"))?;
            if pair.len() != 2 {
                return Err(PyTypeError::new_err(
                    "each header must be a (name, value) tuple",
                ));
            }
            parsed.push((
                latin1(&pair.get_item(0)?, "header name")?,
                latin1(&pair.get_item(1)?, "header value")?,
            ));
        }
        let _ = py;
        let mut reply = lock(&self.reply);
        reply.status = Some(status_text);
        reply.headers = parsed;
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
