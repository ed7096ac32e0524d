//! Finding the ONNX Runtime shared library at run time.
//!
//! Ferry links nothing at build time: the library comes from the `onnxruntime` wheel on PyPI
//! (`scripts/fetch-onnxruntime` unpacks it into `.ferry/lib`), from beside the binary, or from an installed Python
//! package.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::EngineError;

/// The environment variable that names the library file (the same one the `ort` crate reads).
pub const ENV_ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// The library file name Ferry is built against.
const LIBRARY_NAMES: [&str; 2] = ["libonnxruntime.so.1.32.0", "libonnxruntime.so"];

/// Where `scripts/fetch-onnxruntime` puts the library, relative to the repository root.
const FETCHED_DIR: &str = ".ferry/lib";

/// Finds `libonnxruntime`: the explicit path if given, else `$ORT_DYLIB_PATH`, else the first of
/// `search_dirs` that holds it.
pub fn find_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf, EngineError> {
    if let Some(path) = explicit {
        return existing(path).ok_or_else(|| {
            EngineError::Library(format!(
                "ONNX Runtime library {} does not exist",
                path.display()
            ))
        });
    }
    if let Some(path) = std::env::var_os(ENV_ORT_DYLIB_PATH).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return existing(&path).ok_or_else(|| {
            EngineError::Library(format!(
                "{ENV_ORT_DYLIB_PATH} names {}, which does not exist",
                path.display()
            ))
        });
    }
    let dirs = search_dirs(
        std::env::current_dir().ok().as_deref(),
        std::env::current_exe().ok().as_deref(),
    );
    for dir in &dirs {
        for name in LIBRARY_NAMES {
            if let Some(found) = existing(&dir.join(name)) {
                return Ok(found);
            }
        }
    }
    Err(EngineError::Library(format!(
        "ONNX Runtime 1.32 library ({}) not found: {ENV_ORT_DYLIB_PATH} is not set, and it is in none of {}. \
         In a Ferry checkout, run scripts/fetch-onnxruntime: it puts the library in .ferry/lib, where commands run \
         inside the checkout (or built in its target/ folder) find it. Or name the file with --onnxruntime-lib or \
         {ENV_ORT_DYLIB_PATH}, or `pip install onnxruntime==1.32.0`",
        LIBRARY_NAMES[0],
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Where Ferry looks for the library when neither a flag nor `$ORT_DYLIB_PATH` names it, in order: `.ferry/lib`
/// (where `scripts/fetch-onnxruntime` puts it) in the current directory and each of its ancestors; `lib/` beside
/// the binary and the binary's own folder; `.ferry/lib` in each ancestor of the binary's folder (the checkout of a
/// `target/release/ferry`); then the `onnxruntime/capi` folders of Python installations.
fn search_dirs(cwd: Option<&Path>, exe: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(cwd) = cwd {
        dirs.extend(cwd.ancestors().map(|d| d.join(FETCHED_DIR)));
    }
    if let Some(exe_dir) = exe.and_then(Path::parent) {
        dirs.push(exe_dir.join("lib"));
        dirs.push(exe_dir.to_path_buf());
        dirs.extend(exe_dir.ancestors().map(|d| d.join(FETCHED_DIR)));
    }
    dirs.extend(python_package_dirs());
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

fn existing(path: &Path) -> Option<PathBuf> {
    path.is_file().then(|| path.to_path_buf())
}

/// The `onnxruntime/capi` folders of Python installations: the active virtual environment first, then
/// whatever `python3` imports.
fn python_package_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        if let Ok(entries) = std::fs::read_dir(Path::new(&venv).join("lib")) {
            for entry in entries.flatten() {
                dirs.push(entry.path().join("site-packages/onnxruntime/capi"));
            }
        }
    }
    let probe = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(out) = probe {
        if out.status.success() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !dir.is_empty() {
                dirs.push(Path::new(&dir).join("capi"));
            }
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetched_library_is_looked_for_above_the_working_directory_then_the_binary() {
        let dirs = search_dirs(
            Some(Path::new("/home/u/ferry/examples")),
            Some(Path::new("/opt/checkout/target/release/ferry")),
        );
        let position = |d: &str| dirs.iter().position(|p| p == Path::new(d));
        let order = [
            "/home/u/ferry/examples/.ferry/lib",
            "/home/u/ferry/.ferry/lib",
            "/.ferry/lib",
            "/opt/checkout/target/release/lib",
            "/opt/checkout/target/release",
            "/opt/checkout/.ferry/lib",
        ]
        .map(|d| position(d).unwrap_or_else(|| panic!("{d} not in {dirs:?}")));
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{dirs:?}");
        assert_eq!(
            dirs.iter()
                .filter(|d| *d == Path::new("/.ferry/lib"))
                .count(),
            1,
            "each folder once: {dirs:?}"
        );
    }
}
