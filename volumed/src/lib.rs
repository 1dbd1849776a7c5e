//! Ember's volume service: volumes (sparse files) served over NBD to the
//! VMMs, with access granted by fenced attachments.
//!
//! * [`registry`]: volumes, attachments and their fencing generations.
//! * [`store`]: where that state is kept (an embedded file by default).
//! * [`nbd`]: the NBD server, which checks the token on every request.
//! * [`api`]: the HTTP API (create, attach, move, detach, resize).
pub mod api;
pub mod nbd;
pub mod registry;
pub mod store;
