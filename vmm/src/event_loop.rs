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

/// Work another thread of the VMM (live migration) needs done on the VMM
/// thread, where the VM and its devices live.
pub type VmmTask = Box<dyn FnOnce(&mut Controller, &mut EventMgr) + Send>;

/// Hands [`VmmTask`]s to the VMM thread and waits for their results.
#[derive(Clone)]
pub struct TaskSender {
    tx: Sender<VmmTask>,
    evt: Arc<EventFd>,
}

impl TaskSender {
    /// Runs `f` on the VMM thread and returns what it returned; an error
    /// if the VMM thread is gone.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller, &mut EventMgr) -> R + Send + 'static,
    ) -> Result<R, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let task: VmmTask = Box::new(move |c, em| {
            let _ = tx.send(f(c, em));
        });
        self.tx
            .send(task)
            .map_err(|_| "the VMM thread is gone".to_string())?;
        self.evt
            .write(1)
            .map_err(|e| format!("waking the VMM thread: {e}"))?;
        rx.recv().map_err(|_| "the VMM thread is gone".to_string())
    }
}

/// Records which control events fired; the loop acts on them outside the
/// event manager, where it may add device subscribers.
struct Wakeups {
    api: Option<EventFd>,
    exit: EventFd,
    tasks: EventFd,
    api_pending: bool,
    exit_pending: bool,
    tasks_pending: bool,
}

const API: u32 = 1;
/// How often metrics are written without a FlushMetrics.
const METRICS_PERIOD_MS: i32 = 60_000;
const EXIT: u32 = 2;
const TASKS: u32 = 3;

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
            TASKS => {
                let _ = self.tasks.read();
                self.tasks_pending = true;
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
        if let Err(err) = ops.add(Events::with_data(&self.tasks, TASKS, EventSet::IN)) {
            log::error!("cannot watch the task eventfd: {err}");
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
    let task_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    let (task_tx, task_rx) = std::sync::mpsc::channel::<VmmTask>();
    let wakeups = Arc::new(Mutex::new(Wakeups {
        api: api.as_ref().map(|a| dup(&a.evt)).transpose()?,
        exit: dup(exit.evt())?,
        tasks: dup(&task_evt)?,
        api_pending: false,
        exit_pending: false,
        tasks_pending: false,
    }));
    em.add_subscriber(wakeups.clone());
    controller.set_task_sender(TaskSender {
        tx: task_tx,
        evt: Arc::new(task_evt),
    });

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
        let (api_pending, exit_pending, tasks_pending) = {
            let mut w = lock(&wakeups);
            let r = (w.api_pending, w.exit_pending, w.tasks_pending);
            w.api_pending = false;
            w.exit_pending = false;
            w.tasks_pending = false;
            r
        };
        if tasks_pending {
            while let Ok(task) = task_rx.try_recv() {
                task(&mut controller, &mut em);
            }
        }
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
            // The vCPUs are stopped: the counts of what the guest's last
            // burst of mistakes had suppressed are final.
            crate::guest_log::report_suppressed();
            return Ok(code);
        }
    }
}
