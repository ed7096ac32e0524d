//! Times [`ferry_model::hf::import`] on a Hugging Face folder, as `ferry import hf` runs it but without the CLI
//! (so a release build of this small crate measures it):
//! `cargo run --release -p ferry-model --example hf_import -- DIR [OUT.onnx]`.

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let dir = args.next().ok_or("usage: hf_import DIR [OUT.onnx]")?;
    let started = Instant::now();
    let imported = ferry_model::hf::import(std::path::Path::new(&dir))?;
    let built = started.elapsed();
    if let Some(out) = args.next() {
        std::fs::write(out, &imported.onnx)?;
    }
    println!(
        "{} layers, {:.1} MB of ONNX: built in {:.2} s, {:.2} s with the file written",
        imported.num_layers,
        imported.onnx.len() as f64 / 1e6,
        built.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
