//! Jails for VMM processes (see `ember-jailer`).
