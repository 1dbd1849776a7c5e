//! virtio-vsock: arbitrary descriptor tables and avail rings (RX, TX and
//! event queues) over a small guest memory, run by the real device and its
//! muxer under the real event manager, with Unix sockets in a temp dir
//! (one host listener on port 1234, so guest connections can succeed).
//!
//! Input: `ember_fuzz::guest`'s layout for three queues.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ember_fuzz::{guest, Cursor};
use ember_vmm::devices::virtio::vsock::Vsock;
use ember_vmm::devices::virtio::{Interrupt, VirtioDevice};
use ember_vmm::vmm_config::vsock::VsockConfig;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::tempdir::TempDir;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

struct Host {
    _dir: TempDir,
    uds: PathBuf,
    listener: UnixListener,
}

fn host() -> &'static Mutex<Host> {
    static HOST: OnceLock<Mutex<Host>> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = TempDir::new_in(std::path::Path::new("/tmp")).expect("temp dir");
        let uds = dir.as_path().join("v.sock");
        let mut port = uds.clone().into_os_string();
        port.push("_1234");
        let listener = UnixListener::bind(port).expect("host listener");
        listener.set_nonblocking(true).expect("nonblocking");
        Mutex::new(Host {
            _dir: dir,
            uds,
            listener,
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let host = host().lock().expect("not poisoned");
    let mut input = Cursor::new(data);
    let g = guest(&mut input, 3);
    let cfg = VsockConfig {
        vsock_id: None,
        guest_cid: 3,
        uds_path: host.uds.to_str().expect("utf-8").into(),
    };
    let dev = Arc::new(Mutex::new(Vsock::new(&cfg).expect("vsock device")));
    let interrupt = Arc::new(Interrupt::new().expect("eventfd"));
    {
        let mut d = dev.lock().expect("not poisoned");
        let acked = d.avail_features();
        let acked = if g.event_idx {
            acked
        } else {
            acked & !(1 << 29)
        };
        d.set_acked_features(acked);
        d.activate(g.mem.clone(), interrupt, g.queues)
            .expect("activate");
        for e in d.queue_events() {
            e.write(1).expect("kick");
        }
    }
    let mut em = EventManager::<Subscriber>::new().expect("event manager");
    em.add_subscriber(dev.clone());
    for _ in 0..4 {
        if em.run_with_timeout(0).expect("event loop") == 0 {
            break;
        }
    }
    // Connections the guest opened to the listener: accepted and closed,
    // so the next run starts clean.
    while let Ok((s, _)) = host.listener.accept() {
        drop(s);
    }
    let _ = dev.lock().expect("not poisoned").connection_count();
});
