//! probe(): the capability probe's report as a Python dict; the GIL is released while probing.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::probe::probe as run_probe;

#[pyfunction]
pub fn probe(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let r = py.detach(run_probe);
    let d = PyDict::new(py);
    d.set_item("setup_ok", r.setup_ok)?;
    d.set_item("setup_errno", r.setup_errno)?;
    d.set_item("setup_flags", r.setup_flags)?;
    d.set_item("queue_depth", r.queue_depth)?;
    d.set_item("memlock_retry", r.memlock_retry)?;
    d.set_item("single_issuer", r.single_issuer)?;
    d.set_item("defer_taskrun", r.defer_taskrun)?;
    d.set_item("accept", r.accept)?;
    d.set_item("accept_errno", r.accept_errno)?;
    d.set_item("accept_multishot", r.accept_multishot)?;
    d.set_item("accept_multishot_errno", r.accept_multishot_errno)?;
    d.set_item("pbuf_ring", r.pbuf_ring)?;
    d.set_item("pbuf_ring_errno", r.pbuf_ring_errno)?;
    d.set_item("recv_multishot", r.recv_multishot)?;
    d.set_item("recv_multishot_errno", r.recv_multishot_errno)?;
    d.set_item("send_zc", r.send_zc)?;
    d.set_item("memlock_soft", r.memlock_soft)?;
    d.set_item("memlock_hard", r.memlock_hard)?;
    Ok(d)
}
