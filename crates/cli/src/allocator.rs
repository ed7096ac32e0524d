//! Allocator settings for `ferry serve`, so memory goes back to the system after a large request.
//!
//! Both allocators in the process read their settings from the environment once, when the process starts, before
//! `main`: mimalloc (Rust's global allocator here) and glibc's malloc (which ONNX Runtime, a C++ library, uses).
//! With their defaults, a request of B bytes left 4-5 x B resident 10 seconds after its answer
//! (`tests/python/test_memory.py`): mimalloc purges the memory of freed segments only after a delay, and only when
//! the thread that freed it calls the allocator again, which an idle server never does; glibc raises its mmap
//! threshold after large frees, so later large tensors come from a heap it does not trim. `serve` therefore starts
//! itself again, once, with:
//!
//! - `MIMALLOC_ARENA_PURGE_MULT=0`: segments freed whole (large tensors) go back to the system at once; pages inside
//!   segments keep mimalloc's default delay, so small requests churn no more system calls than before
//!   (`MIMALLOC_PURGE_DELAY=0` returned the same memory but cost 15-20% of a small model's throughput);
//! - `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072`: blocks of 128 KiB or
//!   more are mapped on their own (and unmapped when freed), and the heap is trimmed past 128 KiB free.
//!
//! Measured side by side (iris REST, 64 connections, wrk, five alternating rounds on the release build): these
//! settings and the defaults were within noise of each other. A variable the user set is kept as set. The restart
//! uses `exec`, so the process id, arguments and open files stay the same; if it fails, the server runs with the
//! defaults and says so.

use std::ffi::OsString;

/// Set in the restarted process, so it does not restart again.
const MARK: &str = "FERRY_ALLOCATOR_SETTINGS";

/// The settings, each applied only when the variable is not set already.
const SETTINGS: [(&str, &str); 2] = [
    ("MIMALLOC_ARENA_PURGE_MULT", "0"),
    (
        "GLIBC_TUNABLES",
        "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072",
    ),
];

/// The variables to add, or `None` when this process already runs with them (or the user set them all).
fn missing(get: impl Fn(&str) -> Option<OsString>) -> Option<Vec<(&'static str, &'static str)>> {
    if get(MARK).is_some() {
        return None;
    }
    let add: Vec<_> = SETTINGS
        .into_iter()
        .filter(|(k, _)| get(k).is_none())
        .collect();
    (!add.is_empty()).then_some(add)
}

/// Restarts this process with the allocator settings unless it has them; returns only when it does not restart
/// (settings present, or `exec` failed: the reason is returned to be logged).
pub fn restart_with_settings() -> Option<String> {
    let add = missing(|k| std::env::var_os(k))?;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Some(format!("cannot find the executable to restart: {e}")),
    };
    // Started through another program (the dynamic loader, `ld.so /path/ferry serve`), the executable is that
    // program, which would not know what to do with the arguments: do not restart then.
    let program = std::env::args_os()
        .next()
        .and_then(|a| std::fs::canonicalize(a).ok());
    if program.is_some_and(|p| std::fs::canonicalize(&exe).ok() != Some(p)) {
        return Some(format!(
            "started through {}, not the ferry binary itself",
            exe.display()
        ));
    }
    let mut command = std::process::Command::new(exe);
    command.args(std::env::args_os().skip(1)).env(MARK, "1");
    for (k, v) in add {
        command.env(k, v);
    }
    let error = std::os::unix::process::CommandExt::exec(&mut command);
    Some(format!(
        "cannot restart with the allocator settings: {error}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_added_once_and_never_override_the_users() {
        let none = |_: &str| None;
        assert_eq!(missing(none).unwrap().len(), 2);
        let marked = |k: &str| (k == MARK).then(|| OsString::from("1"));
        assert_eq!(missing(marked), None);
        let user =
            |k: &str| (k == "GLIBC_TUNABLES").then(|| OsString::from("glibc.malloc.arena_max=2"));
        assert_eq!(
            missing(user),
            Some(vec![("MIMALLOC_ARENA_PURGE_MULT", "0")])
        );
    }
}
