//! The WSGI bridge: the one place on the request path that touches Python objects.

pub mod access_log;
pub mod app;
pub mod environ;
pub mod file_wrapper;
pub mod input;
pub mod observe;
pub mod start_response;
