//! Building the WSGI environ: a template of per-server keys, copied and filled per request.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::http::Request;

use super::file_wrapper::FileWrapper;

/// Keys that are the same for every request on one server.
pub struct ServerInfo {
    pub server_name: String,
    pub server_port: u16,
    pub url_scheme: &'static str,
    pub software: String,
    pub multiprocess: bool,
}

/// The environ dict every request starts from (copied, never shared with an app).
pub fn template<'py>(py: Python<'py>, info: &ServerInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("wsgi.version", PyTuple::new(py, [1, 0])?)?;
    d.set_item("wsgi.url_scheme", info.url_scheme)?;
    d.set_item("wsgi.errors", py.import("sys")?.getattr("stderr")?)?;
    d.set_item("wsgi.multithread", false)?;
    d.set_item("wsgi.multiprocess", info.multiprocess)?;
    d.set_item("wsgi.run_once", false)?;
    d.set_item("wsgi.input_terminated", true)?;
    d.set_item("wsgi.file_wrapper", py.get_type::<FileWrapper>())?;
    d.set_item("SCRIPT_NAME", "")?;
    d.set_item("SERVER_NAME", &info.server_name)?;
    d.set_item("SERVER_PORT", info.server_port.to_string())?;
    d.set_item("SERVER_SOFTWARE", &info.software)?;
    Ok(d)
}

/// Bytes as a latin-1 str: PEP 3333's rule for everything taken from the wire.
pub fn latin1_str<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
    if bytes.is_ascii() {
        // SAFETY-free fast path: ASCII is valid UTF-8.
        return PyString::new(py, std::str::from_utf8(bytes).unwrap_or_default());
    }
    let text: String = bytes.iter().map(|&b| b as char).collect();
    PyString::new(py, &text)
}

/// CGI name of a header: HTTP_ + upper case, '-' as '_'. None for names carrying '_', which a
/// client could use to forge a header that a proxy in front believed it had removed.
fn cgi_name(name: &str) -> Option<String> {
    if name.contains('_') {
        return None;
    }
    let mut key = String::with_capacity(5 + name.len());
    key.push_str("HTTP_");
    key.extend(name.chars().map(|c| {
        if c == '-' {
            '_'
        } else {
            c.to_ascii_uppercase()
        }
    }));
    Some(key)
}

/// Fills a copy of the template with one request's keys.
pub fn build<'py>(
    py: Python<'py>,
    template: &Bound<'py, PyDict>,
    req: &Request,
    peer: &(String, u16),
    input: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let env = template.copy()?;
    env.set_item("REQUEST_METHOD", &req.method)?;
    env.set_item("PATH_INFO", latin1_str(py, &req.path))?;
    env.set_item("QUERY_STRING", &req.query)?;
    env.set_item("RAW_URI", &req.target)?;
    env.set_item("REQUEST_URI", &req.target)?;
    env.set_item("SERVER_PROTOCOL", req.version.as_str())?;
    env.set_item("REMOTE_ADDR", &peer.0)?;
    env.set_item("REMOTE_PORT", peer.1.to_string())?;
    env.set_item("wsgi.input", input)?;
    for (name, value) in &req.headers {
        let key = if name.eq_ignore_ascii_case("content-type") {
            "CONTENT_TYPE".to_owned()
        } else if name.eq_ignore_ascii_case("content-length") {
            "CONTENT_LENGTH".to_owned()
        } else {
            match cgi_name(name) {
                Some(key) => key,
                None => continue,
            }
        };
        let value = latin1_str(py, value);
        match env.get_item(&key)? {
            // Repeated fields are one field with a comma-separated list (RFC 9110, 5.3).
            Some(prev) if key != "CONTENT_LENGTH" => {
                let joined = format!("{},{}", prev.extract::<String>()?, value.to_cow()?);
                env.set_item(&key, joined)?;
            }
            Some(_) => {}
            None => env.set_item(&key, value)?,
        }
    }
    Ok(env)
}
