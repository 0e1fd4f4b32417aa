//! Generates the OIP gRPC service (`inference.GRPCInferenceService`) from mesh/proto, with
//! protox (a protobuf compiler in Rust) so that building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["inference.proto"], ["proto"])?;
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
