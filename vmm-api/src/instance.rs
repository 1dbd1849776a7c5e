//! The microVM as a whole: `GET /` (Firecracker's `InstanceInfo`),
//! `PUT /actions` (`InstanceActionInfo`), `PATCH /vm` (`Vm`), and the
//! body of every error answer (`Error`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `GET /`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

/// What `PUT /actions` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured microVM.
    InstanceStart,
    /// Ctrl-Alt-Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

impl ActionType {
    /// Every action, in the order error messages list them.
    pub const ALL: [ActionType; 3] = [
        ActionType::InstanceStart,
        ActionType::SendCtrlAltDel,
        ActionType::FlushMetrics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActionType::InstanceStart => "InstanceStart",
            ActionType::SendCtrlAltDel => "SendCtrlAltDel",
            ActionType::FlushMetrics => "FlushMetrics",
        }
    }
}

impl fmt::Display for ActionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ActionType {
    type Err = String;

    /// The error is the API's answer to an unknown action.
    fn from_str(s: &str) -> Result<Self, String> {
        ActionType::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<String> = ActionType::ALL.iter().map(|a| format!("`{a}`")).collect();
                format!(
                    "Unknown action_type `{s}`, expected one of {}.",
                    all.join(", ")
                )
            })
    }
}

/// `PUT /actions`. `action_type` is kept as a string, not a serde enum:
/// serde's error for a wrong value ("unknown variant", or "expected value"
/// for a non-string) does not say what is wrong as well as
/// [`InstanceActionInfo::action`] does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: String,
}

impl InstanceActionInfo {
    pub fn new(action: ActionType) -> Self {
        InstanceActionInfo {
            action_type: action.as_str().to_string(),
        }
    }

    /// The action asked for, or the API's error for an unknown one.
    pub fn action(&self) -> Result<ActionType, String> {
        self.action_type.parse()
    }
}

/// The state `PATCH /vm` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateUpdate {
    pub state: VmState,
}

/// The body of every 4xx and 5xx answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultBody {
    pub fault_message: String,
}

impl FaultBody {
    pub fn new(fault_message: impl Into<String>) -> Self {
        FaultBody {
            fault_message: fault_message.into(),
        }
    }
}
