//! Finding the ONNX Runtime shared library at run time.
//!
//! Ferry links nothing at build time: the library comes from the `onnxruntime` wheel on PyPI
//! (`scripts/fetch-onnxruntime` unpacks it), from beside the binary, or from an installed Python package.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::EngineError;

/// The environment variable that names the library file (the same one the `ort` crate reads).
pub const ENV_ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// The library file name Ferry is built against.
const LIBRARY_NAMES: [&str; 2] = ["libonnxruntime.so.1.32.0", "libonnxruntime.so"];

/// Finds `libonnxruntime`: the explicit path if given, else `$ORT_DYLIB_PATH`, else beside the running binary
/// (or in `lib/` next to it), else inside an installed Python `onnxruntime` package.
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
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("lib"));
        dirs.push(exe_dir);
    }
    dirs.extend(python_package_dirs());
    for dir in &dirs {
        for name in LIBRARY_NAMES {
            if let Some(found) = existing(&dir.join(name)) {
                return Ok(found);
            }
        }
    }
    Err(EngineError::Library(format!(
        "ONNX Runtime 1.32 library not found (looked in {}); run scripts/fetch-onnxruntime, \
         then pass --onnxruntime-lib .ferry/lib/libonnxruntime.so.1.32.0 or set {ENV_ORT_DYLIB_PATH}, \
         or `pip install onnxruntime==1.32.0`",
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )))
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
