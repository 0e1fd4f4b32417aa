//! The `meshserve/1` encoding, pinned: every message in `wire_vectors.txt` must encode to
//! exactly the bytes recorded there, and decode back. A failure here means a change would
//! break mixed-version meshes; bump `WIRE_VERSION` instead of editing the file, unless the
//! change is an appended variant. `MESHSERVE_BLESS=1` rewrites the file.
//!
//! Also: mangled frames (bit flips, truncations, extensions of every vector) decode to errors,
//! never panics, as a deterministic complement to the cargo-fuzz target in `mesh/fuzz`.

use bytes::Bytes;
use meshserve::wire::{self, *};
use std::net::SocketAddr;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn replica(node: &str, port: u16) -> Replica {
    Replica {
        node: node.into(),
        quic: addr(&format!("10.0.0.1:{port}")),
        http: addr(&format!("[::1]:{}", port + 1)),
        http3: (port == 7000).then(|| addr(&format!("[::1]:{}", port + 443))),
    }
}

fn route() -> RouteHint {
    RouteHint {
        model: "fraud".into(),
        epoch: 0x0123_4567_89ab_cdef,
        replicas: vec![replica("node-a", 7000), replica("node-b", 7002)],
    }
}

fn vectors() -> Vec<(&'static str, Message)> {
    let tensor = WireTensor {
        name: "features".into(),
        datatype: datatype_code(meshserve_host::DataType::Fp32),
        shape: vec![1, 2],
        data: Bytes::from_static(&[0, 0, 128, 63, 0, 0, 0, 64]),
    };
    let advert = NodeAdvert {
        node: "node-a".into(),
        generation: 1_764_000_000_000,
        sequence: 7,
        quic: addr("127.0.0.1:7000"),
        http: addr("127.0.0.1:8000"),
        http3: Some(addr("127.0.0.1:8443")),
        catalog: vec![CatalogEntry {
            model: "fraud".into(),
            replicas: 2,
            digest: [0xab; 32],
            bytes: 9_000,
            scaling: Some(Scaling {
                min: 1,
                max: 3,
                target_in_flight_milli: 8_000,
                down_window_s: 30,
            }),
        }],
        serving: vec!["fraud".into()],
        queue_depth: 3,
        ewma_latency_us: 250,
        endpoints: vec![EndpointEntry {
            name: "fraud-check".into(),
            model: "fraud".into(),
            digest: [0xcd; 32],
            bytes: 4_000,
            headers: vec!["x-user".into()],
        }],
        leaving: false,
        declined: vec!["huge".into()],
        in_flight: vec![ModelInFlight {
            model: "fraud".into(),
            milli: 2_500,
            wait_us: 1_250,
        }],
    };
    vec![
        (
            "infer",
            Message::Infer(InferCall {
                id: Some("r1".into()),
                model: "fraud".into(),
                version: None,
                inputs: vec![tensor.clone()],
                outputs: Some(vec!["probabilities".into()]),
                timeout_us: Some(50_000),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                forwarded: true,
            }),
        ),
        (
            "answer",
            Message::Answer(InferAnswer {
                id: None,
                model_name: "fraud".into(),
                model_version: "1".into(),
                outputs: vec![tensor],
                timings: WireTimings {
                    queue_us: 12,
                    infer_us: 40,
                    batch_size: 8,
                },
                served_by: "node-b".into(),
                route: Some(route()),
            }),
        ),
        (
            "failure",
            Message::Failure(Failure {
                class: FailureClass::NotHere,
                message: "node-c does not serve 'fraud'".into(),
                retry_after_ms: None,
                route: Some(route()),
            }),
        ),
        (
            "failure-plugin",
            Message::Failure(Failure {
                class: FailureClass::PluginStatus(422),
                message: "bad body".into(),
                retry_after_ms: Some(1000),
                route: None,
            }),
        ),
        ("route-query", Message::RouteQuery),
        (
            "routes",
            Message::Routes(RouteTable {
                epoch: 42,
                routes: vec![route()],
            }),
        ),
        ("status-query", Message::StatusQuery),
        (
            "status",
            Message::Status(MeshStatus {
                node: "node-a".into(),
                members: vec![MemberStatus {
                    node: "node-a".into(),
                    state: "alive".into(),
                    advert: Some(advert.clone()),
                }],
                routes: RouteTable {
                    epoch: 42,
                    routes: vec![],
                },
                scaling: vec![ScaleStatus {
                    model: "heavy".into(),
                    scaling: Scaling {
                        min: 1,
                        max: 3,
                        target_in_flight_milli: 4_000,
                        down_window_s: 10,
                    },
                    count: 3,
                    in_flight_milli: 47_200,
                    last_change: Some("1 -> 3: load".into()),
                }],
            }),
        ),
        (
            "fetch-model",
            Message::FetchModel(FetchModel {
                model: "fraud".into(),
                digest: [7; 32],
            }),
        ),
        (
            "model-files",
            Message::ModelFiles(ModelFiles {
                model: "fraud".into(),
                digest: [7; 32],
                files: vec![ModelFile {
                    path: "1/model.onnx".into(),
                    data: Bytes::from_static(b"\x08\x07onnx"),
                }],
            }),
        ),
        (
            "metadata-query",
            Message::MetadataQuery(MetadataQuery {
                model: "fraud".into(),
                version: Some("1".into()),
            }),
        ),
        ("metadata", Message::Metadata("{\"name\":\"fraud\"}".into())),
        ("advert-query", Message::AdvertQuery),
        ("advert", Message::Advert(advert)),
        ("load-query", Message::LoadQuery),
        (
            "loads",
            Message::Loads(NodeLoads {
                node: "node-a".into(),
                models: vec![ModelLoadReport {
                    model: "fraud".into(),
                    queue_depth: 3,
                    requests_per_second: 1234.5,
                    p99_us: Some(870),
                    predicted_wait_us: Some(1_200),
                }],
            }),
        ),
        (
            "fetch-manifest",
            Message::FetchManifest(FetchModel {
                model: "fraud".into(),
                digest: [7; 32],
            }),
        ),
        (
            "manifest",
            Message::Manifest(ModelManifest {
                model: "fraud".into(),
                digest: [7; 32],
                files: vec![
                    ManifestFile {
                        path: "1/model.onnx".into(),
                        size: 300_000_000,
                    },
                    ManifestFile {
                        path: "config.toml".into(),
                        size: 0,
                    },
                ],
            }),
        ),
        (
            "fetch-chunk",
            Message::FetchChunk(FetchChunk {
                model: "fraud".into(),
                digest: [7; 32],
                path: "1/model.onnx".into(),
                offset: 4 << 20,
                length: 4 << 20,
            }),
        ),
        ("chunk", Message::Chunk(Bytes::from_static(b"\x08\x07onnx"))),
        (
            "invoke",
            Message::Invoke(EndpointCall {
                endpoint: "fraud-check".into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: Bytes::from_static(b"{\"card\":\"c1\"}"),
                timeout_us: Some(20_000),
            }),
        ),
        (
            "invoked",
            Message::Invoked(EndpointAnswer {
                node: "node-b".into(),
                status: 200,
                headers: vec![("meshserve-plugins".into(), "pre=a@01 post=b@02".into())],
                body: Bytes::from_static(b"{\"decision\":\"allow\"}"),
            }),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/wire_vectors.txt");

#[test]
fn encodings_match_the_committed_vectors() {
    let computed: Vec<(&str, Vec<u8>)> = vectors()
        .into_iter()
        .map(|(name, message)| (name, wire::encode(&message)))
        .collect();
    if std::env::var_os("MESHSERVE_BLESS").is_some() {
        let mut text = String::from(
            "# meshserve/1 test vectors: name, then the whole frame in hex. Generated by\n# MESHSERVE_BLESS=1 cargo test --test wire_vectors; see that file before editing.\n",
        );
        for (name, bytes) in &computed {
            text.push_str(&format!("{name} {}\n", hex(bytes)));
        }
        std::fs::write(FILE, text).unwrap();
    }
    let text = std::fs::read_to_string(FILE).unwrap();
    let recorded: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_once(' ').unwrap())
        .collect();
    assert_eq!(recorded.len(), computed.len(), "one line per vector");
    for ((name, bytes), (recorded_name, recorded_hex)) in computed.iter().zip(&recorded) {
        assert_eq!(name, recorded_name);
        assert_eq!(&hex(bytes), recorded_hex, "encoding of '{name}' changed");
    }
    for ((name, message), (_, recorded_hex)) in vectors().into_iter().zip(&recorded) {
        let decoded = wire::decode(&unhex(recorded_hex), 1 << 20)
            .unwrap_or_else(|e| panic!("vector '{name}': {e}"));
        assert_eq!(decoded, message, "vector '{name}' decodes differently");
    }
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn mangled_frames_are_errors_not_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut decoded_ok = 0usize;
    let mut refused = 0usize;
    for (_, message) in vectors() {
        let frame = wire::encode(&message);
        for _ in 0..2000 {
            let mut mangled = frame.clone();
            match rng.next() % 4 {
                0 => {
                    let i = (rng.next() as usize) % mangled.len();
                    mangled[i] ^= 1 << (rng.next() % 8);
                }
                1 => mangled.truncate((rng.next() as usize) % mangled.len()),
                2 => {
                    let i = wire::frame::HEADER_LEN
                        + (rng.next() as usize) % (mangled.len() - wire::frame::HEADER_LEN);
                    mangled[i] = rng.next() as u8;
                }
                _ => mangled.extend((0..rng.next() % 16).map(|_| rng.next() as u8)),
            }
            match wire::decode(&mangled, 1 << 16) {
                Ok(_) => decoded_ok += 1,
                Err(_) => refused += 1,
            }
        }
    }
    // Most mangles must be caught; some bit flips land in data bytes and stay valid.
    assert!(
        refused > decoded_ok,
        "refused {refused}, accepted {decoded_ok}"
    );
}
