//! The connection to the guest agent, through the VMM's vsock socket:
//! (re)connecting after a boot, restore or migration, calls on it, and
//! its clean close before a snapshot.

use std::time::{Duration, Instant};

use ember_agent::{AgentClient, ClientError, AGENT_PORT};

use super::{Instance, InstanceError};

/// Longest wait for the agent to close its side of a connection we end.
const AGENT_CLOSE: Duration = Duration::from_secs(5);

impl Instance {
    /// Runs `script` with `sh` as root in the guest; an error unless it
    /// exits 0.
    pub async fn run_in_guest(&self, script: String) -> Result<(), InstanceError> {
        let req = ember_agent::protocol::ExecRequest {
            timeout_ms: Some(60_000),
            ..ember_agent::protocol::ExecRequest::new(["/bin/sh", "-c", &script])
        };
        let r = self.with_agent(move |a| a.exec(&req)).await??;
        if r.exit_code == Some(0) {
            Ok(())
        } else {
            Err(InstanceError::Spawn(format!(
                "in the guest, {script:?} ended with {:?}/{:?}: {}",
                r.exit_code,
                r.signal,
                String::from_utf8_lossy(&r.stderr).trim()
            )))
        }
    }

    /// Connects to the agent again (a migration away failed and the VM
    /// runs here still).
    pub async fn reconnect_agent(&self) -> Result<(), InstanceError> {
        self.connect_agent(Duration::from_secs(30)).await
    }

    /// Connects to the agent. After a restore the guest drops connections
    /// made before it handled the vsock reset, so each attempt is short
    /// and proven with a health check; a dropped connection fails at once,
    /// and only a slow answer waits out an attempt, so the attempts grow
    /// (2, 4, 8, then 10 s) for a guest that is merely slow (a loaded host).
    pub(super) async fn connect_agent(&self, timeout: Duration) -> Result<(), InstanceError> {
        let uds = self.vsock_path();
        let slot = self.agent.clone();
        let task = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + timeout;
            let mut attempt_timeout = Duration::from_secs(2);
            loop {
                let r = AgentClient::connect_retry(
                    &uds,
                    AGENT_PORT,
                    Duration::from_secs(5),
                    attempt_timeout,
                )
                .and_then(|mut a| a.health().map(|_| a));
                attempt_timeout = (attempt_timeout * 2).min(Duration::from_secs(10));
                match r {
                    Ok(a) => {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
                        return Ok(());
                    }
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        self.unless_exited(async {
            task.await
                .map_err(|e| InstanceError::Spawn(format!("agent connector: {e}")))?
                .map_err(InstanceError::Agent)
        })
        .await
    }

    /// Runs `f` on the agent connection in a blocking thread. Fails at once
    /// if the VMM exits meanwhile.
    pub async fn with_agent<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut AgentClient) -> T + Send + 'static,
    ) -> Result<T, InstanceError> {
        let slot = self.agent.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_mut().map(f)
        });
        self.unless_exited(async {
            match task.await {
                Ok(Some(v)) => Ok(v),
                Ok(None) => Err(InstanceError::Agent(ClientError::Closed)),
                Err(e) => Err(InstanceError::Spawn(format!("agent call: {e}"))),
            }
        })
        .await
    }

    /// Closes the agent connection cleanly (before a snapshot: clones
    /// would otherwise wake up with a connection whose host end is gone,
    /// which their restore must first end).
    pub async fn close_agent(&self) {
        let slot = self.agent.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let agent = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(agent) = agent {
                if !agent.close(AGENT_CLOSE) {
                    log::debug!("the agent did not close its connection within {AGENT_CLOSE:?}");
                }
            }
        })
        .await;
    }
}
