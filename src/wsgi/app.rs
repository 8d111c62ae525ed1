//! Calling the WSGI app for one request and framing what it returns through the HTTP core.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::http::{Connection, Request};
use crate::transport::{lock_io, ConnIo, SharedIo, Transport};

use super::environ::{build, template, KeyCache, Peer, ServerInfo};
use super::input::{EmptyInput, InputStream};
use super::observe::Observer;
use super::start_response::{lock, Reply, Responder, Responders, SharedReply};

/// One app with what every request of it shares.
pub struct WsgiApp {
    pub app: Py<PyAny>,
    pub template: Py<PyDict>,
    /// logging.Logger "uringserve.error", for app failures.
    pub error_log: Py<PyAny>,
    /// The access log and the metrics, told about every answered request.
    pub observer: Observer,
    keys: KeyCache,
    /// Requests taken so far, for recycling a worker after `--max-requests`.
    requests: AtomicU64,
    /// From this request on (0: never), responses say `Connection: close`: the server is
    /// about to stop gracefully, so no client should send another request on the connection.
    pub max_requests: u64,
    responders: Responders,
}

impl WsgiApp {
    pub fn new(
        py: Python<'_>,
        app: Py<PyAny>,
        info: &ServerInfo,
        observer: Observer,
    ) -> PyResult<Self> {
        let logging = py.import("logging")?;
        let error_log = logging
            .call_method1("getLogger", ("uringserve.error",))?
            .unbind();
        let empty_input = Bound::new(py, EmptyInput)?.into_any();
        Ok(WsgiApp {
            app,
            template: template(py, info, &empty_input)?.unbind(),
            error_log,
            observer,
            keys: KeyCache::default(),
            requests: AtomicU64::new(0),
            max_requests: 0,
            responders: Responders::default(),
        })
    }

    /// Requests taken so far; once `respond` returns, its request is answered.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn log_app_error(&self, py: Python<'_>, err: &PyErr, what: &str) {
        let kwargs = PyDict::new(py);
        let logged = kwargs
            .set_item("exc_info", err.clone_ref(py).into_value(py))
            .and_then(|_| {
                self.error_log
                    .call_method(py, "error", (what.to_owned(),), Some(&kwargs))
            });
        if logged.is_err() {
            err.clone_ref(py).print(py);
        }
    }

    /// Runs the app for one request whose head has arrived; its body streams through
    /// wsgi.input. The framed response is appended to the connection's output. Failures
    /// before the head went out become an error response; after it, the connection closes.
    pub fn respond(
        &self,
        py: Python<'_>,
        io: &SharedIo,
        transport: &Arc<dyn Transport>,
        req: &Request,
        peer: &Peer,
    ) {
        let taken = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.max_requests != 0 && taken >= self.max_requests {
            lock_io(io).conn.refuse_keep_alive();
        }
        let started = self.observer.start();
        let start = lock_io(io).produced();
        let responder = match self.responders.take(py) {
            Ok(r) => r,
            Err(err) => {
                // Out of memory, most likely: answered like an app failure.
                self.log_app_error(py, &err, "cannot create start_response");
                let mut guard = lock_io(io);
                let io = &mut *guard;
                io.conn.send_error(500, &mut io.out);
                return;
            }
        };
        let reply = &responder.reply;
        let outcome = if req.has_body() {
            Bound::new(py, InputStream::new(io.clone(), transport.clone())).and_then(|input| {
                let result = self.run(py, io, req, Some(input.as_any()), peer, &responder);
                input.get().finish();
                result
            })
        } else {
            self.run(py, io, req, None, peer, &responder)
        };
        // None when the app succeeded; else the status sent for it. A body that broke its
        // framing is the client's error (400, 413); anything else is the app's (500).
        let failed: Option<u16> = match outcome {
            Ok(()) => None,
            Err(err) => {
                self.log_app_error(
                    py,
                    &err,
                    &format!("error in WSGI app for {} {}", req.method(), req.target()),
                );
                let mut guard = lock_io(io);
                let io = &mut *guard;
                if !lock(reply).head_sent {
                    let keep = start.saturating_sub(io.flushed) as usize;
                    io.out.truncate(keep.min(io.out.len()));
                }
                // With the head already out, send_error writes nothing and only marks the
                // connection for closing.
                let status = io.conn.failure().map_or(500, |e| e.status);
                io.conn.send_error(status, &mut io.out);
                Some(status)
            }
        };
        if let Some(started) = started {
            let bytes = lock_io(io).conn.body_sent();
            let observer = &self.observer;
            observer.finish(py, started, req, peer, failed, bytes, reply);
        }
        self.responders.give_back(py, responder);
    }

    fn run(
        &self,
        py: Python<'_>,
        io: &SharedIo,
        req: &Request,
        // None for a request without a body: the template's shared empty stream serves.
        input: Option<&Bound<'_, PyAny>>,
        peer: &Peer,
        responder: &Responder,
    ) -> PyResult<()> {
        let reply = &responder.reply;
        let environ = build(py, self.template.bind(py), &self.keys, req, peer, input)?;
        let iterable = self
            .app
            .bind(py)
            .call1((environ, responder.callable.bind(py)))?;
        let outcome = self.drain(io, &iterable, reply);
        // PEP 3333: close() is called whatever happened while iterating. Lists and tuples,
        // the common case, have none; asking them would build an AttributeError per request.
        let plain =
            iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>();
        let closed = match !plain && iterable.hasattr(intern!(py, "close"))? {
            true => iterable.call_method0(intern!(py, "close")).map(drop),
            false => Ok(()),
        };
        outcome.and(closed)
    }

    fn drain(
        &self,
        io: &SharedIo,
        iterable: &Bound<'_, PyAny>,
        reply: &SharedReply,
    ) -> PyResult<()> {
        // Plain lists and tuples are walked in place: no iterator object to create.
        if let Ok(list) = iterable.cast_exact::<PyList>() {
            return send_sequence(io, reply, list.len(), list.iter());
        }
        if let Ok(tuple) = iterable.cast_exact::<PyTuple>() {
            return send_sequence(io, reply, tuple.len(), tuple.iter());
        }
        // A one-element list or tuple has a known length: frame it with Content-Length.
        let single = if let Ok(list) = iterable.cast::<PyList>() {
            (list.len() == 1).then(|| list.get_item(0)).transpose()?
        } else if let Ok(tuple) = iterable.cast::<PyTuple>() {
            (tuple.len() == 1).then(|| tuple.get_item(0)).transpose()?
        } else {
            None
        };
        let hint = single
            .as_ref()
            .and_then(|item| item.cast::<PyBytes>().ok())
            .map(|b| b.as_bytes().len() as u64);
        for item in iterable.try_iter()? {
            let item = item?;
            let chunk = item.cast::<PyBytes>().map_err(|_| not_bytes(&item))?;
            let chunk = chunk.as_bytes();
            if chunk.is_empty() {
                continue;
            }
            // Locked per item: the iterable runs Python code (maybe reading wsgi.input,
            // which needs the connection) between items.
            let mut r = lock(reply);
            let mut guard = lock_io(io);
            let ConnIo { conn, out, .. } = &mut *guard;
            write_head(&mut r, conn, out, hint)?;
            conn.write_body(chunk, out);
        }
        let mut r = lock(reply);
        let mut guard = lock_io(io);
        let ConnIo { conn, out, .. } = &mut *guard;
        write_head(&mut r, conn, out, hint.or(Some(0)))?;
        conn.finish_response(out);
        Ok(())
    }
}

/// The items of a plain list or tuple, all under one lock: no Python code runs between them.
fn send_sequence<'py>(
    io: &SharedIo,
    reply: &SharedReply,
    len: usize,
    items: impl Iterator<Item = Bound<'py, PyAny>>,
) -> PyResult<()> {
    let mut r = lock(reply);
    let mut guard = lock_io(io);
    let ConnIo { conn, out, .. } = &mut *guard;
    // A single item has a known length: frame it with Content-Length.
    let mut hint = None;
    for item in items {
        let Ok(chunk) = item.cast::<PyBytes>() else {
            // Naming the type makes a str, which may run Python code: not under the locks.
            drop(guard);
            drop(r);
            return Err(not_bytes(&item));
        };
        let chunk = chunk.as_bytes();
        if len == 1 {
            hint = Some(chunk.len() as u64);
        }
        if chunk.is_empty() {
            continue;
        }
        write_head(&mut r, conn, out, hint)?;
        conn.write_body(chunk, out);
    }
    write_head(&mut r, conn, out, hint.or(Some(0)))?;
    conn.finish_response(out);
    Ok(())
}

fn not_bytes(item: &Bound<'_, PyAny>) -> PyErr {
    pyo3::exceptions::PyTypeError::new_err(format!(
        "the WSGI app yielded {}, not bytes",
        item.get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default()
    ))
}

/// Writes the head once: when the first body bytes are ready, or at the end. Bytes the app
/// passed to write() go out first.
fn write_head(
    reply: &mut Reply,
    conn: &mut Connection,
    out: &mut Vec<u8>,
    hint: Option<u64>,
) -> PyResult<()> {
    if !reply.head_sent {
        let Some(status) = reply.status() else {
            return Err(pyo3::exceptions::PyAssertionError::new_err(
                "the WSGI app returned without calling start_response()",
            ));
        };
        // Bytes passed to write() come first and make the length unknown up front.
        let hint = if reply.written.is_empty() { hint } else { None };
        reply
            .with_headers(|headers| conn.start_response(status, headers, hint, out))
            .map_err(|e| {
                pyo3::exceptions::PyValueError::new_err(format!("invalid response: {e}"))
            })?;
        reply.head_sent = true;
    }
    if !reply.written.is_empty() {
        conn.write_body(&reply.written, out);
        reply.written.clear();
    }
    Ok(())
}
