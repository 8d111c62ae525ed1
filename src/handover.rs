//! What a serve loop whose ring turned unhealthy hands to the epoll loop: each open
//! connection with its HTTP session, its timing state and the output the ring did not send.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::deadline::Phase;
use crate::pool::AppThreads;
use crate::session::Session;
use crate::transport::SharedIo;
use crate::uring::close_fd;

/// A connection's state as the loops keep it: the session and which timeout it is under.
pub struct ConnState {
    pub session: Arc<Mutex<Session>>,
    /// The session's connection state, reachable without the session's lock.
    pub io: SharedIo,
    pub phase: Phase,
    /// The app threads on which the session's turn was running when the ring was given up:
    /// the adopting loop waits for that turn before the session's next one.
    pub turn: Option<Arc<AppThreads>>,
}

/// One open connection handed over; `HttpProtocol.adopt` takes its state. Until then it owns
/// the fd, and closes it if it is never adopted.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct HandedOver {
    #[pyo3(get)]
    fd: i32,
    unsent: Vec<u8>,
    /// The running timeout's name and the seconds left until it falls due.
    timer: Option<(&'static str, f64)>,
    /// The deadline passed while the connection's input waited for its turn.
    #[pyo3(get)]
    overdue: bool,
    state: Mutex<Option<ConnState>>,
}

impl HandedOver {
    pub fn new(
        fd: i32,
        unsent: Vec<u8>,
        timer: Option<(&'static str, f64)>,
        overdue: bool,
        state: ConnState,
    ) -> Self {
        HandedOver {
            fd,
            unsent,
            timer,
            overdue,
            state: Mutex::new(Some(state)),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<ConnState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection's state, once: whoever takes it owns the fd from then on.
    pub fn take_state(&self) -> Option<ConnState> {
        self.slot().take()
    }
}

#[pymethods]
impl HandedOver {
    /// Output the ring took and did not send: it goes out before anything else.
    #[getter]
    fn unsent<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.unsent)
    }

    /// "header", "keep_alive" or "body": the timeout the connection is under, if any.
    #[getter]
    fn timer(&self) -> Option<&'static str> {
        self.timer.map(|(name, _)| name)
    }

    /// Seconds until that timeout falls due (0 when it is already due).
    #[getter]
    fn due_in(&self) -> Option<f64> {
        self.timer.map(|(_, left)| left)
    }

    fn __repr__(&self) -> String {
        format!(
            "<HandedOver fd={} unsent={} timer={:?}>",
            self.fd,
            self.unsent.len(),
            self.timer()
        )
    }
}

impl Drop for HandedOver {
    fn drop(&mut self) {
        if self.slot().is_some() {
            close_fd(self.fd);
        }
    }
}

/// Why the ring was given up and everything its loop handed over.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct Handover {
    #[pyo3(get)]
    pub reason: String,
    pub connections: Vec<Py<HandedOver>>,
    /// The wake socket had a byte the ring consumed: the new loop must ask whether to stop.
    #[pyo3(get)]
    pub woken: bool,
    /// Connections closed because a send on them was never confirmed.
    #[pyo3(get)]
    pub dropped: usize,
    /// The kernel confirmed the end of every operation (false: the ring could not be entered
    /// any more, and memory it might still touch was leaked).
    #[pyo3(get)]
    pub confirmed: bool,
    /// Seconds left of a graceful stop in progress.
    #[pyo3(get)]
    pub drain_left: Option<f64>,
}

#[pymethods]
impl Handover {
    #[getter]
    fn connections<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.connections.iter().map(|c| c.clone_ref(py)))
    }

    fn __repr__(&self) -> String {
        format!(
            "<Handover reason={:?} connections={} dropped={}>",
            self.reason,
            self.connections.len(),
            self.dropped
        )
    }
}
