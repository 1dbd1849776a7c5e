//! Lambda as Ember speaks it, shared by emberd (which runs functions) and
//! the cluster (which takes them from users first, and must answer and
//! refuse exactly as a host would):
//!
//! * [`rules`]: names, runtimes and settings Lambda allows;
//! * [`error`]: errors as Lambda reports them;
//! * [`shapes`]: every request and response shape, defined once;
//! * [`invoke`]: Invoke's request headers and body, and its answer's headers;
//! * [`limits`]: payload limits;
//! * [`operations`]: the operations served, their routes, and a router
//!   built from them;
//! * [`hosts`]: hosts' membership in the cluster store and their reports;
//! * [`host_client`]: the client of hosts' APIs (mutual TLS), used by the
//!   cluster and by hosts calling each other.

pub mod error;
pub mod host_client;
pub mod hosts;
pub mod invoke;
pub mod limits;
pub mod operations;
pub mod rules;
pub mod shapes;
