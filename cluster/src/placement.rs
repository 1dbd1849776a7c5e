//! Where an invocation goes: a host with an idle warm instance of the
//! version (no restore needed), else the host with the most free capacity
//! (a restore there). Ties go to the lower host id, so the choice is
//! stable for the same reports.

use ember_lambda::hosts::HostReport;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// An idle instance is waiting there.
    Warm(String),
    /// The least loaded host; it restores an instance.
    Cold(String),
}

impl Placement {
    pub fn host(&self) -> &str {
        match self {
            Placement::Warm(h) | Placement::Cold(h) => h,
        }
    }
}

/// `None` when every host is full (the caller answers 429).
pub fn place(hosts: &[HostReport], function: &str, version: &str) -> Option<Placement> {
    let key = format!("{function}:{version}");
    let with_room = || hosts.iter().filter(|h| h.free() > 0);
    if let Some(h) = with_room()
        .filter(|h| h.warm_idle.get(&key).copied().unwrap_or(0) > 0)
        .max_by(|a, b| {
            let (ia, ib) = (a.warm_idle[&key], b.warm_idle[&key]);
            ia.cmp(&ib).then(b.id.cmp(&a.id))
        })
    {
        return Some(Placement::Warm(h.id.clone()));
    }
    with_room()
        .max_by(|a, b| a.free().cmp(&b.free()).then(b.id.cmp(&a.id)))
        .map(|h| Placement::Cold(h.id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, capacity: u32, running: u32, warm: &[(&str, u32)]) -> HostReport {
        HostReport {
            id: id.into(),
            endpoint: format!("http://{id}"),
            capacity,
            running,
            warm_idle: warm.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn warm_first_then_most_free() {
        let hosts = [
            host("a", 10, 2, &[]),
            host("b", 10, 8, &[("f:1", 1)]),
            host("c", 10, 0, &[("g:1", 3)]),
        ];
        assert_eq!(place(&hosts, "f", "1"), Some(Placement::Warm("b".into())));
        assert_eq!(place(&hosts, "f", "2"), Some(Placement::Cold("c".into())));
        assert_eq!(place(&hosts, "g", "1"), Some(Placement::Warm("c".into())));
    }

    #[test]
    fn full_hosts_are_skipped_even_when_warm() {
        let hosts = [host("a", 4, 4, &[("f:1", 2)]), host("b", 4, 3, &[])];
        assert_eq!(place(&hosts, "f", "1"), Some(Placement::Cold("b".into())));
        let full = [host("a", 4, 4, &[("f:1", 2)])];
        assert_eq!(place(&full, "f", "1"), None);
        assert_eq!(place(&[], "f", "1"), None);
    }

    #[test]
    fn ties_are_stable() {
        let hosts = [host("b", 4, 0, &[]), host("a", 4, 0, &[])];
        assert_eq!(place(&hosts, "f", "1"), Some(Placement::Cold("a".into())));
    }
}
