//! Ring: the simple per-ring API, one accept or read at a time, waiting with the GIL released.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::{RingError, RingResult};
use crate::owner::Owner;
use crate::pyargs::{fd_of, timeout_of};
use crate::uring::{Cqe, Uring, MAX_ENTRIES};

const UD_OP: u64 = 1;
const UD_CANCEL: u64 = 2;

/// How one operation ended.
enum Outcome {
    Done(i32),
    TimedOut,
}

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct Ring {
    owner: Owner,
    queue_depth: u32,
    uring: Mutex<Option<Uring>>,
}

impl Ring {
    /// The ring, after checking it is used by its own thread and process and is open.
    fn inner(&self) -> RingResult<MutexGuard<'_, Option<Uring>>> {
        self.owner.check()?;
        let guard = self.uring.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(RingError::Closed);
        }
        Ok(guard)
    }
}

/// Waits for the one operation in flight. Whatever happens, it returns only after that
/// operation's final CQE, so memory it points to may then be freed; except when entering the
/// ring itself fails, which `Err(RingError::Enter)` reports and callers treat as "still armed".
fn finish(py: Python<'_>, uring: &mut Uring, timeout: Option<Duration>) -> PyResult<Outcome> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut cqes: Vec<Cqe> = Vec::new();
    loop {
        cqes.clear();
        uring.reap(&mut cqes);
        if let Some(c) = cqes.iter().find(|c| c.user_data == UD_OP) {
            return Ok(Outcome::Done(c.result));
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return cancel(py, uring).map_err(PyErr::from);
        }
        match py.detach(|| uring.submit_and_wait(1, left)) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                if let Err(interrupt) = py.check_signals() {
                    cancel(py, uring)?;
                    return Err(interrupt);
                }
            }
            Err(e) => return Err(RingError::Enter(e).into()),
        }
    }
}

/// Cancels the operation in flight and waits for its final CQE. An operation that completed
/// before the cancel landed keeps its result: an accepted fd is returned, not leaked.
fn cancel(py: Python<'_>, uring: &mut Uring) -> RingResult<Outcome> {
    uring
        .push_cancel_user_data(UD_OP, UD_CANCEL)
        .map_err(RingError::Enter)?;
    let mut cqes: Vec<Cqe> = Vec::new();
    loop {
        match py.detach(|| uring.submit_and_wait(1, None)) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(RingError::Enter(e)),
        }
        cqes.clear();
        uring.reap(&mut cqes);
        if let Some(c) = cqes.iter().find(|c| c.user_data == UD_OP) {
            return Ok(if c.result == -libc::ECANCELED {
                Outcome::TimedOut
            } else {
                Outcome::Done(c.result)
            });
        }
    }
}

#[pymethods]
impl Ring {
    #[new]
    #[pyo3(signature = (queue_depth = 256))]
    fn new(queue_depth: u32) -> PyResult<Self> {
        if queue_depth == 0 || queue_depth > MAX_ENTRIES {
            return Err(RingError::InvalidArgument(format!(
                "queue_depth must be between 1 and {MAX_ENTRIES}, not {queue_depth}"
            ))
            .into());
        }
        let uring = Uring::new(queue_depth, None, queue_depth.min(8)).map_err(|source| {
            RingError::Setup {
                what: "io_uring_setup",
                source,
            }
        })?;
        Ok(Ring {
            owner: Owner::current(),
            queue_depth: uring.report.entries,
            uring: Mutex::new(Some(uring)),
        })
    }

    #[getter]
    fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    #[getter]
    fn closed(&self) -> bool {
        self.uring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Accepts one connection: a non-blocking, close-on-exec fd, or None after `timeout`.
    #[pyo3(signature = (sock, timeout = None))]
    fn accept(
        &self,
        py: Python<'_>,
        sock: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Option<i32>> {
        let fd = fd_of(sock)?;
        let timeout = timeout_of(timeout)?;
        let mut guard = self.inner()?;
        let uring = guard.as_mut().expect("checked open");
        uring.push_accept(fd, UD_OP).map_err(RingError::Enter)?;
        match finish(py, uring, timeout)? {
            Outcome::TimedOut => Ok(None),
            Outcome::Done(res) if res >= 0 => Ok(Some(res)),
            Outcome::Done(res) => Err(RingError::Op {
                what: "accept",
                errno: -res,
            }
            .into()),
        }
    }

    /// Reads up to `max_bytes`; b"" means EOF. Raises TimeoutError after `timeout`.
    #[pyo3(signature = (fd, max_bytes, timeout = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        fd: &Bound<'py, PyAny>,
        max_bytes: usize,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let fd = fd_of(fd)?;
        let timeout = timeout_of(timeout)?;
        if max_bytes == 0 || max_bytes > i32::MAX as usize {
            return Err(RingError::InvalidArgument(format!(
                "max_bytes must be between 1 and {}, not {max_bytes}",
                i32::MAX
            ))
            .into());
        }
        let mut guard = self.inner()?;
        let uring = guard.as_mut().expect("checked open");
        let mut buf = vec![0u8; max_bytes];
        // SAFETY: buf lives until finish() has seen the recv's final CQE; on the one path where
        // that is not certain (the enter itself failed), buf is leaked below instead of freed.
        unsafe { uring.push_recv(fd, buf.as_mut_ptr(), max_bytes as u32, UD_OP) }
            .map_err(RingError::Enter)?;
        let outcome = match finish(py, uring, timeout) {
            Ok(outcome) => outcome,
            Err(err) => {
                if err.is_instance_of::<crate::errors::UringError>(py) {
                    std::mem::forget(buf);
                }
                return Err(err);
            }
        };
        match outcome {
            Outcome::TimedOut => Err(RingError::TimedOut("read").into()),
            Outcome::Done(res) if res >= 0 => Ok(PyBytes::new(py, &buf[..res as usize])),
            Outcome::Done(res) => Err(RingError::Op {
                what: "read",
                errno: -res,
            }
            .into()),
        }
    }

    /// Closes the ring. Safe to call twice; from another thread or a forked child it refuses.
    fn close(&self) -> PyResult<()> {
        if self.closed() {
            return Ok(());
        }
        self.owner.check()?;
        self.uring.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, _exc_info: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close()
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { "closed" } else { "open" };
        format!("<Ring queue_depth={} {state}>", self.queue_depth)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let slot = self.uring.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(uring) = slot.as_mut() {
            if self.owner.is_forked_child() {
                uring.leak_on_drop();
            }
        }
    }
}
