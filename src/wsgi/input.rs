//! wsgi.input: a file-like reader over a request body that has fully arrived.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

struct Cursor {
    body: Vec<u8>,
    pos: usize,
}

impl Cursor {
    fn take(&mut self, size: Option<isize>) -> &[u8] {
        let left = self.body.len() - self.pos;
        let n = match size {
            Some(n) if n >= 0 => (n as usize).min(left),
            _ => left,
        };
        let start = self.pos;
        self.pos += n;
        &self.body[start..self.pos]
    }

    fn line(&mut self, size: Option<isize>) -> &[u8] {
        let rest = &self.body[self.pos..];
        let mut n = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        if let Some(limit) = size.filter(|s| *s >= 0) {
            n = n.min(limit as usize);
        }
        let start = self.pos;
        self.pos += n;
        &self.body[start..self.pos]
    }
}

#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct InputStream {
    cursor: Mutex<Cursor>,
}

impl InputStream {
    pub fn new(body: Vec<u8>) -> Self {
        InputStream {
            cursor: Mutex::new(Cursor { body, pos: 0 }),
        }
    }

    fn cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl InputStream {
    #[pyo3(signature = (size = None))]
    fn read<'py>(&self, py: Python<'py>, size: Option<isize>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.cursor().take(size))
    }

    #[pyo3(signature = (size = None))]
    fn readline<'py>(&self, py: Python<'py>, size: Option<isize>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.cursor().line(size))
    }

    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(&self, py: Python<'py>, hint: Option<isize>) -> PyResult<Bound<'py, PyList>> {
        let lines = PyList::empty(py);
        let mut total = 0usize;
        let mut cursor = self.cursor();
        loop {
            let line = cursor.line(None);
            if line.is_empty() {
                break;
            }
            total += line.len();
            lines.append(PyBytes::new(py, line))?;
            if hint.is_some_and(|h| h > 0 && total >= h as usize) {
                break;
            }
        }
        Ok(lines)
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let mut cursor = self.cursor();
        let line = cursor.line(None);
        (!line.is_empty()).then(|| PyBytes::new(py, line))
    }
}
