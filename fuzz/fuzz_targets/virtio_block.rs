//! virtio-blk: arbitrary descriptor tables and avail rings over a small
//! guest memory, processed by the real device on a 64 KiB file.
//!
//! Input: a config byte (bit 0 read-only, bit 1 Writeback cache, bits 2-7
//! which features the driver acks), then `ember_fuzz::guest`'s layout for
//! one queue.
#![no_main]

use std::sync::{Arc, OnceLock};

use ember_fuzz::{guest, Cursor};
use ember_vmm::devices::virtio::block::Block;
use ember_vmm::devices::virtio::{Interrupt, VirtioDevice};
use ember_vmm::vmm_config::drive::BlockDeviceConfig;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::tempfile::TempFile;

const DISK_LEN: u64 = 64 << 10;

fn disk() -> &'static TempFile {
    static DISK: OnceLock<TempFile> = OnceLock::new();
    DISK.get_or_init(|| TempFile::new_in(std::path::Path::new("/dev/shm")).expect("temp file"))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Cursor::new(data);
    let conf = input.u8();
    let f = disk();
    // The same content every run.
    f.as_file().set_len(0).expect("truncate");
    f.as_file().set_len(DISK_LEN).expect("set_len");
    let cfg = BlockDeviceConfig {
        drive_id: "rootfs".into(),
        path_on_host: f.as_path().to_str().expect("utf-8").into(),
        is_root_device: true,
        is_read_only: conf & 1 != 0,
        cache_type: (conf & 2 != 0).then(|| "Writeback".to_string()),
        ..Default::default()
    };
    let mut block = Block::new(&cfg).expect("block device");
    let g = guest(&mut input, 1);
    // Feature bits by position: VIRTIO_F_VERSION_1 always, EVENT_IDX as the
    // queues have it; INDIRECT_DESC, FLUSH, DISCARD, WRITE_ZEROES as the
    // input says.
    let mut acked = (1u64 << 32) | (u64::from(g.event_idx) << 29);
    for (i, bit) in [28u32, 9, 13, 14].iter().enumerate() {
        if (conf >> (2 + i)) & 1 != 0 {
            acked |= 1 << bit;
        }
    }
    block.set_acked_features(acked & block.avail_features());
    let interrupt = Arc::new(Interrupt::new().expect("eventfd"));
    block
        .activate(g.mem.clone(), interrupt, g.queues)
        .expect("activate");
    block.process_queue();
    block.drain_in_flight();
    // Again: whatever the first pass left (a broken device stays quiet).
    block.process_queue();
    block.drain_in_flight();
    assert_eq!(block.in_flight(), 0);
});
