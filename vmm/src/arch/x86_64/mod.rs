//! x86_64 guest set-up: memory layout, boot parameters, CPU registers,
//! CPUID, MSRs, the LAPIC and the MP table (no ACPI).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod nested;
pub mod regs;
