//! The VMM thread: one epoll loop (event-manager) serving device events,
//! API requests and the guest's exit.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::builder::EventMgr;
use crate::controller::Controller;
use crate::devices::bus::lock;
use crate::rpc_interface::{VmmAction, VmmResponse};
use crate::vstate::vcpu::{VmExitNotifier, EXIT_OK};

/// The API side of the VMM thread: requests in, responses out, and an
/// EventFd the API thread writes after each request.
pub struct ApiReceiver {
    pub requests: Receiver<VmmAction>,
    pub responses: Sender<VmmResponse>,
    pub evt: EventFd,
}

/// Records which control events fired; the loop acts on them outside the
/// event manager, where it may add device subscribers.
struct Wakeups {
    api: Option<EventFd>,
    exit: EventFd,
    api_pending: bool,
    exit_pending: bool,
}

const API: u32 = 1;
/// How often metrics are written without a FlushMetrics.
const METRICS_PERIOD_MS: i32 = 60_000;
const EXIT: u32 = 2;

impl MutEventSubscriber for Wakeups {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            API => {
                if let Some(e) = &self.api {
                    let _ = e.read();
                }
                self.api_pending = true;
            }
            EXIT => {
                let _ = self.exit.read();
                self.exit_pending = true;
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(e) = &self.api {
            if let Err(err) = ops.add(Events::with_data(e, API, EventSet::IN)) {
                log::error!("cannot watch the API eventfd: {err}");
            }
        }
        if let Err(err) = ops.add(Events::with_data(&self.exit, EXIT, EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {err}");
        }
    }
}

/// Runs until the guest ends (or the API goes away before boot). Returns
/// the process exit code.
pub fn run(
    mut controller: Controller,
    exit: VmExitNotifier,
    api: Option<ApiReceiver>,
    start_now: bool,
) -> Result<i32, String> {
    let mut em = EventMgr::new().map_err(|e| format!("cannot create event loop: {e}"))?;
    let dup = |e: &EventFd| e.try_clone().map_err(|e| format!("eventfd: {e}"));
    let wakeups = Arc::new(Mutex::new(Wakeups {
        api: api.as_ref().map(|a| dup(&a.evt)).transpose()?,
        exit: dup(exit.evt())?,
        api_pending: false,
        exit_pending: false,
    }));
    em.add_subscriber(wakeups.clone());

    if start_now {
        controller
            .handle(VmmAction::InstanceStart, &mut em)
            .map_err(|e| e.to_string())?;
    }

    let mut last_flush = std::time::Instant::now();
    loop {
        if let Err(e) = em.run_with_timeout(METRICS_PERIOD_MS) {
            log::error!("event loop: {e}");
        }
        if last_flush.elapsed().as_millis() >= u128::from(METRICS_PERIOD_MS as u32) {
            last_flush = std::time::Instant::now();
            if let Err(e) = crate::metrics::flush() {
                log::warn!("cannot write metrics: {e}");
            }
        }
        let (api_pending, exit_pending) = {
            let mut w = lock(&wakeups);
            let r = (w.api_pending, w.exit_pending);
            w.api_pending = false;
            w.exit_pending = false;
            r
        };
        if api_pending {
            if let Some(api) = &api {
                while let Ok(action) = api.requests.try_recv() {
                    log::debug!("API action {action:?}");
                    let resp = controller.handle(action, &mut em);
                    if api.responses.send(resp).is_err() {
                        log::warn!("API thread is gone; response dropped");
                    }
                }
            }
        }
        if exit_pending {
            let code = exit.code().unwrap_or(EXIT_OK);
            log::info!("guest ended; VMM exiting with code {code}");
            if let Err(e) = crate::metrics::flush() {
                log::warn!("cannot write metrics: {e}");
            }
            drop(controller);
            return Ok(code);
        }
    }
}
