//! The container's default seccomp filter, like docker's: the system calls containers use are
//! allowed, the ones that reach past the container into the host kernel's shared state are refused.
//!
//! Written from the x86_64 system call table (`asm/unistd_64.h` of Linux 6.1): every call is in
//! [`ALLOWED`] or [`DENIED`]. A call in neither (one newer than this list) fails with `ENOSYS`,
//! which C libraries treat as "not on this kernel" and work around, as they do for `clone3`; a
//! denied one fails with `EPERM`. `lazysnap run --security-opt seccomp=unconfined` turns the filter
//! off, as with docker.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};
use oci_spec::OciSpecError;

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// Refused with `EPERM`: what a container must not reach, by the reason it must not.
pub const DENIED: &[&str] = &[
    // Loading code into, or replacing, the host's kernel; rebooting it.
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "uselib",
    // Kernel programs and tracing of the whole host.
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    // Key rings are not namespaced: another container's keys.
    "keyctl",
    "add_key",
    "request_key",
    // File handles open any file of a mounted file system, outside the container's root.
    "open_by_handle_at",
    "name_to_handle_at",
    // Mounts and namespace changes: the ways out of the container's mount namespace. `clone`
    // is allowed below without namespace flags.
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "setns",
    "unshare",
    // Host-wide state: swap, accounting, quotas, the clock, the kernel log, I/O ports, the LDT.
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "nfsservctl",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "syslog",
    "iopl",
    "ioperm",
    "modify_ldt",
    "vhangup",
    "fanotify_init",
    // Obsolete interfaces with a history of kernel bugs.
    "_sysctl",
    "ustat",
    "sysfs",
    "userfaultfd",
    // A large kernel attack surface that docker refuses too.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // Memory placement across the host's NUMA nodes.
    "mbind",
    "migrate_pages",
    "move_pages",
    "set_mempolicy",
    "set_mempolicy_home_node",
    // Reserved numbers with no implementation.
    "afs_syscall",
    "tuxcall",
    "security",
    "getpmsg",
    "putpmsg",
    "vserver",
];

/// Allowed without conditions.
pub const ALLOWED: &[&str] = &[
    "read",
    "write",
    "open",
    "close",
    "stat",
    "fstat",
    "lstat",
    "poll",
    "lseek",
    "mmap",
    "mprotect",
    "munmap",
    "brk",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "ioctl",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "access",
    "pipe",
    "select",
    "sched_yield",
    "mremap",
    "msync",
    "mincore",
    "madvise",
    "shmget",
    "shmat",
    "shmctl",
    "dup",
    "dup2",
    "pause",
    "nanosleep",
    "getitimer",
    "alarm",
    "setitimer",
    "getpid",
    "sendfile",
    "socket",
    "connect",
    "accept",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "shutdown",
    "bind",
    "listen",
    "getsockname",
    "getpeername",
    "socketpair",
    "setsockopt",
    "getsockopt",
    "fork",
    "vfork",
    "execve",
    "exit",
    "wait4",
    "kill",
    "uname",
    "semget",
    "semop",
    "semctl",
    "shmdt",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "fcntl",
    "flock",
    "fsync",
    "fdatasync",
    "truncate",
    "ftruncate",
    "getdents",
    "getcwd",
    "chdir",
    "fchdir",
    "rename",
    "mkdir",
    "rmdir",
    "creat",
    "link",
    "unlink",
    "symlink",
    "readlink",
    "chmod",
    "fchmod",
    "chown",
    "fchown",
    "lchown",
    "umask",
    "gettimeofday",
    "getrlimit",
    "getrusage",
    "sysinfo",
    "times",
    "ptrace",
    "getuid",
    "getgid",
    "setuid",
    "setgid",
    "geteuid",
    "getegid",
    "setpgid",
    "getppid",
    "getpgrp",
    "setsid",
    "setreuid",
    "setregid",
    "getgroups",
    "setgroups",
    "setresuid",
    "getresuid",
    "setresgid",
    "getresgid",
    "getpgid",
    "setfsuid",
    "setfsgid",
    "getsid",
    "capget",
    "capset",
    "rt_sigpending",
    "rt_sigtimedwait",
    "rt_sigqueueinfo",
    "rt_sigsuspend",
    "sigaltstack",
    "utime",
    "mknod",
    "statfs",
    "fstatfs",
    "getpriority",
    "setpriority",
    "sched_setparam",
    "sched_getparam",
    "sched_setscheduler",
    "sched_getscheduler",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_rr_get_interval",
    "mlock",
    "munlock",
    "mlockall",
    "munlockall",
    "prctl",
    "arch_prctl",
    "adjtimex",
    "setrlimit",
    "chroot",
    "sync",
    "sethostname",
    "setdomainname",
    "gettid",
    "readahead",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "tkill",
    "time",
    "futex",
    "sched_setaffinity",
    "sched_getaffinity",
    "set_thread_area",
    "io_setup",
    "io_destroy",
    "io_getevents",
    "io_submit",
    "io_cancel",
    "get_thread_area",
    "epoll_create",
    "epoll_ctl_old",
    "epoll_wait_old",
    "remap_file_pages",
    "getdents64",
    "set_tid_address",
    "restart_syscall",
    "semtimedop",
    "fadvise64",
    "timer_create",
    "timer_settime",
    "timer_gettime",
    "timer_getoverrun",
    "timer_delete",
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "exit_group",
    "epoll_wait",
    "epoll_ctl",
    "tgkill",
    "utimes",
    "get_mempolicy",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    "waitid",
    "ioprio_set",
    "ioprio_get",
    "inotify_init",
    "inotify_add_watch",
    "inotify_rm_watch",
    "openat",
    "mkdirat",
    "mknodat",
    "fchownat",
    "futimesat",
    "newfstatat",
    "unlinkat",
    "renameat",
    "linkat",
    "symlinkat",
    "readlinkat",
    "fchmodat",
    "faccessat",
    "pselect6",
    "ppoll",
    "set_robust_list",
    "get_robust_list",
    "splice",
    "tee",
    "sync_file_range",
    "vmsplice",
    "utimensat",
    "epoll_pwait",
    "signalfd",
    "timerfd_create",
    "eventfd",
    "fallocate",
    "timerfd_settime",
    "timerfd_gettime",
    "accept4",
    "signalfd4",
    "eventfd2",
    "epoll_create1",
    "dup3",
    "pipe2",
    "inotify_init1",
    "preadv",
    "pwritev",
    "rt_tgsigqueueinfo",
    "recvmmsg",
    "fanotify_mark",
    "prlimit64",
    "syncfs",
    "sendmmsg",
    "getcpu",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "sched_setattr",
    "sched_getattr",
    "renameat2",
    "seccomp",
    "getrandom",
    "memfd_create",
    "execveat",
    "membarrier",
    "mlock2",
    "copy_file_range",
    "preadv2",
    "pwritev2",
    "pkey_mprotect",
    "pkey_alloc",
    "pkey_free",
    "statx",
    "io_pgetevents",
    "rseq",
    "pidfd_send_signal",
    "pidfd_open",
    "close_range",
    "openat2",
    "pidfd_getfd",
    "faccessat2",
    "process_madvise",
    "epoll_pwait2",
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
    "memfd_secret",
    "process_mrelease",
    "futex_waitv",
];

/// `clone` flags that make new namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
/// NEWPID, NEWNET, NEWTIME): `clone` is allowed only without them.
const CLONE_NAMESPACE_FLAGS: u64 = 0x0002_0000
    | 0x0200_0000
    | 0x0400_0000
    | 0x0800_0000
    | 0x1000_0000
    | 0x2000_0000
    | 0x4000_0000
    | 0x0000_0080;

/// `personality` personas allowed (as docker does): Linux, 32-bit Linux, UNAME26 with either, and
/// the query `0xffffffff`. Others (e.g. READ_IMPLIES_EXEC) weaken the container's own defences.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The default filter for the runtime spec.
pub fn default_profile() -> Result<LinuxSeccomp, OciSpecError> {
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut syscalls: Vec<LinuxSyscall> = vec![
        LinuxSyscallBuilder::default()
            .names(names(ALLOWED))
            .action(LinuxSeccompAction::ScmpActAllow)
            .build()?,
        LinuxSyscallBuilder::default()
            .names(names(DENIED))
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(EPERM)
            .build()?,
        // Its flags are in a structure the filter cannot read: the C library falls back to
        // `clone`, whose flags it can.
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_string()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(ENOSYS)
            .build()?,
        LinuxSyscallBuilder::default()
            .names(vec!["clone".to_string()])
            .action(LinuxSeccompAction::ScmpActAllow)
            .args(vec![LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(CLONE_NAMESPACE_FLAGS)
                .value_two(0u64)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()?])
            .build()?,
    ];
    for &persona in PERSONALITIES {
        syscalls.push(
            LinuxSyscallBuilder::default()
                .names(vec!["personality".to_string()])
                .action(LinuxSeccompAction::ScmpActAllow)
                .args(vec![LinuxSeccompArgBuilder::default()
                    .index(0usize)
                    .value(persona)
                    .op(LinuxSeccompOperator::ScmpCmpEq)
                    .build()?])
                .build()?,
        );
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(ENOSYS)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(syscalls)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_call_is_either_allowed_or_denied_never_both() {
        let allowed: HashSet<&str> = ALLOWED.iter().copied().collect();
        let denied: HashSet<&str> = DENIED.iter().copied().collect();
        assert_eq!(allowed.len(), ALLOWED.len(), "a name twice in ALLOWED");
        assert_eq!(denied.len(), DENIED.len(), "a name twice in DENIED");
        assert!(allowed.is_disjoint(&denied));
        for conditional in ["clone", "clone3", "personality"] {
            assert!(!allowed.contains(conditional) && !denied.contains(conditional));
        }
        // The calls the issue names, and the ones every program needs.
        for name in [
            "kexec_load",
            "init_module",
            "open_by_handle_at",
            "bpf",
            "keyctl",
            "setns",
        ] {
            assert!(denied.contains(name), "{name}");
        }
        for name in [
            "read",
            "execve",
            "openat",
            "mmap",
            "futex",
            "exit_group",
            "wait4",
        ] {
            assert!(allowed.contains(name), "{name}");
        }
    }

    #[test]
    fn the_spec_refuses_unknown_calls_with_enosys_and_denied_ones_with_eperm() {
        let json = serde_json::to_value(default_profile().unwrap()).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["defaultErrnoRet"], ENOSYS);
        let denied = json["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["names"].as_array().unwrap().iter().any(|n| n == "bpf"))
            .unwrap();
        assert_eq!(denied["action"], "SCMP_ACT_ERRNO");
        assert_eq!(denied["errnoRet"], EPERM);
    }
}
