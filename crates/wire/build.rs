//! Compiles the KServe v2 and TF Serving `.proto` files in `proto/` with protox (a protobuf compiler in Rust), so
//! the build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: a build script shared through one target
    // directory by two checkouts must find this checkout's files.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "kserve/grpc_service.proto",
        "tensorflow_serving/apis/services.proto",
    ];
    let descriptors = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
