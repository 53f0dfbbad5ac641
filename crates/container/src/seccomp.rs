//! The seccomp filter of every container: everything is allowed except the
//! system calls that administer the kernel or reach beyond the container
//! (loading modules, mounting, rebooting, tracing other processes, the
//! kernel keyring, BPF, clock setting, swap, and entering or making
//! namespaces), which fail with `EPERM`. The list follows what Docker's
//! default profile blocks for a container without extra capabilities.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder,
};

/// `EPERM`: what a refused call returns, as if the capability were missing.
const EPERM: u32 = 1;

/// The refused system calls.
pub const REFUSED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// The filter: allow by default, [`REFUSED`] fail with `EPERM`, for the
/// x86 ABIs (64-bit, 32-bit and x32, so a 32-bit call is no way around).
pub fn profile() -> Result<LinuxSeccomp, oci_spec::OciSpecError> {
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(vec![
            LinuxSyscallBuilder::default()
                .names(REFUSED.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(EPERM)
                .build()?,
        ])
        .build()
}
