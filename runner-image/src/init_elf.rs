//! The box's PID 1: a tiny static program that needs nothing from the image.
//!
//! Every box runs this as its first process (`bwrap --as-pid-1`), so a box
//! works with any image, even one without a shell or `sleep`. It is handed to
//! bubblewrap as a sealed memfd and executed through `/proc/self/fd/N`, so it
//! never appears in the box's filesystem. What it does, in order:
//!
//! 1. `write(3, "R", 1)`: tells the shim that the sandbox is fully set up
//!    (mounts done, root pivoted, seccomp loaded);
//! 2. `close_range(0, ~0, 0)`: drops every inherited descriptor, including
//!    the memfd it was started from and the readiness pipe;
//! 3. forever: `wait4(-1, NULL, __WALL, NULL)` to reap orphans re-parented to
//!    it; when it has no children (`-ECHILD`) it sleeps one second.
//!
//! As PID 1 of its namespace it ignores every signal sent from inside the
//! box (it installs no handlers), so a box's user cannot kill it; SIGKILL from
//! the host ends the box. The machine code was assembled from the listing in
//! the comments and is checked by executing it in the tests.

use anyhow::{Result, bail};

/// Load address of the single segment.
const BASE: u64 = 0x40_0000;
/// Size of the ELF header plus one program header.
const HEADERS: usize = 64 + 56;

/// x86-64 code (position independent, RIP-relative data).
#[rustfmt::skip]
const CODE_X86_64: [u8; 112] = [
    0xb8, 0x01, 0x00, 0x00, 0x00,             // mov eax, 1 (write)
    0xbf, 0x03, 0x00, 0x00, 0x00,             // mov edi, 3
    0x48, 0x8d, 0x35, 0x47, 0x00, 0x00, 0x00, // lea rsi, [rip+msg]
    0xba, 0x01, 0x00, 0x00, 0x00,             // mov edx, 1
    0x0f, 0x05,                               // syscall
    0xb8, 0xb4, 0x01, 0x00, 0x00,             // mov eax, 436 (close_range)
    0x31, 0xff,                               // xor edi, edi
    0xbe, 0xff, 0xff, 0xff, 0xff,             // mov esi, -1
    0x31, 0xd2,                               // xor edx, edx
    0x0f, 0x05,                               // syscall
    // loop:
    0xb8, 0x3d, 0x00, 0x00, 0x00,             // mov eax, 61 (wait4)
    0x48, 0xc7, 0xc7, 0xff, 0xff, 0xff, 0xff, // mov rdi, -1
    0x31, 0xf6,                               // xor esi, esi
    0xba, 0x00, 0x00, 0x00, 0x40,             // mov edx, __WALL
    0x45, 0x31, 0xd2,                         // xor r10d, r10d
    0x0f, 0x05,                               // syscall
    0x48, 0x83, 0xf8, 0xf6,                   // cmp rax, -ECHILD
    0x75, 0xe2,                               // jne loop
    0xb8, 0x23, 0x00, 0x00, 0x00,             // mov eax, 35 (nanosleep)
    0x48, 0x8d, 0x3d, 0x0e, 0x00, 0x00, 0x00, // lea rdi, [rip+ts]
    0x31, 0xf6,                               // xor esi, esi
    0x0f, 0x05,                               // syscall
    0xeb, 0xd0,                               // jmp loop
    0x52, 0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00, // msg: 'R', padding
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // ts: 1 s
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //     0 ns
];

/// AArch64 code, same program (encoded by hand; exercised only on arm64 hosts).
const CODE_AARCH64: [u32; 28] = [
    0xD280_0808, // movz x8, #64 (write)
    0xD280_0060, // movz x0, #3
    0x1000_02A1, // adr  x1, msg (+84)
    0xD280_0022, // movz x2, #1
    0xD400_0001, // svc  #0
    0xD280_3688, // movz x8, #436 (close_range)
    0xD280_0000, // movz x0, #0
    0x1280_0001, // movn w1, #0   (0xffffffff)
    0xD280_0002, // movz x2, #0
    0xD400_0001, // svc  #0
    // loop (offset 40):
    0xD280_2088, // movz x8, #260 (wait4)
    0x9280_0000, // movn x0, #0   (-1)
    0xD280_0001, // movz x1, #0
    0xD2A8_0002, // movz x2, #0x4000, lsl #16 (__WALL)
    0xD280_0003, // movz x3, #0
    0xD400_0001, // svc  #0
    0xB100_281F, // cmn  x0, #10  (-ECHILD)
    0x54FF_FF21, // b.ne loop
    0xD280_0CA8, // movz x8, #101 (nanosleep)
    0x1000_00A0, // adr  x0, ts (+20)
    0xD280_0001, // movz x1, #0
    0xD400_0001, // svc  #0
    0x17FF_FFF4, // b    loop
    0x0000_0052, // msg: 'R', padding
    0x0000_0001, // ts: tv_sec = 1 (low word)
    0x0000_0000, //     tv_sec (high word)
    0x0000_0000, //     tv_nsec
    0x0000_0000,
];

/// The init program for the architecture this binary runs on.
pub fn init_program() -> Result<Vec<u8>> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(elf(62, 0x1000, &CODE_X86_64)),
        "aarch64" => {
            let code: Vec<u8> = CODE_AARCH64.iter().flat_map(|w| w.to_le_bytes()).collect();
            Ok(elf(183, 0x1_0000, &code))
        }
        other => bail!("no box init program for architecture {other}"),
    }
}

/// A minimal static ELF64 executable: one read+execute `PT_LOAD` segment
/// holding the headers and `code`, entry at the start of `code`.
fn elf(machine: u16, align: u64, code: &[u8]) -> Vec<u8> {
    let total = (HEADERS + code.len()) as u64;
    let mut v = Vec::with_capacity(total as usize);
    // e_ident: magic, 64-bit, little endian, version 1, System V ABI.
    v.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    v.extend_from_slice(&machine.to_le_bytes()); // e_machine
    v.extend_from_slice(&1u32.to_le_bytes()); // e_version
    v.extend_from_slice(&(BASE + HEADERS as u64).to_le_bytes()); // e_entry
    v.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    v.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    v.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    v.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    v.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    v.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    v.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    // Program header: PT_LOAD, R+X, whole file at BASE.
    v.extend_from_slice(&1u32.to_le_bytes()); // p_type
    v.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R | X
    v.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    v.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    v.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    v.extend_from_slice(&total.to_le_bytes()); // p_filesz
    v.extend_from_slice(&total.to_le_bytes()); // p_memsz
    v.extend_from_slice(&align.to_le_bytes()); // p_align
    debug_assert_eq!(v.len(), HEADERS);
    v.extend_from_slice(code);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    #[test]
    fn headers_are_well_formed() {
        let x = elf(62, 0x1000, &CODE_X86_64);
        assert_eq!(&x[..4], b"\x7fELF");
        assert_eq!(x.len(), HEADERS + 112);
        // Data used with RIP-relative addressing must stay 8-byte aligned.
        assert_eq!((HEADERS + 0x60) % 8, 0);
        let a: Vec<u8> = CODE_AARCH64.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(a.len(), 112);
        // adr targets: msg at 92, ts at 96.
        assert_eq!(a[92], b'R');
        assert_eq!(u32::from_le_bytes(a[96..100].try_into().unwrap()), 1);
    }

    /// Run the program for real: it must signal readiness on fd 3, then keep
    /// running (it never exits on its own).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn runs_signals_readiness_and_stays_up() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("init");
        std::fs::write(&p, init_program().unwrap()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (r, w) = crate::sys::pipe().unwrap();
        let wfd = std::os::fd::AsRawFd::as_raw_fd(&w);
        let mut cmd = std::process::Command::new(&p);
        // SAFETY: dup2 is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(wfd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        drop(w);
        let mut f = std::fs::File::from(r);
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"R");
        // After close_range the pipe's last writer is gone: EOF.
        assert_eq!(f.read(&mut b).unwrap(), 0);
        std::thread::sleep(std::time::Duration::from_millis(1200));
        assert!(child.try_wait().unwrap().is_none(), "init exited");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
