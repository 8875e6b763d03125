//! The seccomp policy of every process in a box.
//!
//! A deny list on top of the namespaces and dropped capabilities: the calls
//! that have turned sandboxes inside out in the past fail with `EPERM`.
//! Compiled with `seccompiler` to classic BPF; bubblewrap loads the programs
//! for the box's first process (`--add-seccomp-fd`), and the shim installs the
//! same programs in every process it starts inside a running box.
//!
//! Notable rules:
//! - `ioctl(TIOCSTI)` and `ioctl(TIOCLINUX)` are refused with a 32-bit
//!   compare of the request number. The kernel only looks at the low 32 bits
//!   of the request, so a filter comparing all 64 bits can be bypassed by
//!   setting high bits (CVE-2019-10063); this one cannot.
//! - keyring calls (`keyctl`, `add_key`, `request_key`), `ptrace` and the
//!   cross-process memory and descriptor calls, every mount API call, and
//!   namespace creation or entry (`unshare`, `setns`, `clone` with any
//!   `CLONE_NEW*` flag).
//! - `clone3` answers `ENOSYS` (its flags are behind a pointer a filter cannot
//!   read), so the C library falls back to `clone`, which is filtered.
//! - on x86-64, every x32-ABI call (bit 30 of the number) is refused, so the
//!   deny list cannot be side-stepped through the other system call table.
//! - `socket` and `socketpair` only for the families in [`SOCKET_FAMILIES`]
//!   (`EAFNOSUPPORT` otherwise, what a kernel without the family answers):
//!   no `AF_VSOCK` (the host's and hypervisor's vsock port space), no raw
//!   packet sockets, no Bluetooth, CAN, XDP, ALG or any other family a box
//!   has no use for and the kernel has had bugs in.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// `ioctl` requests refused in a box.
pub const DENIED_IOCTLS: [(u64, &str); 2] = [(0x5412, "TIOCSTI"), (0x541C, "TIOCLINUX")];

/// Socket families a box may create: unix, IPv4, IPv6, netlink (its own
/// network namespace's routing and addresses, which tools like `ip` read).
pub const SOCKET_FAMILIES: [(u64, &str); 4] = [
    (libc::AF_UNIX as u64, "AF_UNIX"),
    (libc::AF_INET as u64, "AF_INET"),
    (libc::AF_INET6 as u64, "AF_INET6"),
    (libc::AF_NETLINK as u64, "AF_NETLINK"),
];

/// Namespace flags refused for `clone`.
const CLONE_NS_FLAGS: [u64; 8] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    0x80, // CLONE_NEWTIME
];

/// System calls refused outright (with `EPERM`).
fn denied_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_syslog,
        libc::SYS_acct,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_quotactl,
        libc::SYS_vhangup,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib]);
    v
}

fn arch() -> Result<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| anyhow!("seccomp: {e}"))
}

fn cond(arg: u8, mask: u64, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .map_err(|e| anyhow!("seccomp condition: {e}"))
}

/// The deny-list program (`EPERM`).
fn deny_program() -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in denied_syscalls() {
        rules.insert(nr, vec![]);
    }
    let ioctl = DENIED_IOCTLS
        .iter()
        .map(|(req, _)| {
            SeccompRule::new(vec![cond(1, 0xFFFF_FFFF, *req)?])
                .map_err(|e| anyhow!("seccomp rule: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    rules.insert(libc::SYS_ioctl, ioctl);
    let clone = CLONE_NS_FLAGS
        .iter()
        .map(|f| SeccompRule::new(vec![cond(0, *f, *f)?]).map_err(|e| anyhow!("seccomp rule: {e}")))
        .collect::<Result<Vec<_>>>()?;
    rules.insert(libc::SYS_clone, clone);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(|e| anyhow!("seccomp filter: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| anyhow!("compiling seccomp filter: {e}"))
}

/// `socket`/`socketpair` of a family outside [`SOCKET_FAMILIES`] → `EAFNOSUPPORT`.
fn socket_program() -> Result<BpfProgram> {
    let outside = || -> Result<SeccompRule> {
        let conditions = SOCKET_FAMILIES
            .iter()
            .map(|(family, _)| {
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *family)
                    .map_err(|e| anyhow!("seccomp condition: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        SeccompRule::new(conditions).map_err(|e| anyhow!("seccomp rule: {e}"))
    };
    let rules = BTreeMap::from([
        (libc::SYS_socket, vec![outside()?]),
        (libc::SYS_socketpair, vec![outside()?]),
    ]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EAFNOSUPPORT as u32),
        arch()?,
    )
    .map_err(|e| anyhow!("seccomp filter: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| anyhow!("compiling seccomp filter: {e}"))
}

/// `clone3` → `ENOSYS`, so callers fall back to the filtered `clone`.
fn clone3_program() -> Result<BpfProgram> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(|e| anyhow!("seccomp filter: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| anyhow!("compiling seccomp filter: {e}"))
}

/// x86-64 only: refuse every x32-ABI system call (number with bit 30 set).
#[cfg(target_arch = "x86_64")]
fn x32_program() -> BpfProgram {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    let st = |code: u16, k: u32| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jmp = |code: u16, k: u32, jt: u8, jf: u8| sock_filter { code, jt, jf, k };
    let (ld_w_abs, jeq_k, jset_k, ret_k) = (0x20u16, 0x15u16, 0x45u16, 0x06u16);
    vec![
        st(ld_w_abs, 4), // arch
        jmp(jeq_k, AUDIT_ARCH_X86_64, 0, 3),
        st(ld_w_abs, 0), // nr
        jmp(jset_k, 0x4000_0000, 0, 1),
        st(ret_k, 0x0005_0000 | libc::EPERM as u32), // SECCOMP_RET_ERRNO | EPERM
        st(ret_k, 0x7fff_0000),                      // SECCOMP_RET_ALLOW
    ]
}

/// The compiled policy: one or more BPF programs, all of which apply.
#[derive(Clone, Debug)]
pub struct Policy {
    programs: Vec<BpfProgram>,
}

impl Policy {
    /// Compile the box policy for this architecture.
    pub fn compile() -> Result<Policy> {
        let mut programs = vec![deny_program()?, clone3_program()?, socket_program()?];
        #[cfg(target_arch = "x86_64")]
        programs.push(x32_program());
        Ok(Policy { programs })
    }

    /// Each program as the raw `struct sock_filter` array bubblewrap reads from a descriptor.
    pub fn program_bytes(&self) -> Vec<Vec<u8>> {
        self.programs
            .iter()
            .map(|p| {
                let mut out = Vec::with_capacity(p.len() * 8);
                for ins in p {
                    out.extend_from_slice(&ins.code.to_ne_bytes());
                    out.push(ins.jt);
                    out.push(ins.jf);
                    out.extend_from_slice(&ins.k.to_ne_bytes());
                }
                out
            })
            .collect()
    }

    /// The programs, for installing in this process (see [`Policy::install`]).
    pub fn programs(&self) -> &[BpfProgram] {
        &self.programs
    }

    /// Install every program in the calling thread. Requires `no_new_privs`
    /// (or `CAP_SYS_ADMIN`). Async-signal-safe: no allocation, only `prctl`.
    pub fn install(programs: &[BpfProgram]) -> std::io::Result<()> {
        for p in programs {
            let prog = libc::sock_fprog {
                len: p.len() as u16,
                filter: p.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: `prog` points at a live, correctly laid-out program
            // (seccompiler's sock_filter is repr(C) like the kernel's).
            let r = unsafe {
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                    0,
                    0,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Compile once and check the result is usable (for start-up diagnostics).
pub fn self_check() -> Result<()> {
    let p = Policy::compile().context("compiling the box seccomp policy")?;
    if p.programs.iter().any(|x| x.is_empty()) {
        return Err(anyhow!("empty seccomp program"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` in a forked child with the policy installed; return its exit code.
    fn in_filtered_child(f: impl FnOnce() -> i32) -> i32 {
        let policy = Policy::compile().unwrap();
        // SAFETY: the child only makes raw system calls, then _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if Policy::install(policy.programs()).is_err() {
                    libc::_exit(100);
                }
                libc::_exit(f());
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(libc::WIFEXITED(status), "child died: {status:#x}");
            libc::WEXITSTATUS(status)
        }
    }

    fn errno_of(r: libc::c_long) -> i32 {
        if r == -1 { crate::sys::errno() } else { 0 }
    }

    #[test]
    fn tiocsti_is_refused_even_with_high_bits_set() {
        // A pty to aim at, so without the filter the call would succeed.
        let code = in_filtered_child(|| unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            if m < 0 {
                return 10;
            }
            let c: u8 = b'x';
            let plain = libc::syscall(libc::SYS_ioctl, m, 0x5412u64, &c as *const u8);
            if errno_of(plain) != libc::EPERM {
                return 11;
            }
            // CVE-2019-10063: the kernel ignores the high bits of the request.
            let high = libc::syscall(
                libc::SYS_ioctl,
                m,
                0xdead_beef_0000_5412u64,
                &c as *const u8,
            );
            if errno_of(high) != libc::EPERM {
                return 12;
            }
            let linux = libc::syscall(libc::SYS_ioctl, m, 0x1_0000_541Cu64, &c as *const u8);
            if errno_of(linux) != libc::EPERM {
                return 13;
            }
            // Other ioctls still work.
            let mut ws: libc::winsize = std::mem::zeroed();
            if libc::ioctl(m, libc::TIOCGWINSZ, &mut ws) != 0 {
                return 14;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn namespaces_keyrings_mounts_and_ptrace_are_refused() {
        let code = in_filtered_child(|| unsafe {
            if errno_of(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)) != libc::EPERM {
                return 20;
            }
            if errno_of(libc::syscall(
                libc::SYS_keyctl,
                0, /* KEYCTL_GET_KEYRING_ID */
                -3,
                0,
            )) != libc::EPERM
            {
                return 21;
            }
            if errno_of(libc::syscall(
                libc::SYS_ptrace,
                libc::PTRACE_TRACEME,
                0,
                0,
                0,
            )) != libc::EPERM
            {
                return 22;
            }
            let none = c"none".as_ptr();
            if errno_of(libc::syscall(
                libc::SYS_mount,
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REMOUNT,
                0,
            )) != libc::EPERM
            {
                return 23;
            }
            if errno_of(libc::syscall(libc::SYS_clone3, 0, 0)) != libc::ENOSYS {
                return 24;
            }
            // clone with a namespace flag: refused before anything is created.
            if errno_of(libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWNET | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            )) != libc::EPERM
            {
                return 25;
            }
            // A plain fork still works.
            let pid = libc::fork();
            if pid == 0 {
                libc::_exit(0);
            }
            if pid < 0 {
                return 26;
            }
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            #[cfg(target_arch = "x86_64")]
            {
                // x32 getpid (nr 39 | bit 30) is refused.
                if errno_of(libc::syscall(0x4000_0000 + 39)) != libc::EPERM {
                    return 27;
                }
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn only_allowed_socket_families_can_be_created() {
        let code = in_filtered_child(|| unsafe {
            for (family, _) in SOCKET_FAMILIES {
                let fd = libc::socket(family as i32, libc::SOCK_DGRAM, 0);
                if fd < 0 && crate::sys::errno() == libc::EAFNOSUPPORT {
                    return 30;
                }
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            for family in [
                libc::AF_VSOCK,
                libc::AF_PACKET,
                libc::AF_ALG,
                libc::AF_XDP,
                45,
            ] {
                for ty in [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_RAW] {
                    if libc::socket(family, ty, 0) >= 0 || crate::sys::errno() != libc::EAFNOSUPPORT
                    {
                        return 31;
                    }
                }
            }
            // High bits above the 32 the kernel reads do not smuggle a family past the filter.
            let vsock_high = libc::syscall(
                libc::SYS_socket,
                0x1_0000_0000u64 | libc::AF_VSOCK as u64,
                libc::SOCK_STREAM,
                0,
            );
            if vsock_high >= 0 || crate::sys::errno() != libc::EAFNOSUPPORT {
                return 32;
            }
            let mut pair = [0; 2];
            if libc::socketpair(libc::AF_VSOCK, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) >= 0 {
                return 33;
            }
            if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) != 0 {
                return 34;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn serialises_to_kernel_layout() {
        let p = Policy::compile().unwrap();
        for (bytes, prog) in p.program_bytes().iter().zip(p.programs()) {
            assert_eq!(bytes.len(), prog.len() * 8);
        }
    }
}
