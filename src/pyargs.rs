//! Conversions of Python arguments shared by the ring classes: fds and timeouts.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Accepts a raw fd or any object with fileno(), as the socket module does.
pub fn fd_of(obj: &Bound<'_, PyAny>) -> PyResult<i32> {
    let fd: i32 = match obj.extract::<i32>() {
        Ok(fd) => fd,
        Err(_) => obj.call_method0("fileno")?.extract()?,
    };
    if fd < 0 {
        return Err(PyValueError::new_err(format!(
            "file descriptor cannot be negative: {fd}"
        )));
    }
    Ok(fd)
}

/// None waits forever; a number is seconds, as in socket.settimeout().
pub fn timeout_of(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds or None, not {t}"
        ))),
    }
}
