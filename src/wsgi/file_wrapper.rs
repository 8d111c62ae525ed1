//! wsgi.file_wrapper: PEP 3333's optional way for an app to hand the server a file to send.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Iterates a file-like object in blocks of `blksize` bytes until `read()` returns nothing.
///
/// The bridge sees it as one more iterable, so it is framed and closed like any other; keeping
/// `filelike` and `blksize` readable leaves room for a later sendfile fast path to recognise it.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct FileWrapper {
    #[pyo3(get)]
    filelike: Py<PyAny>,
    #[pyo3(get)]
    blksize: usize,
}

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, blksize = 8192))]
    fn new(filelike: Py<PyAny>, blksize: usize) -> PyResult<Self> {
        // read(0) returns b"" at once, which would end the body silently before the file.
        if blksize == 0 {
            return Err(PyValueError::new_err("blksize must be at least 1"));
        }
        Ok(FileWrapper { filelike, blksize })
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let block = self
            .filelike
            .bind(py)
            .call_method1("read", (self.blksize,))?;
        // PEP 3333's own example stops on any false value; a non-bytes block is left for the
        // bridge to reject with its usual "yielded X, not bytes" error.
        Ok(block.is_truthy()?.then_some(block))
    }

    /// PEP 3333: the server calls close() on the iterable, which must close the file if it can.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let filelike = self.filelike.bind(py);
        if filelike.hasattr("close")? {
            filelike.call_method0("close")?;
        }
        Ok(())
    }
}
