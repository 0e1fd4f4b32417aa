//! Generates the node's gRPC services from mesh/proto (the OIP service
//! `inference.GRPCInferenceService` and gRPC health checking), with protox (a protobuf
//! compiler in Rust) so that building needs no `protoc`. The compiled descriptors are kept
//! for server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["inference.proto", "grpc/health/v1/health.proto"],
        ["proto"],
    )?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptors.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(false)
        // `bytes` fields as `Bytes`: tensor contents are slices of the received message, not
        // copies of it.
        .bytes(".inference")
        // An RPC the node does not implement answers UNIMPLEMENTED.
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
