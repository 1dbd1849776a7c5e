//! A guest that hammers registers no device has must not grow the VMM's
//! log without bound (issue 18: "a guest does 10^6 unknown-register reads
//! and the VMM log grows at most 1 MiB").
//!
//! Ember's guest kernel gives its user space no way to touch device
//! registers (no /dev/mem, no modules, no ioperm), so the guest here is a
//! *bare guest*: a tiny 64-bit ELF "kernel", assembled by hand below, that
//! the real `ember-vmm` boots exactly as it boots vmlinux (linux-loader's
//! ELF loader, 64-bit entry with the VMM's identity page tables). At CPL 0
//! it maps the virtio-mmio window, reads and writes an unknown register of
//! the vsock device's transport N times, reports on the serial console what
//! it did and saw, and resets the machine through the i8042.
//!
//! `EMBER_FLOOD_ITERATIONS` overrides N (default 10^6) for measuring.

use std::path::Path;
use std::time::{Duration, Instant};

use ember_tests::{kvm_available, VmmProcess};
use ember_vmm::guest_log::events_in;

/// Where the bare guest is loaded and entered (the VMM's HIMEM_START: the
/// ELF loader refuses anything below it).
const LOAD: u64 = 0x10_0000;
/// The page directory the guest installs for 0xc000_0000..0x1_0000_0000:
/// the second page of the segment (the first holds the code).
const PD: u64 = LOAD + 0x1000;
/// The first virtio-mmio slot: the only device configured (vsock) is there.
const MMIO_SLOT0: u64 = 0xd000_0000;
/// A virtio-mmio register offset that no register has (0x0f8, just below
/// ConfigGeneration): reads log "read of unknown register" and return 0,
/// writes log "write of unknown register".
const UNKNOWN_REG: u32 = 0x0f8;
/// The device's own configuration space in the transport's window.
const CONFIG_SPACE: u32 = 0x100;
/// An I/O port no device claims (the firmware-config port of other VMMs).
const UNCLAIMED_PORT: u16 = 0x510;
const COM1: u16 = 0x3f8;
const DEFAULT_ITERATIONS: u32 = 1_000_000;
const LOG_LIMIT: u64 = 1 << 20;

/// Hand-assembled x86-64 machine code: each method emits one instruction.
#[derive(Default)]
struct Asm {
    code: Vec<u8>,
}

impl Asm {
    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }
    fn pos(&self) -> usize {
        self.code.len()
    }
    /// `jnz target` (rel8) to an earlier position.
    fn jnz_back(&mut self, target: usize) {
        let rel = target as i64 - (self.pos() as i64 + 2);
        let rel = i8::try_from(rel).expect("loop body fits a rel8 jump");
        self.emit(&[0x75, rel as u8]);
    }
    /// `mov al, b; out dx, al` for every byte (DX = COM1's data port).
    fn print(&mut self, s: &str) {
        for b in s.bytes() {
            self.emit(&[0xb0, b]); // mov al, b
            self.emit(&[0xee]); // out dx, al
        }
    }
    /// Prints RBX as 16 upper-case hex digits (clobbers RAX, RCX, RBX).
    fn print_rbx_hex(&mut self) {
        self.emit(&[0xb9, 16, 0, 0, 0]); // mov ecx, 16
        let digit = self.pos();
        self.emit(&[0x48, 0xc1, 0xc3, 0x04]); // rol rbx, 4  (top nibble to the bottom)
        self.emit(&[0x88, 0xd8]); // mov al, bl
        self.emit(&[0x24, 0x0f]); // and al, 0x0f
        self.emit(&[0x04, b'0']); // add al, '0'
        self.emit(&[0x3c, b'9']); // cmp al, '9'
        self.emit(&[0x76, 0x02]); // jbe +2 (over the next instruction)
        self.emit(&[0x04, b'A' - b'9' - 1]); // add al, 7  ('9'+1 -> 'A')
        self.emit(&[0xee]); // out dx, al
        self.emit(&[0xff, 0xc9]); // dec ecx
        self.jnz_back(digit); // jnz digit
    }
}

/// The bare guest's code: `iterations` rounds of four accesses that the
/// vsock device's virtio-mmio transport logs as the guest's mistakes (a read
/// and a write of an unknown register, a 1-byte register read, a write to
/// the read-only config space), then a report line on COM1, then an
/// i8042 reset (the VMM exits with code 0), then hlt for ever.
fn guest_code(iterations: u32) -> Vec<u8> {
    let mut a = Asm::default();
    // Entry: long mode, CPL 0, interrupts off, CR3 = the VMM's identity map
    // of the first GiB (PML4[0] -> PDPT, PDPT[0] -> 2 MiB pages).
    // The MMIO hole (0xd000_0000) is above that map: point PDPT[3]
    // (0xc000_0000..0x1_0000_0000) at our own page directory, whose entry
    // for 0xd000_0000 is in the segment's data (see `bare_guest_elf`).
    a.emit(&[0x0f, 0x20, 0xd8]); // mov rax, cr3
    a.emit(&[0x48, 0x8b, 0x18]); // mov rbx, [rax]          (PML4[0])
    a.emit(&[0x48, 0x81, 0xe3, 0x00, 0xf0, 0xff, 0xff]); // and rbx, -4096 (PDPT address)
    a.emit(&[0xb9]); // mov ecx, PD | present | writable
    a.emit(&(PD as u32 | 0x3).to_le_bytes());
    a.emit(&[0x48, 0x89, 0x4b, 0x18]); // mov [rbx + 3*8], rcx  (PDPT[3])
    a.emit(&[0x0f, 0x22, 0xd8]); // mov cr3, rax            (flush the TLB)

    a.emit(&[0xbf]); // mov edi, MMIO_SLOT0  (zero-extended into RDI)
    a.emit(&(MMIO_SLOT0 as u32).to_le_bytes());

    // Once each: an unclaimed port and an unclaimed MMIO address (the
    // second slot's window, empty). Both should read as all-ones.
    a.emit(&[0x66, 0xba]); // mov dx, UNCLAIMED_PORT
    a.emit(&UNCLAIMED_PORT.to_le_bytes());
    a.emit(&[0xed]); // in eax, dx  (zero-extends into RAX)
    a.emit(&[0x49, 0x89, 0xc3]); // mov r11, rax
    a.emit(&[0x8b, 0x87, 0x00, 0x10, 0x00, 0x00]); // mov eax, [rdi + 0x1000]
    a.emit(&[0x49, 0x89, 0xc4]); // mov r12, rax

    // The flood. R10 counts down, R8 counts rounds done, R9 the unknown
    // reads that returned 0.
    a.emit(&[0x41, 0xba]); // mov r10d, iterations
    a.emit(&iterations.to_le_bytes());
    a.emit(&[0x45, 0x31, 0xc0]); // xor r8d, r8d
    a.emit(&[0x45, 0x31, 0xc9]); // xor r9d, r9d
    let top = a.pos();
    a.emit(&[0x8b, 0x87]); // mov eax, [rdi + UNKNOWN_REG]   (MMIO read exit)
    a.emit(&UNKNOWN_REG.to_le_bytes());
    a.emit(&[0x85, 0xc0]); // test eax, eax
    a.emit(&[0x75, 0x03]); // jnz +3 (over the next instruction)
    a.emit(&[0x49, 0xff, 0xc1]); // inc r9
    a.emit(&[0x89, 0x87]); // mov [rdi + UNKNOWN_REG], eax   (MMIO write exit)
    a.emit(&UNKNOWN_REG.to_le_bytes());
    a.emit(&[0x8a, 0x87]); // mov al, [rdi + UNKNOWN_REG]   (a 1-byte register read: bad width)
    a.emit(&UNKNOWN_REG.to_le_bytes());
    a.emit(&[0x89, 0x87]); // mov [rdi + CONFIG_SPACE], eax  (the vsock config is read-only)
    a.emit(&CONFIG_SPACE.to_le_bytes());
    a.emit(&[0x49, 0xff, 0xc0]); // inc r8
    a.emit(&[0x49, 0xff, 0xca]); // dec r10
    a.jnz_back(top); // jnz top

    // The report, one line on COM1.
    a.emit(&[0x66, 0xba]); // mov dx, COM1
    a.emit(&COM1.to_le_bytes());
    a.print("ember-bare: rounds=");
    a.emit(&[0x4c, 0x89, 0xc3]); // mov rbx, r8
    a.print_rbx_hex();
    a.print(" zero_reads=");
    a.emit(&[0x4c, 0x89, 0xcb]); // mov rbx, r9
    a.print_rbx_hex();
    a.print(" unclaimed_port=");
    a.emit(&[0x4c, 0x89, 0xdb]); // mov rbx, r11
    a.print_rbx_hex();
    a.print(" unclaimed_mmio=");
    a.emit(&[0x4c, 0x89, 0xe3]); // mov rbx, r12
    a.print_rbx_hex();
    a.print(" end\n");

    // Reset through the keyboard controller: the VMM ends the VM.
    a.emit(&[0xb0, 0xfe]); // mov al, 0xfe   (pulse reset)
    a.emit(&[0xe6, 0x64]); // out 0x64, al
    a.emit(&[0xfa]); // cli
    let halt = a.pos();
    a.emit(&[0xf4]); // hlt
    let rel = halt as i64 - (a.pos() as i64 + 2);
    a.emit(&[0xeb, rel as i8 as u8]); // jmp halt
    a.code
}

/// An ELF64 executable: the header, one PT_LOAD program header, and the
/// segment at file offset 0x1000, loaded at `LOAD`: a page of code, then
/// the page directory for 0xc000_0000.., whose one entry maps the 2 MiB at
/// `MMIO_SLOT0` (present, writable, uncached, 2 MiB page).
fn bare_guest_elf(code: &[u8]) -> Vec<u8> {
    assert!(code.len() <= 0x1000, "code is {} bytes", code.len());
    let mut segment = code.to_vec();
    segment.resize(0x2000, 0);
    let pde_index = ((MMIO_SLOT0 - 0xc000_0000) >> 21) as usize;
    let pde: u64 = MMIO_SLOT0 | 0x80 /* PS */ | 0x10 /* PCD */ | 0x08 /* PWT */ | 0x3;
    segment[0x1000 + pde_index * 8..][..8].copy_from_slice(&pde.to_le_bytes());

    let mut elf = Vec::new();
    // Elf64_Ehdr
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    elf.extend_from_slice(&[0; 8]); // padding
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff: right after this header
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(elf.len(), 64);
    // Elf64_Phdr
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // p_flags: RWX
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr (where the VMM loads it)
    elf.extend_from_slice(&(segment.len() as u64).to_le_bytes()); // p_filesz
    elf.extend_from_slice(&(segment.len() as u64).to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    assert_eq!(elf.len(), 64 + 56);
    elf.resize(0x1000, 0);
    elf.extend_from_slice(&segment);
    elf
}

/// The value after `key=` in the guest's report line, as hex.
fn report_field(report: &str, key: &str) -> u64 {
    let v = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {report:?}"));
    u64::from_str_radix(v, 16).unwrap_or_else(|e| panic!("{key}={v}: {e}"))
}

fn ok(vmm: &VmmProcess, r: ember_tests::ApiReply, what: &str) {
    assert_eq!(r.status, 204, "{what}: {r:?}; {}", vmm.logs());
}

/// Boots the bare guest in a fresh `ember-vmm` (1 vCPU, 32 MiB, a vsock
/// device in the first MMIO slot), with metrics written to `metrics`.
fn boot_bare_guest(vmm: &VmmProcess, kernel: &Path, metrics: &Path) {
    use serde_json::json;
    ok(
        vmm,
        vmm.put("/metrics", &json!({"metrics_path": metrics})),
        "metrics",
    );
    ok(
        vmm,
        vmm.put(
            "/boot-source",
            &json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
        ),
        "boot-source",
    );
    ok(
        vmm,
        vmm.put(
            "/machine-config",
            &json!({"vcpu_count": 1, "mem_size_mib": 32}),
        ),
        "machine-config",
    );
    ok(
        vmm,
        vmm.put(
            "/vsock",
            &json!({"guest_cid": 3, "uds_path": vmm.path("vsock.sock")}),
        ),
        "vsock",
    );
    ok(
        vmm,
        vmm.put("/actions", &json!({"action_type": "InstanceStart"})),
        "InstanceStart",
    );
}

#[test]
fn a_million_unknown_register_accesses_log_at_most_a_mebibyte() {
    assert!(kvm_available(), "this test needs /dev/kvm (read-write)");
    let iterations: u32 = std::env::var("EMBER_FLOOD_ITERATIONS")
        .ok()
        .map(|v| v.parse().expect("EMBER_FLOOD_ITERATIONS is a number"))
        .unwrap_or(DEFAULT_ITERATIONS);
    let n = u64::from(iterations);

    let mut vmm = VmmProcess::spawn(&[]);
    let kernel = vmm.path("bare-guest.elf");
    std::fs::write(&kernel, bare_guest_elf(&guest_code(iterations))).unwrap();
    let metrics = vmm.path("metrics.json");
    let start = Instant::now();
    boot_bare_guest(&vmm, &kernel, &metrics);

    // Four exits per round, 14 us each measured here (nested kvm_pvm,
    // 10^6 rounds in about a minute): this allows 25 times that.
    let timeout = Duration::from_secs(60) + Duration::from_micros(n * 4 * 14 * 25);
    let status = vmm
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("the guest did not finish in {timeout:?}; {}", vmm.logs()));
    let elapsed = start.elapsed();
    assert!(status.success(), "ember-vmm: {status}; {}", vmm.logs());

    // The guest's own account: every round ran, every unknown read gave 0,
    // nothing claimed reads as all-ones.
    let serial = std::fs::read_to_string(&vmm.serial_log).unwrap();
    let report = serial
        .lines()
        .find(|l| l.starts_with("ember-bare:") && l.ends_with(" end"))
        .unwrap_or_else(|| panic!("no report on the console; {}", vmm.logs()));
    assert_eq!(report_field(report, "rounds"), n, "{report}");
    assert_eq!(report_field(report, "zero_reads"), n, "{report}");
    assert_eq!(
        report_field(report, "unclaimed_port"),
        0xffff_ffff,
        "{report}"
    );
    assert_eq!(
        report_field(report, "unclaimed_mmio"),
        0xffff_ffff,
        "{report}"
    );

    // The VMM's account: the exits happened (written at exit).
    let m = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    let reads = last["vcpu"]["exit_mmio_read"].as_u64().unwrap();
    let writes = last["vcpu"]["exit_mmio_write"].as_u64().unwrap();
    assert!(reads > 2 * n, "{reads} MMIO read exits for {n} rounds");
    assert!(writes >= 2 * n, "{writes} MMIO write exits for {n} rounds");

    // The log (the VMM's stderr, all it writes): bounded, yet every kind
    // of mistake shows in it, and no kind more than a few lines a second.
    let log_bytes = std::fs::metadata(&vmm.vmm_log).unwrap().len();
    let log = std::fs::read_to_string(&vmm.vmm_log).unwrap();
    let secs = elapsed.as_secs_f64();
    eprintln!(
        "{n} rounds ({} MMIO exits) in {secs:.1} s: {:.0} exits/s, {:.1} us per exit \
         (wall clock from InstanceStart to VMM exit); VMM log {log_bytes} bytes",
        reads + writes,
        (reads + writes) as f64 / secs,
        secs * 1e6 / (reads + writes) as f64,
    );
    assert!(
        log_bytes <= LOG_LIMIT,
        "{log_bytes} bytes of VMM log for {n} rounds"
    );
    let msgs: Vec<String> = log
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}"));
            v["msg"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    for site in [
        "virtio-mmio: read of unknown register 0xf8",
        "virtio-mmio: write of unknown register 0xf8",
        "virtio-mmio: bad register read at 0xf8 len 1",
        "vsock: guest write to read-only config space at 0x0",
    ] {
        let lines: Vec<&String> = msgs.iter().filter(|m| m.contains(site)).collect();
        let summaries: Vec<&&String> = lines.iter().filter(|m| m.contains("suppressed")).collect();
        eprintln!(
            "  {site:?}: {} lines, {} with a count of suppressed ones, e.g. {:?}",
            lines.len(),
            summaries.len(),
            summaries.last(),
        );
        assert!(
            (lines.len() as u64) < n / 1000 + 60,
            "{} lines of {site:?} for {n} rounds",
            lines.len()
        );
        if n > ember_vmm::guest_log::BURST {
            assert!(!summaries.is_empty(), "no count of suppressed lines");
        }
        // Every access is in the log: as a line, or counted in one (the
        // last window's count is logged when the VMM exits).
        let events: u64 = lines.iter().map(|m| events_in(m)).sum();
        assert_eq!(events, n, "{site:?}: {lines:?}");
    }
}

/// The bare guest's code for a reset storm: `out 0x64, 0xfe` (i8042 pulse
/// reset) again and again, as fast as it can, until the VMM stops it.
fn reset_storm_code() -> Vec<u8> {
    let mut a = Asm::default();
    a.emit(&[0xb0, 0xfe]); // mov al, 0xfe
    let top = a.pos();
    a.emit(&[0xe6, 0x64]); // out 0x64, al   (PIO write exit)
    let rel = top as i64 - (a.pos() as i64 + 2);
    a.emit(&[0xeb, rel as i8 as u8]); // jmp top
    a.code
}

/// A guest that asks for a reset without end gets one VM end and one log
/// line, however many requests reach the VMM before its vCPU is stopped.
#[test]
fn a_reset_storm_logs_one_line() {
    assert!(kvm_available(), "this test needs /dev/kvm (read-write)");
    let mut vmm = VmmProcess::spawn(&[]);
    let kernel = vmm.path("bare-guest.elf");
    std::fs::write(&kernel, bare_guest_elf(&reset_storm_code())).unwrap();
    let metrics = vmm.path("metrics.json");
    boot_bare_guest(&vmm, &kernel, &metrics);
    let timeout = Duration::from_secs(120);
    let status = vmm
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("the VM did not end in {timeout:?}; {}", vmm.logs()));
    assert!(status.success(), "ember-vmm: {status}; {}", vmm.logs());
    let m = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    let outs = last["vcpu"]["exit_io_out"].as_u64().unwrap();
    let log = std::fs::read_to_string(&vmm.vmm_log).unwrap();
    let resets = log
        .lines()
        .filter(|l| l.contains("guest requested CPU reset"))
        .count();
    // The metrics are written at exit before the vCPU is stopped: a lower
    // bound of the requests (before the fix, 15 to 88 requests here, each
    // one logged).
    eprintln!("at least {outs} reset requests; {resets} reset lines");
    assert!(outs >= 1, "the guest never ran; {log}");
    assert_eq!(resets, 1, "{outs} reset requests; {log}");
}
