//! What one plugin may use, and how a breach is recognised.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::ResourceLimiter;

use super::exchange::Phase;

/// The budget of a plugin: per call, per instance and across instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginBudget {
    /// Longest time one call may run.
    pub deadline: Duration,
    /// Most linear memory one instance may have, in bytes.
    pub memory: u64,
    /// Most instances alive at once; past it, requests get a fast 503.
    pub instances: u32,
    /// Most host calls in one call.
    pub host_calls: u32,
    /// Most headers a message may have after the plugin's edits.
    pub headers: u32,
    /// Longest header value, and longest immediate-response header value, in bytes.
    pub header_value: u32,
    /// Longest log line, in bytes.
    pub log_line: u32,
    /// Largest body the plugin may hand the gateway (a replaced request body, an immediate
    /// response's body).
    pub body: u64,
    /// Whether the plugin may read and replace request bodies.
    pub body_access: bool,
}

/// The kinds of plugin failure, as reported to the operator and counted per plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The plugin refused its configuration.
    Config,
    /// A trap: a panic, `unreachable`, an out-of-bounds access, a stack overflow, a call made
    /// out of phase.
    Trap,
    /// A call ran past its deadline.
    Deadline,
    /// An instance tried to grow its memory past its cap.
    Memory,
    /// A host-call cap was exceeded: too many calls, headers, bytes.
    Cap,
    /// The plugin handed the gateway something it refuses: a hostile header, an invalid status.
    Contract,
    /// The plugin's instance cap was reached.
    Overloaded,
}

impl FailureKind {
    /// Every kind, in a fixed order (the order of [`FailureCounters`]).
    pub const ALL: [FailureKind; 7] = [
        FailureKind::Config,
        FailureKind::Trap,
        FailureKind::Deadline,
        FailureKind::Memory,
        FailureKind::Cap,
        FailureKind::Contract,
        FailureKind::Overloaded,
    ];

    /// The kind's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Config => "config",
            FailureKind::Trap => "trap",
            FailureKind::Deadline => "deadline",
            FailureKind::Memory => "memory",
            FailureKind::Cap => "cap",
            FailureKind::Contract => "contract",
            FailureKind::Overloaded => "overloaded",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Failures of one plugin, by kind, since it was loaded.
#[derive(Debug, Default)]
pub struct FailureCounters([AtomicU64; FailureKind::ALL.len()]);

impl FailureCounters {
    /// Counts one failure.
    pub fn record(&self, kind: FailureKind) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Failures of one kind so far.
    pub fn get(&self, kind: FailureKind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }
}

/// Why a plugin call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// What went wrong, broadly.
    pub kind: FailureKind,
    /// The phase that was running.
    pub phase: Phase,
    /// For the operator only: the trap message with the guest backtrace, the breached cap, the
    /// refused header, the plugin's own config error. Never sent to a client.
    pub detail: String,
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FailureKind::Config => write!(f, "invalid config: {}", self.detail),
            kind => write!(
                f,
                "{kind} in the {} phase: {}",
                self.phase.as_str(),
                self.detail
            ),
        }
    }
}

impl std::error::Error for PluginError {}

/// Enforces the memory cap, and remembers a breach so that the trap it causes is reported as a
/// memory failure rather than a generic trap.
pub(super) struct Limiter {
    pub memory: usize,
    pub breached: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.breached = true;
            // An error, not `Ok(false)`: a guest that ignores a failed `memory.grow` must stop.
            wasmtime::bail!(
                "memory cap of {} bytes reached (wanted {desired})",
                self.memory
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; Rust plugins never grow them much.
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        // A component's core instances: its main module and the shims that lower its imports.
        64
    }

    fn memories(&self) -> usize {
        16
    }

    fn tables(&self) -> usize {
        64
    }
}
