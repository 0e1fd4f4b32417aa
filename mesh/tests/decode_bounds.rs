//! Decoders of bytes that cross a boundary (an OIP request body, JSON or binary; a
//! `meshserve/1` frame; the tensors a plugin returns) never panic and allocate at most a
//! constant times the bytes they were given, whatever those bytes claim. Property tests over
//! arbitrary and adversarial inputs, measured with a counting allocator: the peak of live
//! bytes on the decoding thread, above what it held before.

use bytes::Bytes;
use meshserve::oip::decode_request;
use meshserve::wire::frame;
use meshserve_host::plugin::bindings::{Datatype, WitTensor, tensor_from_plugin};
use meshserve_host::plugin::limits::PluginLimits;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts live heap bytes per thread, and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: the allocator also runs while a thread's locals are torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract is the system allocator's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            note(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            note(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc` and `alloc`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most heap bytes `f` held at once on this thread, beyond what the thread held before;
/// what `f` returns counts until it is dropped.
fn peak_bytes<R>(f: impl FnOnce() -> R) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    drop(f());
    usize::try_from(PEAK.with(Cell::get) - base).unwrap_or(0)
}

/// Room for what every decode allocates whatever its input (an error's message, a boxed
/// error): a constant, not a multiple.
const FIXED_BYTES: usize = 4096;

/// An OIP request may cost this many bytes per body byte: the densest honest data is four
/// times its text (`1,` to an 8-byte element), and each decoded structure (an input, a shape
/// dimension) is at most a few times the text that describes it.
const OIP_BYTES_PER_BODY_BYTE: usize = 16;

/// A frame may cost this many bytes per byte: postcard pre-allocates a vector for as many
/// elements as bytes remain, and the largest element (a tensor: name, shape, data handles) is
/// 88 bytes; nested vectors add their own.
const WIRE_BYTES_PER_FRAME_BYTE: usize = 192;

fn assert_oip_bounded(body: &[u8], json_length: Option<usize>) -> Result<(), TestCaseError> {
    let body = Bytes::copy_from_slice(body);
    let peak = peak_bytes(|| decode_request("m", None, &body, json_length));
    let bound = OIP_BYTES_PER_BODY_BYTE * body.len() + FIXED_BYTES;
    prop_assert!(
        peak <= bound,
        "decoding {} bytes held {peak} bytes at once (bound {bound})",
        body.len()
    );
    Ok(())
}

/// A JSON element of `data`, of whatever kind a client might send.
fn element() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..300).prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("18446744073709551615".to_string()),
        Just("true".to_string()),
        Just("\"ab\"".to_string()),
        Just("[1,[2]]".to_string()),
        Just("{}".to_string()),
        Just("null".to_string()),
    ]
}

/// A shape dimension, honest or lying.
fn dimension() -> impl Strategy<Value = i64> {
    prop_oneof![
        0i64..5,
        Just(262_144),
        Just(1 << 40),
        Just(-1),
        Just(i64::MAX)
    ]
}

/// Parameters, as clients send them and as an attacker might nest them.
fn parameters() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (0u64..1_000_000).prop_map(|n| format!("\"parameters\":{{\"binary_data_size\":{n}}},")),
        (1usize..400).prop_map(|n| format!(
            "\"parameters\":{{\"x\":[{}],\"y\":{{\"z\":[[],[]]}}}},",
            vec!["0"; n].join(",")
        )),
        Just("\"parameters\":{\"timeout\":\"soon\"},".to_string()),
    ]
}

prop_compose! {
    /// One input object, its fields in any order.
    fn input()(
        name in "[a-z]{0,3}",
        shape in prop::collection::vec(dimension(), 0..4),
        datatype in prop::sample::select(vec!["FP32", "FP64", "INT64", "UINT8", "BOOL", "BYTES", "FP16", "XX"]),
        data in prop::option::of(prop::collection::vec(element(), 0..40)),
        parameters in parameters(),
        rotate in 0usize..4,
    ) -> String {
        let shape: Vec<String> = shape.iter().map(i64::to_string).collect();
        let mut fields = vec![
            format!("\"name\":\"{name}\""),
            format!("\"shape\":[{}]", shape.join(",")),
            format!("\"datatype\":\"{datatype}\""),
        ];
        if let Some(data) = data {
            fields.push(format!("\"data\":[{}]", data.join(",")));
        }
        let turn = rotate % fields.len();
        fields.rotate_left(turn);
        format!("{{{parameters}{}}}", fields.join(","))
    }
}

prop_compose! {
    /// A whole request body, possibly cut short.
    fn request()(
        inputs in prop::collection::vec(input(), 0..24),
        repeat in prop_oneof![Just(1usize), Just(200)],
        parameters in parameters(),
        outputs in prop::option::of(Just("\"outputs\":[{\"name\":\"y\",\"parameters\":{\"binary_data\":true}}],")),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) -> Vec<u8> {
        let mut all = Vec::new();
        for _ in 0..repeat {
            all.extend(inputs.iter().cloned());
        }
        let body = format!("{{{parameters}{}\"inputs\":[{}]}}", outputs.unwrap_or(""), all.join(","));
        let mut body = body.into_bytes();
        if let Some(cut) = cut {
            body.truncate(cut.index(body.len() + 1));
        }
        body
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn json_requests_allocate_in_proportion_to_the_body(body in request()) {
        assert_oip_bounded(&body, None)?;
    }

    #[test]
    fn arbitrary_bytes_allocate_in_proportion_to_the_body(
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        assert_oip_bounded(&body, None)?;
    }

    #[test]
    fn binary_requests_allocate_in_proportion_to_the_body(
        sizes in prop::collection::vec(0u64..5000, 0..8),
        claimed_shape in dimension(),
        binary in prop::collection::vec(any::<u8>(), 0..4096),
        header_length in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let inputs: Vec<String> = sizes
            .iter()
            .map(|n| format!(
                "{{\"name\":\"a\",\"shape\":[{claimed_shape}],\"datatype\":\"FP32\",\"parameters\":{{\"binary_data_size\":{n}}}}}"
            ))
            .collect();
        let json = format!("{{\"inputs\":[{}]}}", inputs.join(","));
        let mut body = json.clone().into_bytes();
        body.extend_from_slice(&binary);
        let json_length = match header_length {
            Some(index) => Some(index.index(body.len() + 8)),
            None => Some(json.len()),
        };
        assert_oip_bounded(&body, json_length)?;
    }

    #[test]
    fn mangled_frames_allocate_in_proportion_to_the_frame(
        vector in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        tail in prop::collection::vec(any::<u8>(), 0..64),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let vectors = wire_vectors();
        let mut bytes = vectors[vector.index(vectors.len())].clone();
        bytes.extend_from_slice(&tail);
        for (at, value) in edits {
            let i = at.index(bytes.len());
            // The version byte and length stay plausible so the payload decoder is reached.
            if i >= frame::HEADER_LEN {
                bytes[i] = value;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1).max(frame::HEADER_LEN));
        }
        let payload = &bytes[frame::HEADER_LEN..];
        let peak = peak_bytes(|| frame::decode_payload(payload));
        let bound = WIRE_BYTES_PER_FRAME_BYTE * payload.len() + FIXED_BYTES;
        prop_assert!(peak <= bound, "decoding {} bytes held {peak} (bound {bound})", payload.len());
        let framed = peak_bytes(|| frame::decode(&bytes, 1 << 20));
        prop_assert!(framed <= WIRE_BYTES_PER_FRAME_BYTE * bytes.len() + FIXED_BYTES);
    }

    #[test]
    fn plugin_tensors_are_checked_without_copies(
        name in "[a-z]{0,300}",
        shape in prop::collection::vec(dimension(), 0..20),
        data in prop::collection::vec(any::<u8>(), 0..4096),
        datatype in prop::sample::select(vec![Datatype::Fp32, Datatype::Bytes, Datatype::Uint8, Datatype::Int64]),
    ) {
        let size = name.len() + shape.len() * 8 + data.len();
        let tensor = WitTensor { name, datatype, shape, data };
        let limits = PluginLimits::default();
        let peak = peak_bytes(|| {
            let checked = limits.check_tensors(std::slice::from_ref(&tensor), 1 << 20);
            (checked, tensor_from_plugin(tensor.clone()))
        });
        // The clone is the test's own: one copy of the input, then the checks add a constant.
        prop_assert!(peak <= 2 * size + FIXED_BYTES, "{peak} bytes for a {size}-byte tensor");
    }
}

/// The recorded frames of `wire_vectors.txt`, whole.
fn wire_vectors() -> Vec<Vec<u8>> {
    let text = include_str!("wire_vectors.txt");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(|hex| {
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

/// The request of issue 21: a thousand inputs that each claim a megabyte and hold nothing.
/// The old decoder reserved a megabyte for each before it looked at the data.
#[test]
fn a_thousand_lying_shapes_reserve_nothing_they_do_not_hold() {
    let input = r#"{"name":"a","shape":[262144],"datatype":"FP32","data":[]}"#;
    let body = format!("{{\"inputs\":[{}]}}", vec![input; 1000].join(","));
    let body = Bytes::from(body);
    let mut result = None;
    let peak = peak_bytes(|| result = Some(decode_request("m", None, &body, None)));
    let error = result.expect("ran").expect_err("a lying shape is refused");
    assert!(error.0.contains("shape needs 262144 elements"), "{error}");
    assert!(
        peak <= OIP_BYTES_PER_BODY_BYTE * body.len(),
        "{peak} bytes held for a {}-byte body",
        body.len()
    );
}
