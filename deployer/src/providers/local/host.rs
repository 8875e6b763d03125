//! What a machine needs before it can run a local stage's runners, checked
//! up front so a deploy stops with the fix instead of failing halfway.

use std::path::Path;

/// One thing the machine lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// What is missing.
    pub what: &'static str,
    /// The Debian/Ubuntu package that brings it, if one does.
    pub package: Option<&'static str>,
}

/// Programs runners run, with their package.
const TOOLS: [(&str, &str, &str); 6] = [
    (
        "/usr/bin/bwrap",
        "bubblewrap (/usr/bin/bwrap)",
        "bubblewrap",
    ),
    ("nft", "nft (box egress rules)", "nftables"),
    ("ip", "ip (box network interfaces)", "iproute2"),
    ("mkfs.ext4", "mkfs.ext4 (box disks)", "e2fsprogs"),
    ("e2fsck", "e2fsck (box disks)", "e2fsprogs"),
    (
        "/bin/busybox",
        "a static busybox (/bin/busybox, the default image)",
        "busybox-static",
    ),
];

fn on_path(name: &str) -> bool {
    if name.starts_with('/') {
        return Path::new(name).is_file();
    }
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        .split(':')
        .any(|d| Path::new(d).join(name).is_file())
}

/// What this machine lacks to run runners (empty when nothing).
pub fn missing() -> Vec<Missing> {
    let mut out = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        out.push(Missing {
            what: "root: runners mount, create cgroups and network namespaces (run boxctl as root)",
            package: None,
        });
    }
    for (bin, what, package) in TOOLS {
        let present = on_path(bin)
            && (bin != "/bin/busybox" || std::fs::read(bin).is_ok_and(|b| is_static(&b)));
        if !present {
            out.push(Missing {
                what,
                package: Some(package),
            });
        }
    }
    if !Path::new("/dev/loop-control").exists() {
        out.push(Missing {
            what: "loop devices (/dev/loop-control; `modprobe loop`)",
            package: None,
        });
    }
    out
}

/// True for an ELF without a program interpreter (statically linked).
fn is_static(elf: &[u8]) -> bool {
    // PT_INTERP (3) among the program headers of a 64-bit little-endian ELF.
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4)
            .is_none_or(|t| u32::from_le_bytes(t.try_into().unwrap_or_default()) != 3)
    })
}

/// The message for what is missing: each item, then the command that installs it.
pub fn explain(missing: &[Missing]) -> String {
    let mut s = String::from("this machine cannot run the stage's runners yet; it lacks:\n");
    for m in missing {
        s.push_str(&format!("  - {}\n", m.what));
    }
    let mut packages: Vec<&str> = missing.iter().filter_map(|m| m.package).collect();
    packages.sort();
    packages.dedup();
    if !packages.is_empty() {
        s.push_str(&format!(
            "install them with:\n  sudo apt-get install -y {}\n",
            packages.join(" ")
        ));
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_each_gap_and_the_packages_once() {
        let m = vec![
            Missing {
                what: "mkfs.ext4 (box disks)",
                package: Some("e2fsprogs"),
            },
            Missing {
                what: "e2fsck (box disks)",
                package: Some("e2fsprogs"),
            },
            Missing {
                what: "bubblewrap (/usr/bin/bwrap)",
                package: Some("bubblewrap"),
            },
            Missing {
                what: "loop devices",
                package: None,
            },
        ];
        let text = explain(&m);
        assert!(text.contains("  - mkfs.ext4 (box disks)\n"), "{text}");
        assert!(text.contains("  - loop devices\n"), "{text}");
        assert!(
            text.ends_with("sudo apt-get install -y bubblewrap e2fsprogs"),
            "{text}"
        );
    }

    #[test]
    fn only_static_binaries_count_as_a_static_busybox() {
        let me = std::fs::read("/proc/self/exe").unwrap();
        // The test binary is dynamically linked (it has an interpreter).
        assert!(!is_static(&me));
        assert!(!is_static(b"#!/bin/sh\n"));
        if let Ok(b) = std::fs::read("/bin/busybox") {
            assert!(is_static(&b), "Debian's busybox-static is static");
        }
    }
}
