//! Compiles `proto/` with the pure-Rust `protox` compiler (no system `protoc`), generates the
//! tonic/prost code into `OUT_DIR`, and writes the descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "audience/v1/expression.proto",
    "audience/v1/query.proto",
    "audience/v1/segment.proto",
    "audience/v1/ingest.proto",
    "audience/v1/schema.proto",
    "audience/v1/watch.proto",
    "audience/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(
        out_dir.join("audience_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
