//! The guest kernel and root filesystem, built (or found in the cache) by
//! `kernels/build.sh` and `rootfs/build.sh`. `EMBER_KERNEL` and
//! `EMBER_ROOTFS` (and `EMBER_ROOTFS_PROVIDED`, `EMBER_ROOTFS_PYTHON3`,
//! `EMBER_ROOTFS_NODEJS`) point
//! at prebuilt ones instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn run_build_script(script: &str, args: &[&str]) -> PathBuf {
    let path = workspace_root().join(script);
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        path.display(),
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("").trim().to_string();
    let p = PathBuf::from(&last);
    assert!(
        p.is_file(),
        "{} printed {last:?}, which is not a file",
        path.display()
    );
    p
}

fn artifact(var: &str, script: &str, cell: &'static OnceLock<PathBuf>) -> PathBuf {
    cell.get_or_init(|| match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => run_build_script(script, &[]),
    })
    .clone()
}

pub fn kernel_path() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    artifact("EMBER_KERNEL", "kernels/build.sh", &CELL)
}

pub fn rootfs_path() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    artifact("EMBER_ROOTFS", "rootfs/build.sh", &CELL)
}

/// The root filesystem of a Lambda runtime, `runtime` = "provided" (bash,
/// curl), "python3" (python3 and awslambdaric) or "nodejs" (node and
/// Ember's runtime client), or of the benchmarks' "bench" variant (iperf3),
/// built by `rootfs/build.sh <runtime>` or named by `EMBER_ROOTFS_<RUNTIME>`
/// (`EMBER_ROOTFS_PROVIDED`, `EMBER_ROOTFS_PYTHON3`, `EMBER_ROOTFS_NODEJS`,
/// `EMBER_ROOTFS_BENCH`).
pub fn runtime_rootfs_path(runtime: &str) -> PathBuf {
    static PROVIDED: OnceLock<PathBuf> = OnceLock::new();
    static PYTHON3: OnceLock<PathBuf> = OnceLock::new();
    static NODEJS: OnceLock<PathBuf> = OnceLock::new();
    static BENCH: OnceLock<PathBuf> = OnceLock::new();
    let cell = match runtime {
        "provided" => &PROVIDED,
        "python3" => &PYTHON3,
        "nodejs" => &NODEJS,
        "bench" => &BENCH,
        other => {
            panic!("unknown runtime {other:?}: expected \"provided\", \"python3\", \"nodejs\" or \"bench\"")
        }
    };
    let var = format!("EMBER_ROOTFS_{}", runtime.to_uppercase());
    cell.get_or_init(|| match std::env::var_os(&var) {
        Some(p) => PathBuf::from(p),
        None => run_build_script("rootfs/build.sh", &[runtime]),
    })
    .clone()
}

/// A binary of this workspace, built by `cargo build` beside the test binary
/// (or named by `EMBER_<NAME>_BIN`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("EMBER_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = profile_dir.join(name);
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (or set {var})",
        p.display()
    );
    p
}
