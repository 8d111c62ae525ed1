//! HotpathRing and Completion: the Python face of the hot-path engine; the GIL is released
//! around every wait in the kernel.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyMemoryView, PyTuple};

use crate::errors::{RingError, RingResult};
use crate::hotpath::{Completion as Done, Hotpath};
use crate::owner::Owner;
use crate::pyargs::{fd_of, timeout_of};

/// How long cancel_fd() and close() wait for the kernel's final CQEs before calling the ring sick.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct Completion {
    done: Done,
}

#[pymethods]
impl Completion {
    /// "accept", "recv" or "send".
    #[getter]
    fn op(&self) -> &'static str {
        self.done.op.name()
    }

    #[getter]
    fn fd(&self) -> i32 {
        self.done.fd
    }

    #[getter]
    fn result(&self) -> i32 {
        self.done.result
    }

    #[getter]
    fn buf_id(&self) -> Option<u16> {
        self.done.buf_id
    }

    #[getter]
    fn more(&self) -> bool {
        self.done.more
    }

    fn __repr__(&self) -> String {
        let d = &self.done;
        format!(
            "Completion(op={:?}, fd={}, result={}, buf_id={}, more={})",
            d.op.name(),
            d.fd,
            d.result,
            d.buf_id.map_or("None".to_owned(), |b| b.to_string()),
            if d.more { "True" } else { "False" }
        )
    }
}

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct HotpathRing {
    owner: Owner,
    queue_depth: u32,
    n_bufs: u32,
    buf_size: u32,
    setup_flags: Vec<&'static str>,
    engine: Mutex<Option<Hotpath>>,
}

/// How one wait in the kernel ended.
enum Waited {
    Enough,
    Interrupted,
}

/// The wait loop, run with the GIL released: one enter per pass, usually one pass in all.
fn wait_loop(
    hp: &mut Hotpath,
    min_complete: usize,
    deadline: Option<Instant>,
) -> RingResult<Waited> {
    hp.reap()?;
    loop {
        let need = min_complete.saturating_sub(hp.ready.len());
        let pending = hp.uring.sq_pending() > 0;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let timed_out = left == Some(Duration::ZERO);
        if (need == 0 || timed_out) && !pending {
            return Ok(Waited::Enough);
        }
        let want = if timed_out { 0 } else { need };
        match hp.enter(want, left) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                hp.reap()?;
                return Ok(Waited::Interrupted);
            }
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                hp.reap()?;
                return Ok(Waited::Enough);
            }
            Err(e) => hp.enter_failed(e)?,
        }
        hp.reap()?;
        if want == 0 {
            return Ok(Waited::Enough);
        }
    }
}

/// Appends one buffer-protocol object (bytes, bytearray, memoryview...) to `out`.
fn append_buffer(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> PyResult<()> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        out.extend_from_slice(b.as_bytes());
        return Ok(());
    }
    // memoryview() accepts exactly the buffer-protocol objects, so ints, str and iterables of
    // ints are refused here instead of being turned into bytes by bytes(); the limited API
    // has no direct buffer access, so bytes(view) makes the copy.
    let view = PyMemoryView::from(obj).map_err(|_| not_a_buffer(obj))?;
    let copied = obj.py().get_type::<PyBytes>().call1((view,))?;
    out.extend_from_slice(copied.cast::<PyBytes>()?.as_bytes());
    Ok(())
}

fn not_a_buffer(obj: &Bound<'_, PyAny>) -> PyErr {
    let kind = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    PyTypeError::new_err(format!(
        "data must be bytes, a buffer such as memoryview, or a list of them, not {kind}"
    ))
}

/// bytes, a buffer, or a list/tuple of them, copied once into one owned Vec.
fn send_bytes(data: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let mut out = Vec::new();
    if data.is_instance_of::<PyList>() || data.is_instance_of::<PyTuple>() {
        for item in data.try_iter()? {
            append_buffer(&item?, &mut out)?;
        }
    } else {
        append_buffer(data, &mut out)?;
    }
    Ok(out)
}

impl HotpathRing {
    fn engine(&self) -> RingResult<MutexGuard<'_, Option<Hotpath>>> {
        self.owner.check()?;
        let guard = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(RingError::Closed);
        }
        Ok(guard)
    }
}

#[pymethods]
impl HotpathRing {
    #[new]
    #[pyo3(signature = (queue_depth = 1024, n_bufs = 512, buf_size = 8192))]
    fn new(queue_depth: u32, n_bufs: u32, buf_size: u32) -> PyResult<Self> {
        let hp = Hotpath::new(queue_depth, n_bufs, buf_size)?;
        Ok(HotpathRing {
            owner: Owner::current(),
            queue_depth: hp.uring.report.entries,
            n_bufs: hp.n_bufs(),
            buf_size: hp.buf_size(),
            setup_flags: hp.uring.report.flags.clone(),
            engine: Mutex::new(Some(hp)),
        })
    }

    #[getter]
    fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    #[getter]
    fn n_bufs(&self) -> u32 {
        self.n_bufs
    }

    #[getter]
    fn buf_size(&self) -> u32 {
        self.buf_size
    }

    #[getter]
    fn setup_flags(&self) -> Vec<&'static str> {
        self.setup_flags.clone()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    #[getter]
    fn healthy(&self) -> bool {
        let guard = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .is_some_and(|hp| hp.unhealthy_reason().is_none())
    }

    #[getter]
    fn unhealthy_reason(&self) -> Option<String> {
        let guard = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            None => Some("the ring is closed".to_owned()),
            Some(hp) => hp.unhealthy_reason().map(str::to_owned),
        }
    }

    #[pyo3(signature = (reason = None))]
    fn force_unhealthy(&self, reason: Option<String>) -> PyResult<()> {
        let reason = reason.unwrap_or_else(|| "forced by force_unhealthy()".to_owned());
        let mut guard = self.engine()?;
        guard.as_mut().expect("checked open").mark_unhealthy(reason);
        Ok(())
    }

    fn submit_accept_multishot(&self, listen_fd: &Bound<'_, PyAny>) -> PyResult<()> {
        let fd = fd_of(listen_fd)?;
        let mut guard = self.engine()?;
        Ok(guard
            .as_mut()
            .expect("checked open")
            .submit_accept_multishot(fd)?)
    }

    fn submit_recv_multishot(&self, fd: &Bound<'_, PyAny>) -> PyResult<()> {
        let fd = fd_of(fd)?;
        let mut guard = self.engine()?;
        Ok(guard
            .as_mut()
            .expect("checked open")
            .submit_recv_multishot(fd)?)
    }

    fn submit_send(&self, fd: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let fd = fd_of(fd)?;
        let bytes = send_bytes(data)?;
        let mut guard = self.engine()?;
        Ok(guard
            .as_mut()
            .expect("checked open")
            .submit_send(fd, bytes)?)
    }

    #[pyo3(signature = (min_complete = 1, timeout = None, max_completions = 256))]
    fn wait_completions<'py>(
        &self,
        py: Python<'py>,
        min_complete: usize,
        timeout: Option<f64>,
        max_completions: usize,
    ) -> PyResult<Bound<'py, PyList>> {
        if max_completions == 0 {
            return Err(
                RingError::InvalidArgument("max_completions must be at least 1".into()).into(),
            );
        }
        let deadline = timeout_of(timeout)?.map(|t| Instant::now() + t);
        let mut guard = self.engine()?;
        let hp = guard.as_mut().expect("checked open");
        if hp.unhealthy_reason().is_none() {
            loop {
                match py.detach(|| wait_loop(hp, min_complete, deadline))? {
                    Waited::Enough => break,
                    Waited::Interrupted => py.check_signals()?,
                }
            }
        } else {
            // A sick ring is not entered again, but what it already completed is handed over.
            let _ = hp.reap();
        }
        let n = max_completions.min(hp.ready.len());
        let list = PyList::empty(py);
        for done in hp.ready.drain(..n) {
            list.append(Completion { done })?;
        }
        Ok(list)
    }

    fn copy_buffer<'py>(
        &self,
        py: Python<'py>,
        buf_id: u32,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let guard = self.engine()?;
        let bytes = guard
            .as_ref()
            .expect("checked open")
            .buffer(buf_id, length)?;
        Ok(PyBytes::new(py, bytes))
    }

    fn release_buffer(&self, buf_id: u32) -> PyResult<()> {
        let mut guard = self.engine()?;
        Ok(guard
            .as_mut()
            .expect("checked open")
            .release_buffer(buf_id)?)
    }

    fn take_buffer<'py>(
        &self,
        py: Python<'py>,
        buf_id: u32,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut guard = self.engine()?;
        let hp = guard.as_mut().expect("checked open");
        let bytes = PyBytes::new(py, hp.buffer(buf_id, length)?);
        hp.release_buffer(buf_id)?;
        Ok(bytes)
    }

    /// Cancels everything armed on `fd` and returns once the kernel has posted their final
    /// completions, so the caller may close the fd and the number may be reused.
    fn cancel_fd(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<()> {
        let fd = fd_of(fd)?;
        let mut guard = self.engine()?;
        let hp = guard.as_mut().expect("checked open");
        let ticket = hp.begin_cancel_fd(fd)?;
        let deadline = Instant::now() + CANCEL_WAIT;
        let done = py.detach(|| hp.drive_until(deadline, |hp| hp.cancel_done(&ticket)))?;
        if !done {
            let reason = format!("cancelling fd {fd} did not complete within {CANCEL_WAIT:?}");
            hp.mark_unhealthy(reason.clone());
            return Err(RingError::Unhealthy(reason).into());
        }
        Ok(())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut guard = self.engine()?;
        stats_dict(py, guard.as_mut().expect("checked open"))
    }

    /// Cancels everything, waits for the final completions, unregisters and frees the buffer
    /// ring, then closes the ring fd. Calling it again does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed() {
            return Ok(());
        }
        let mut guard = self.engine()?;
        let Some(mut hp) = guard.take() else {
            return Ok(());
        };
        drop(guard);
        let confirmed = py.detach(|| shut_down(&mut hp));
        drop(hp);
        if !confirmed {
            return Err(RingError::Unhealthy(
                "close() could not confirm that the kernel finished every operation; \
                 their memory was leaked rather than freed"
                    .into(),
            )
            .into());
        }
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, py: Python<'_>, _exc_info: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "<HotpathRing queue_depth={} n_bufs={} buf_size={} {}>",
            self.queue_depth,
            self.n_bufs,
            self.buf_size,
            if self.closed() { "closed" } else { "open" }
        )
    }
}

/// The engine's counters as the dict HotpathRing.stats() and UringServer.stats() return.
pub(crate) fn stats_dict<'py>(py: Python<'py>, hp: &mut Hotpath) -> PyResult<Bound<'py, PyDict>> {
    let e = hp.uring.stats;
    let c = hp.counters;
    let d = PyDict::new(py);
    d.set_item("enters", e.enters)?;
    d.set_item("submissions", e.submissions)?;
    d.set_item("completions", e.completions)?;
    d.set_item("accepts", c.accepts)?;
    d.set_item("recv_bytes", c.recv_bytes)?;
    d.set_item("sends", c.sends)?;
    d.set_item("short_sends", c.short_sends)?;
    d.set_item("enobufs", c.enobufs)?;
    d.set_item("recv_rearms", c.recv_rearms)?;
    d.set_item("accept_rearms", c.accept_rearms)?;
    d.set_item("stale_dropped", c.stale_dropped)?;
    d.set_item("cq_overflow", hp.uring.cq_overflow())?;
    d.set_item("ops_in_flight", hp.ops_in_flight())?;
    Ok(d)
}

fn shut_down(hp: &mut Hotpath) -> bool {
    hp.shut_down(CANCEL_WAIT)
}

impl Drop for HotpathRing {
    fn drop(&mut self) {
        let slot = self.engine.get_mut().unwrap_or_else(|p| p.into_inner());
        let Some(hp) = slot.as_mut() else { return };
        if self.owner.is_forked_child() {
            hp.abandon();
        } else if self.owner.is_owner_thread() {
            shut_down(hp);
        } else {
            // Another thread may not enter a single-issuer ring: free nothing the kernel
            // might still touch; closing the ring fd makes the kernel cancel the rest.
            hp.teardown(false);
        }
    }
}
