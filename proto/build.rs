//! Generates the tonic/prost code for `skygate.agent.v1` and `skygate.controlplane.v1` with protox, a protobuf compiler in
//! Rust, so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/skygate/agent/v1/agent.proto",
        "proto/skygate/controlplane/v1/registry.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
