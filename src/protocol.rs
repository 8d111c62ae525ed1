//! WsgiApp (an app with its server's settings) and HttpProtocol: the epoll loop's handle on
//! one connection, bytes in and response bytes out, through the same session as io_uring's.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyOSError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::deadline::{Phase, Timer};
use crate::errors::{BodyError, TlsLoadError};
use crate::handover::HandedOver;
use crate::http::Limits;
use crate::metrics_py::MetricsSlot;
use crate::pool::AppThreads;
use crate::session::Session;
use crate::tls::{self, TlsFilter};
use crate::tls_config::TlsConfig;
use crate::tls_failures;
use crate::transport::{lock_io, ConnIo, SharedIo, Transport};
use crate::wsgi::app::WsgiApp;
use crate::wsgi::environ::{Peer, PeerHost, ServerInfo};
use crate::wsgi::observe::Observer;

/// A WSGI app with its server's settings: what every connection of one server shares.
#[pyclass(module = "uringserve._uringserve", frozen, name = "WsgiApp")]
pub struct PyWsgiApp {
    app: WsgiApp,
    limits: Limits,
    /// Set when connections speak TLS.
    tls: Option<Arc<rustls::ServerConfig>>,
}

#[pymethods]
impl PyWsgiApp {
    #[new]
    #[pyo3(signature = (
        app, server_name, server_port, *, url_scheme = None, access_log = true,
        multiprocess = false, multithread = false, max_body_size = 1_073_741_824, max_request_line = 8192,
        max_header_bytes = 65536, max_headers = 100, tls = None, max_requests = 0,
        access_log_format = None, metrics = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        app: Py<PyAny>,
        server_name: String,
        server_port: u16,
        url_scheme: Option<&str>,
        access_log: bool,
        multiprocess: bool,
        multithread: bool,
        max_body_size: u64,
        max_request_line: usize,
        max_header_bytes: usize,
        max_headers: usize,
        tls: Option<PyRef<'_, TlsConfig>>,
        max_requests: u64,
        access_log_format: Option<&str>,
        metrics: Option<PyRef<'_, MetricsSlot>>,
    ) -> PyResult<Self> {
        let url_scheme = match url_scheme.unwrap_or(if tls.is_some() { "https" } else { "http" }) {
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
            multithread,
        };
        let metrics = metrics.map(|m| m.slot.clone());
        let observer = Observer::new(py, access_log, access_log_format, metrics)?;
        let mut app = WsgiApp::new(py, app, &info, observer)?;
        app.max_requests = max_requests;
        Ok(PyWsgiApp {
            app,
            limits: Limits {
                max_request_line,
                max_header_bytes,
                max_headers,
                max_body_size,
            },
            tls: tls.map(|t| t.server_config().clone()),
        })
    }

    /// The metrics slot its requests are counted in, if any.
    #[getter]
    fn metrics(&self) -> Option<MetricsSlot> {
        let slot = self.app.observer.metrics()?.clone();
        Some(MetricsSlot { slot })
    }

    /// Requests taken so far, by every connection of this app.
    #[getter]
    fn requests(&self) -> u64 {
        self.app.requests()
    }
}

impl PyWsgiApp {
    pub fn app(&self) -> &WsgiApp {
        &self.app
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The TLS settings new connections use, when the server speaks TLS.
    pub fn tls(&self) -> Option<&Arc<rustls::ServerConfig>> {
        self.tls.as_ref()
    }
}

/// The epoll loop's side of [`Transport`]: a Python object with `pull()` (bytes, b"" at EOF;
/// TimeoutError when the body stalls) and `send_now(data)`.
struct PyTransport {
    obj: Py<PyAny>,
}

impl Transport for PyTransport {
    fn send_now(&self, py: Python<'_>, io: &SharedIo, bytes: Vec<u8>) -> Result<(), BodyError> {
        let bytes = tls::sealed(&mut lock_io(io), bytes);
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
        let mut guard = lock_io(io);
        if data.as_bytes().is_empty() {
            guard.conn.receive_eof();
            return Ok(());
        }
        let reply = tls::receive_wire(&mut guard, data.as_bytes());
        drop(guard);
        if !reply.is_empty() {
            self.obj
                .call_method1(py, "send_now", (PyBytes::new(py, &reply),))?;
        }
        Ok(())
    }
}

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct HttpProtocol {
    app: Py<PyWsgiApp>,
    transport: Arc<dyn Transport>,
    session: Arc<Mutex<Session>>,
    /// The session's connection state, reachable without the session's lock, which an app
    /// running on a pool thread holds for the whole request.
    io: SharedIo,
    /// Which timeout the connection is under; the loop keeps the deadlines themselves.
    phase: Mutex<Phase>,
    /// Set on a connection handed over by an io_uring loop while its app call ran on one of
    /// that loop's app threads: the next `advance()` waits for that turn first.
    handed_turn: Mutex<Option<Arc<AppThreads>>>,
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

    /// Runs the session; returns its output for the wire, after `reply` (records the TLS
    /// session owes the peer, always empty without TLS).
    fn process<'py>(
        &self,
        py: Python<'py>,
        session: &mut Session,
        reply: Vec<u8>,
    ) -> Bound<'py, PyBytes> {
        session.advance(py, self.app.get().app(), &self.transport);
        Self::wire(py, session, reply)
    }

    /// The session's pending output for the wire, after `reply`.
    fn wire<'py>(py: Python<'py>, session: &Session, reply: Vec<u8>) -> Bound<'py, PyBytes> {
        let mut guard = lock_io(&session.io);
        let io = &mut *guard;
        let mut wire = reply;
        let bytes = match io.tls.as_deref_mut() {
            Some(tls) => {
                tls.seal(&io.out, session.closing(), &mut wire);
                PyBytes::new(py, &wire)
            }
            // The usual case: the output is copied straight into the bytes object.
            None if wire.is_empty() => PyBytes::new(py, &io.out),
            None => {
                wire.extend_from_slice(&io.out);
                PyBytes::new(py, &wire)
            }
        };
        io.clear_out();
        bytes
    }

    /// Waits (without the GIL) for the turn that ran on an io_uring app thread when the ring
    /// was given up; then the bytes that ring left unsent. None when there was no such turn.
    fn finish_handed_turn(&self, py: Python<'_>) -> Option<Vec<u8>> {
        let threads = self
            .handed_turn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        py.detach(|| threads.wait_turn(&self.session));
        Some(std::mem::take(&mut lock_io(&self.io).owed))
    }
}

#[pymethods]
impl HttpProtocol {
    #[new]
    fn new(
        app: Py<PyWsgiApp>,
        peer_host: String,
        peer_port: u16,
        transport: Py<PyAny>,
    ) -> PyResult<Self> {
        let io = ConnIo::shared(app.get().limits, -1);
        if let Some(config) = app.get().tls() {
            lock_io(&io).tls = Some(Box::new(
                TlsFilter::new(config).map_err(TlsLoadError::Session)?,
            ));
        }
        let transport: Arc<dyn Transport> = Arc::new(PyTransport { obj: transport });
        let peer = Peer::new(PeerHost::Name(peer_host.into()), peer_port);
        Ok(HttpProtocol {
            app,
            transport,
            session: Arc::new(Mutex::new(Session::new(io.clone(), peer))),
            io,
            phase: Mutex::new(Phase::opened().0),
            handed_turn: Mutex::new(None),
        })
    }

    /// Carries on a connection the io_uring loop handed over: its session (bytes received
    /// and parsed, TLS state, requests so far) and its timing state. Call `advance()` next,
    /// for input that arrived before the hand-over.
    #[staticmethod]
    fn adopt(app: Py<PyWsgiApp>, handed: &HandedOver, transport: Py<PyAny>) -> PyResult<Self> {
        let state = handed.take_state().ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err("this connection was already adopted")
        })?;
        Ok(HttpProtocol {
            app,
            transport: Arc::new(PyTransport { obj: transport }),
            session: state.session,
            io: state.io,
            phase: Mutex::new(state.phase),
            handed_turn: Mutex::new(state.turn),
        })
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
        let (reply, failure) = {
            let mut io = lock_io(&session.io);
            let reply = tls::receive_wire(&mut io, data);
            (reply, tls::take_failure(&mut io))
        };
        if let Some(why) = failure {
            if let Some(slot) = self.app.get().app().observer.metrics() {
                slot.tls_failed();
            }
            tls_failures::log(py, &tls_failures::peer_of(&session.peer), &why);
        }
        self.process(py, &mut session, reply)
    }

    /// The peer closed its side; returns any last bytes to send.
    fn feed_eof<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut session = self.session();
        if session.closing() {
            return PyBytes::new(py, b"");
        }
        lock_io(&session.io).conn.receive_eof();
        let bytes = self.process(py, &mut session, Vec::new());
        session.close();
        bytes
    }

    /// Answers the requests the bytes received so far complete; returns bytes to send. On a
    /// connection handed over while its app call ran on an io_uring app thread, first waits
    /// (without the GIL) for that call, whose output comes first.
    fn advance<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let handed = self.finish_handed_turn(py);
        let mut session = self.session();
        match handed {
            Some(owed) if session.closing() => Self::wire(py, &session, owed),
            _ if session.closing() => PyBytes::new(py, b""),
            owed => self.process(py, &mut session, owed.unwrap_or_default()),
        }
    }

    /// Answers requests that were held back while output piled up; call it once the bytes
    /// returned so far have been sent. Returns more bytes to send.
    fn resume<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut session = self.session();
        if session.closing() || !session.held_back() {
            return PyBytes::new(py, b"");
        }
        self.process(py, &mut session, Vec::new())
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

    /// True between requests with nothing received: a graceful stop may close it at once.
    #[getter]
    fn idle(&self) -> bool {
        let session = self.session();
        !session.closing() && !session.held_back() && lock_io(&session.io).conn.is_idle()
    }

    /// Graceful stop: the current request (if any) is the last one on this connection.
    fn refuse_keep_alive(&self) {
        lock_io(&self.io).conn.refuse_keep_alive();
    }

    /// What to send before the server closes this connection on its own (a timeout, a
    /// graceful stop): close_notify under TLS once the handshake is done, else nothing.
    fn farewell<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &tls::farewell(&mut lock_io(&self.io)))
    }
}
