//! WsgiApp (an app with its server's settings) and HttpProtocol: the epoll loop's handle on
//! one connection, bytes in and response bytes out, through the same session as io_uring's.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyOSError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::deadline::{Phase, Timer};
use crate::errors::BodyError;
use crate::http::Limits;
use crate::session::Session;
use crate::transport::{lock_io, ConnIo, SharedIo, Transport};
use crate::wsgi::app::WsgiApp;
use crate::wsgi::environ::{Peer, PeerHost, ServerInfo};

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

impl PyWsgiApp {
    pub fn app(&self) -> &WsgiApp {
        &self.app
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// The epoll loop's side of [`Transport`]: a Python object with `pull()` (bytes, b"" at EOF;
/// TimeoutError when the body stalls) and `send_now(data)`.
struct PyTransport {
    obj: Py<PyAny>,
}

impl Transport for PyTransport {
    fn send_now(&self, py: Python<'_>, _io: &SharedIo, bytes: Vec<u8>) -> Result<(), BodyError> {
        self.obj
            .call_method1(py, "send_now", (PyBytes::new(py, &bytes),))?;
        Ok(())
    }

    fn pull(&self, py: Python<'_>, io: &SharedIo) -> Result<(), BodyError> {
        let data = match self.obj.call_method0(py, "pull") {
            Ok(data) => data,
            Err(err) if err.is_instance_of::<PyTimeoutError>(py) => return Err(err.into()),
            Err(err) if err.is_instance_of::<PyOSError>(py) => {
                lock_io(io).conn.receive_eof();
                let errno = err
                    .value(py)
                    .getattr("errno")
                    .and_then(|e| e.extract::<Option<i32>>())
                    .ok()
                    .flatten();
                return Err(BodyError::Disconnected(errno));
            }
            Err(err) => return Err(err.into()),
        };
        let data = data.bind(py).cast::<PyBytes>().map_err(PyErr::from)?;
        let mut io = lock_io(io);
        if data.as_bytes().is_empty() {
            io.conn.receive_eof();
        } else {
            io.conn.receive(data.as_bytes());
        }
        Ok(())
    }
}

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct HttpProtocol {
    app: Py<PyWsgiApp>,
    transport: Arc<dyn Transport>,
    session: Mutex<Session>,
    /// Which timeout the connection is under; the loop keeps the deadlines themselves.
    phase: Mutex<Phase>,
}

fn timer_name(timer: Timer) -> &'static str {
    match timer {
        Timer::Keep => "keep",
        Timer::Stop => "stop",
        Timer::Start(kind) => kind.name(),
    }
}

impl HttpProtocol {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn session(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn process<'py>(&self, py: Python<'py>, session: &mut Session) -> Bound<'py, PyBytes> {
        session.advance(py, self.app.get().app(), &self.transport);
        let mut io = lock_io(&session.io);
        let bytes = PyBytes::new(py, &io.out);
        io.clear_out();
        bytes
    }
}

#[pymethods]
impl HttpProtocol {
    #[new]
    fn new(app: Py<PyWsgiApp>, peer_host: String, peer_port: u16, transport: Py<PyAny>) -> Self {
        let io = ConnIo::shared(app.get().limits, -1);
        let transport: Arc<dyn Transport> = Arc::new(PyTransport { obj: transport });
        let peer = Peer::new(PeerHost::Name(peer_host.into()), peer_port);
        HttpProtocol {
            app,
            transport,
            session: Mutex::new(Session::new(io, peer)),
            phase: Mutex::new(Phase::opened().0),
        }
    }

    /// Which deadline applies after feed(), feed_eof() or resume(): "header", "keep_alive"
    /// or "body" to start that timeout afresh, "keep" to leave the running one, "stop" for
    /// none. `unsent` says response bytes still wait to be sent. A new connection is under
    /// "header" from its accept.
    fn timer(&self, unsent: bool) -> &'static str {
        let awaiting = self.session().awaiting();
        timer_name(self.phase().after_turn(awaiting, unsent))
    }

    /// Everything returned so far has been sent: "keep_alive" if the connection now idles,
    /// else "keep".
    fn flushed(&self) -> &'static str {
        timer_name(self.phase().flushed())
    }

    /// Feeds bytes from the peer; returns the bytes to send back (possibly empty).
    fn feed<'py>(&self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        let mut session = self.session();
        if session.closing() {
            return PyBytes::new(py, b"");
        }
        lock_io(&session.io).conn.receive(data);
        self.process(py, &mut session)
    }

    /// The peer closed its side; returns any last bytes to send.
    fn feed_eof<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut session = self.session();
        if session.closing() {
            return PyBytes::new(py, b"");
        }
        lock_io(&session.io).conn.receive_eof();
        let bytes = self.process(py, &mut session);
        session.close();
        bytes
    }

    /// Answers requests that were held back while output piled up; call it once the bytes
    /// returned so far have been sent. Returns more bytes to send.
    fn resume<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut session = self.session();
        if session.closing() || !session.held_back() {
            return PyBytes::new(py, b"");
        }
        self.process(py, &mut session)
    }

    /// True when requests wait for `resume()` because output piled up.
    #[getter]
    fn held_back(&self) -> bool {
        self.session().held_back()
    }

    /// True once the connection must close after the bytes returned so far are sent.
    #[getter]
    fn closing(&self) -> bool {
        self.session().closing()
    }
}
