//! Ember's volume service: volumes (sparse files) served over NBD, and as
//! vhost-user-blk on the same host, to the VMMs, with access granted by
//! fenced attachments.
//!
//! * [`registry`]: volumes, attachments and their fencing generations.
//! * [`store`]: where that state is kept (an embedded file by default).
//! * [`nbd`]: the NBD server, which checks the token on every request.
//! * [`vhost_user`]: a vhost-user-blk socket per attachment, fenced alike.
//! * [`image`]: the image file operations both servers share.
//! * [`copy`]: live copies of volume ranges (move, split, combine).
//! * [`remote`]: calls to another volume service's API (a move's target).
//! * [`api`]: the HTTP API (create, attach, move, detach, resize, and
//!   move-to-server, split, combine).
pub mod api;
pub mod copy;
pub mod image;
pub mod nbd;
pub mod registry;
pub mod remote;
pub mod store;
pub mod vhost_user;
