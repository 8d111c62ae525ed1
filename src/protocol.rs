//! HttpProtocol: one connection's bytes in, response bytes out, through the HTTP core and
//! the WSGI bridge. Both the io_uring and the epoll loop drive it, so they behave alike.

use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::http::{Connection, Drain, Event, Limits, Request};
use crate::wsgi::app::WsgiApp;
use crate::wsgi::environ::ServerInfo;

/// A request body the app never read is drained up to this much; past it, the connection closes.
const DRAIN_LIMIT: u64 = 64 * 1024;

/// A WSGI app with its server's settings: what every connection of one server shares.
#[pyclass(module = "uringserve._uringserve", frozen, name = "WsgiApp")]
pub struct PyWsgiApp {
    app: WsgiApp,
    limits: Limits,
}

#[pymethods]
impl PyWsgiApp {
    #[new]
    #[pyo3(signature = (
        app, server_name, server_port, *, url_scheme = "http", access_log = true,
        multiprocess = false, max_body_size = 1_073_741_824, max_request_line = 8192,
        max_header_bytes = 65536, max_headers = 100
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        app: Py<PyAny>,
        server_name: String,
        server_port: u16,
        url_scheme: &str,
        access_log: bool,
        multiprocess: bool,
        max_body_size: u64,
        max_request_line: usize,
        max_header_bytes: usize,
        max_headers: usize,
    ) -> PyResult<Self> {
        let url_scheme = match url_scheme {
            "http" => "http",
            "https" => "https",
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "url_scheme must be 'http' or 'https', not {other:?}"
                )))
            }
        };
        let info = ServerInfo {
            server_name,
            server_port,
            url_scheme,
            software: format!("uringserve/{}", env!("CARGO_PKG_VERSION")),
            multiprocess,
        };
        Ok(PyWsgiApp {
            app: WsgiApp::new(py, app, &info, access_log)?,
            limits: Limits {
                max_request_line,
                max_header_bytes,
                max_headers,
                max_body_size,
            },
        })
    }
}

struct State {
    conn: Connection,
    pending: Option<Request>,
    body: Vec<u8>,
    /// Response bytes of one feed; kept so each feed reuses the allocation.
    out: Vec<u8>,
    closing: bool,
}

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct HttpProtocol {
    app: Py<PyWsgiApp>,
    peer: (String, u16),
    state: Mutex<State>,
}

impl HttpProtocol {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns buffered input into events, answering each complete request in order, and
    /// returns the response bytes produced.
    fn process<'py>(&self, py: Python<'py>, st: &mut State) -> Bound<'py, PyBytes> {
        let mut out = std::mem::take(&mut st.out);
        out.clear();
        self.answer(py, st, &mut out);
        let bytes = PyBytes::new(py, &out);
        st.out = out;
        bytes
    }

    fn answer(&self, py: Python<'_>, st: &mut State, out: &mut Vec<u8>) {
        let app = self.app.get();
        while !st.closing {
            match st.conn.next_event() {
                Event::Request(req) => {
                    // The body is gathered before the app runs, so a client waiting for
                    // 100 Continue is told to send it as soon as its head is here.
                    st.conn.send_continue(out);
                    st.body.clear();
                    st.pending = Some(req);
                }
                Event::Data(data) => st.body.extend_from_slice(data),
                Event::EndOfMessage => {
                    let Some(req) = st.pending.take() else {
                        continue;
                    };
                    let body = std::mem::take(&mut st.body);
                    app.app
                        .respond(py, &mut st.conn, &req, body, &self.peer, out);
                }
                Event::Paused => {
                    if st.conn.drain_body(DRAIN_LIMIT) == Drain::Abandon
                        || !st.conn.start_next_cycle()
                    {
                        st.closing = true;
                    }
                }
                Event::NeedData => break,
                Event::ConnectionClosed => st.closing = true,
                Event::Error(err) => {
                    st.conn.send_error(err.status, out);
                    st.closing = true;
                }
            }
        }
    }
}

#[pymethods]
impl HttpProtocol {
    #[new]
    fn new(app: Py<PyWsgiApp>, peer_host: String, peer_port: u16) -> Self {
        let limits = app.get().limits;
        HttpProtocol {
            app,
            peer: (peer_host, peer_port),
            state: Mutex::new(State {
                conn: Connection::new(limits),
                pending: None,
                body: Vec::new(),
                out: Vec::new(),
                closing: false,
            }),
        }
    }

    /// Feeds bytes from the peer; returns the bytes to send back (possibly empty).
    fn feed<'py>(&self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        let mut st = self.state();
        if st.closing {
            return PyBytes::new(py, b"");
        }
        st.conn.receive(data);
        self.process(py, &mut st)
    }

    /// The peer closed its side; returns any last bytes to send.
    fn feed_eof<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut st = self.state();
        if st.closing {
            return PyBytes::new(py, b"");
        }
        st.conn.receive_eof();
        let bytes = self.process(py, &mut st);
        st.closing = true;
        bytes
    }

    /// True once the connection must close after the bytes returned so far are sent.
    #[getter]
    fn closing(&self) -> bool {
        self.state().closing
    }
}
