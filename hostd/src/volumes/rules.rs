//! The rules of a function's volume: Lambda's `FileSystemConfigs`, the
//! names the volume service takes, the guest device and its mount.

use super::VolumeError;
use crate::model::FileSystem;

/// The guest device of a function's volume: the drive after the root
/// filesystem, the code and, if the function has one, its `/tmp` disk.
pub fn guest_device(with_tmp_disk: bool) -> &'static str {
    if with_tmp_disk {
        "/dev/vdd"
    } else {
        "/dev/vdc"
    }
}
/// The VMM's drive id for it.
pub const DRIVE_ID: &str = "volume";

/// 1 to `max` letters, digits, `-`, `_` or `.`.
fn name_ok(name: &str, max: usize) -> bool {
    (1..=max).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A volume name the service takes: 1 to 64 letters, digits, `-` or `_`.
fn volume_name_ok(name: &str) -> bool {
    name_ok(name, 64) && !name.contains('.')
}

/// A volume named in hostd's own volume API.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    if volume_name_ok(name) {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(name.to_string()))
    }
}

/// Lambda's rule for `LocalMountPath` (`/mnt/` and a name), and a volume
/// name the service takes.
pub fn validate(fs: &FileSystem) -> Result<(), VolumeError> {
    let path_ok = fs
        .mount_path
        .strip_prefix("/mnt/")
        .is_some_and(|n| name_ok(n, 160) && n != "." && n != "..");
    if !path_ok {
        return Err(VolumeError::BadMountPath(fs.mount_path.clone()));
    }
    if !volume_name_ok(&fs.volume) {
        return Err(VolumeError::BadVolumeName(fs.volume.clone()));
    }
    Ok(())
}

/// The guest commands that mount the volume at `path` (under `/mnt`, a
/// tmpfs made for it since the root filesystem is read-only), owned by
/// the function's user.
pub fn mount_script(device: &str, path: &str, uid: u32, gid: u32) -> String {
    format!(
        "set -e\n\
         grep -q ' /mnt ' /proc/mounts || mount -t tmpfs -o mode=0755 tmpfs /mnt\n\
         mkdir -p '{path}'\n\
         mount -t ext4 -o noatime,sync {device} '{path}'\n\
         chown {uid}:{gid} '{path}'\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(volume: &str, mount_path: &str) -> FileSystem {
        FileSystem {
            volume: volume.into(),
            mount_path: mount_path.into(),
        }
    }

    #[test]
    fn volume_names_and_mount_paths_follow_lambda_and_the_service() {
        assert!(validate(&fs("data-1_x", "/mnt/data")).is_ok());
        for bad in ["/data", "/mnt/", "/mnt/..", "/mnt/a/b", "/mnt/a b"] {
            let e = validate(&fs("v", bad)).unwrap_err().to_string();
            assert!(e.contains("LocalMountPath"), "{bad}: {e}");
        }
        for bad in ["", "a.b", "a/b", &"x".repeat(65)] {
            assert!(matches!(
                validate(&fs(bad, "/mnt/v")),
                Err(VolumeError::BadVolumeName(_))
            ));
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"x".repeat(64)).is_ok());
    }
}
