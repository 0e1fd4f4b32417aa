#!/usr/bin/env python3
"""Generates meshserve's bundled test models and their reference outputs.

Deterministic: the weights come from a seeded numpy generator, so running this again
rewrites byte-identical models. References are computed by onnxruntime itself, so the
server's answers are checked against the real runtime, not against numbers we typed.

Writes:
  examples/models/<model>/1/model.onnx    the model repository served by default
  examples/models/<model>/config.toml     (where a model needs more than defaults)
  examples/references/<model>.json        inputs and onnxruntime's outputs per case
  mesh/tests/models/<model>/1/model.onnx  models only the tests serve (e.g. one that fails at run time)
  examples/images/*.png, *.jpg            small images for the image-preprocess plugin
  examples/recsys/models/ranker/...       the recommendation example's ranking model
  examples/recsys/data/{users,items}.csv  its feature tables

Run: python3 scripts/make_models.py
"""

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
REFERENCES = ROOT / "examples" / "references"
TEST_MODELS = ROOT / "mesh" / "tests" / "models"
OPSET = 17
IR_VERSION = 8

# OIP datatype names by numpy dtype, the only spelling the references use.
OIP = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(object): "BYTES",
}


def save(name, graph, config=None, root=MODELS):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="meshserve/scripts/make_models.py",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    if config is not None:
        (root / name / "config.toml").write_text(config)
    return path


def dense(rng, fan_in, fan_out, gain):
    w = rng.standard_normal((fan_in, fan_out)).astype(np.float32) * np.float32(gain / np.sqrt(fan_in))
    b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
    return w, b


def fraud(rng):
    """FP32 [N,32] -> two ReLU layers -> softmax [N,2]: the latency-critical model."""
    w1, b1 = dense(rng, 32, 64, np.sqrt(2))
    w2, b2 = dense(rng, 64, 2, 1.0)
    nodes = [
        helper.make_node("Gemm", ["features", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fraud",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]],
    )
    return save(
        "fraud",
        graph,
        "# Sessions and threads are left to the node (one single-threaded session per core for a model\n"
        "# this small, chosen at load; see the README). A partial batch may wait a little longer to fill:\n"
        "max_queue_delay_us = 200\n"
        "# In a mesh, two nodes serve it (and its endpoints): the third forwards (ignored standalone).\n"
        "replicas = 2\n",
    )


HEAVY_WIDTH = 512
HEAVY_DEPTH = 8


def heavy(rng):
    """FP32 [N,512] -> 8 ReLU layers of 512 -> [N,16]: about 4.2 MFLOP per sample.

    One hidden weight matrix is shared by every layer, so the file stays near 1 MB while
    the compute per sample is that of a much larger network.
    """
    w, b = dense(rng, HEAVY_WIDTH, HEAVY_WIDTH, np.sqrt(2))
    w_out, b_out = dense(rng, HEAVY_WIDTH, 16, 1.0)
    nodes, x = [], "input"
    for i in range(HEAVY_DEPTH):
        nodes += [
            helper.make_node("MatMul", [x, "w"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", "b"], [f"z{i}"]),
            helper.make_node("Relu", [f"z{i}"], [f"a{i}"]),
        ]
        x = f"a{i}"
    nodes += [
        helper.make_node("MatMul", [x, "w_out"], ["m_out"]),
        helper.make_node("Add", ["m_out", "b_out"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", HEAVY_WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(a, n) for a, n in [(w, "w"), (b, "b"), (w_out, "w_out"), (b_out, "b_out")]],
    )
    return save(
        "heavy",
        graph,
        "max_batch_size = 64\nmax_queue_delay_us = 500\n"
        "# In a mesh, one node serves it and the others forward (ignored by a standalone node).\n"
        "replicas = 1\n",
    )


def mixed(_rng):
    """Two inputs of other types: INT64 ids and a BOOL mask -> masked sum (INT64), any (BOOL), mean (FP64)."""
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask_i64"], to=TensorProto.INT64),
        helper.make_node("Mul", ["ids", "mask_i64"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axis1"], ["masked_sum"], keepdims=1),
        helper.make_node("ReduceSum", ["mask_i64", "axis1"], ["count"], keepdims=1),
        helper.make_node("Greater", ["count", "zero"], ["any"]),
        helper.make_node("Cast", ["masked_sum"], ["sum_f64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["count"], ["count_f64"], to=TensorProto.DOUBLE),
        helper.make_node("Max", ["count_f64", "one"], ["denominator"]),
        helper.make_node("Div", ["sum_f64", "denominator"], ["mean"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("masked_sum", TensorProto.INT64, ["batch", 1]),
            helper.make_tensor_value_info("any", TensorProto.BOOL, ["batch", 1]),
            helper.make_tensor_value_info("mean", TensorProto.DOUBLE, ["batch", 1]),
        ],
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float64), "one"),
        ],
    )
    return save("mixed", graph)


IMAGE_SIZE = 32


def image_stats(_rng):
    """FP32 [N,3,32,32] NCHW image -> per-channel mean [N,3] and the global max [N,1]: the model
    behind the image-preprocess plugin, whose answers are easy to predict for a solid colour."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["channel_mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("ReduceMax", ["flat"], ["max"], axes=[1], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "image_stats",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [
            helper.make_tensor_value_info("channel_mean", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("max", TensorProto.FLOAT, ["batch", 1]),
        ],
    )
    return save("image_stats", graph)


ECHO_TYPES = [
    ("bool", TensorProto.BOOL, np.bool_),
    ("int8", TensorProto.INT8, np.int8),
    ("int16", TensorProto.INT16, np.int16),
    ("int32", TensorProto.INT32, np.int32),
    ("int64", TensorProto.INT64, np.int64),
    ("uint8", TensorProto.UINT8, np.uint8),
    ("uint16", TensorProto.UINT16, np.uint16),
    ("uint32", TensorProto.UINT32, np.uint32),
    ("uint64", TensorProto.UINT64, np.uint64),
    ("fp32", TensorProto.FLOAT, np.float32),
    ("fp64", TensorProto.DOUBLE, np.float64),
    ("bytes", TensorProto.STRING, object),
]


def echo(_rng):
    """One Identity per OIP datatype: proves every datatype crosses the server bit-exactly."""
    nodes = [helper.make_node("Identity", [f"in_{n}"], [f"out_{n}"]) for n, _, _ in ECHO_TYPES]
    graph = helper.make_graph(
        nodes,
        "echo",
        [helper.make_tensor_value_info(f"in_{n}", t, ["batch", 3]) for n, t, _ in ECHO_TYPES],
        [helper.make_tensor_value_info(f"out_{n}", t, ["batch", 3]) for n, t, _ in ECHO_TYPES],
    )
    return save("echo", graph)


def reshape_by_value(_rng):
    """FP32 [N,-1] reshaped to [-1,3]: valid for the signature, but fails in ONNX Runtime
    whenever the element count is not a multiple of 3. The tests' model that breaks at run time."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "target"], ["y"])],
        "reshape_by_value",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 3])],
        [numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "target")],
    )
    return save("reshape_by_value", graph, "max_batch_size = 0\n", root=TEST_MODELS)


def busy_zeros(rng, source, prefix):
    """Nodes that turn float `source` [N,1] into zeros [N,1] after about a millisecond of
    matrix work that ONNX Runtime cannot fold away (it depends on the input): a test model's
    runs then overlap requests that arrive together, so they are batched."""
    width, layers = 512, 8
    nodes = [helper.make_node("Expand", [source, f"{prefix}_wide"], [f"{prefix}_h0"])]
    weights = [numpy_helper.from_array(np.array([1, width], dtype=np.int64), f"{prefix}_wide")]
    # One weight matrix for every layer keeps the file small (1 MiB).
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    weights.append(numpy_helper.from_array(w, f"{prefix}_w"))
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"{prefix}_h{i}", f"{prefix}_w"], [f"{prefix}_m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"{prefix}_m{i}"], [f"{prefix}_h{i + 1}"]))
    weights.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}_axis"))
    weights.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), f"{prefix}_zero"))
    nodes.append(helper.make_node("ReduceSum", [f"{prefix}_h{layers}", f"{prefix}_axis"], [f"{prefix}_sum"], keepdims=1))
    nodes.append(helper.make_node("Mul", [f"{prefix}_sum", f"{prefix}_zero"], [f"{prefix}_zeros"]))
    return nodes, weights, f"{prefix}_zeros"


def gather_rows(rng):
    """INT64 ids [N,1] looked up in a 10-row table: an id past 9 fails in ONNX Runtime. The
    tests' model where one poisoned request would fail every request batched with it."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    busy, weights, zeros = busy_zeros(rng, "ids_f", "busy")
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        *busy,
        helper.make_node("Gather", ["table", "ids"], ["picked"], axis=0),
        helper.make_node("Unsqueeze", [zeros, "last"], ["zeros3"]),
        helper.make_node("Add", ["picked", "zeros3"], ["rows"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gather_rows",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 1, 4])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "last"),
            *weights,
        ],
    )
    # Every request through the queue, so the tests' concurrent requests meet in batches.
    return save("gather_rows", graph, "intra_op_threads = 1\ninline_max_us = 0\ninline_blocking_max_us = 0\n", root=TEST_MODELS)


def flatten_rows(rng):
    """FP32 [N,4] flattened to [4N], declared with a dynamic first dimension: its outputs do not
    follow the inputs' batch dimension, which only shows when requests are batched."""
    busy, weights, zeros = busy_zeros(rng, "first", "busy")
    nodes = [
        helper.make_node("Slice", ["x", "start", "stop", "axis1"], ["first"]),
        *busy,
        helper.make_node("Add", ["x", zeros], ["same"]),
        helper.make_node("Reshape", ["same", "flat"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "flatten_rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "stop"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            *weights,
        ],
    )
    # Every request through the queue, so the tests' concurrent requests meet in batches.
    return save("flatten_rows", graph, "intra_op_threads = 1\ninline_max_us = 0\ninline_blocking_max_us = 0\n", root=TEST_MODELS)


def heavy_impostor(_rng):
    """`heavy`'s signature (FP32 [N,512] -> [N,16]) with every output 1337: the other file a
    hostile member holds under heavy's name, which the tests check no other node installs."""
    nodes = [
        helper.make_node("Slice", ["input", "start", "stop", "axis1"], ["first"]),
        helper.make_node("Mul", ["first", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "mark"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy_impostor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", HEAVY_WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 16])],
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
            numpy_helper.from_array(np.array([16], dtype=np.int64), "stop"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.array(1337.0, dtype=np.float32), "mark"),
        ],
    )
    return save("heavy_impostor", graph, root=TEST_MODELS)


SLOW_WIDTH = 512
SLOW_DEPTH = 64


def slow(rng):
    """FP32 [N,16] -> 64 tanh layers of 512 -> [N,4]: about 34 MFLOP per sample from a
    64-byte input, so a request costs the model a millisecond or so and the front door
    almost nothing: the overload tests' slow model, whose queue fills without the clients
    taking the machine. One hidden weight matrix, shared by every layer, keeps the file small."""
    w_in, b_in = dense(rng, 16, SLOW_WIDTH, 1.0)
    w, b = dense(rng, SLOW_WIDTH, SLOW_WIDTH, 1.0)
    w_out, b_out = dense(rng, SLOW_WIDTH, 4, 1.0)
    nodes = [
        helper.make_node("MatMul", ["input", "w_in"], ["m_in"]),
        helper.make_node("Add", ["m_in", "b_in"], ["a_in"]),
    ]
    x = "a_in"
    for i in range(SLOW_DEPTH):
        nodes += [
            helper.make_node("MatMul", [x, "w"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", "b"], [f"z{i}"]),
            helper.make_node("Tanh", [f"z{i}"], [f"a{i}"]),
        ]
        x = f"a{i}"
    nodes += [
        helper.make_node("MatMul", [x, "w_out"], ["m_out"]),
        helper.make_node("Add", ["m_out", "b_out"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(a, n)
            for a, n in [(w_in, "w_in"), (b_in, "b_in"), (w, "w"), (b, "b"), (w_out, "w_out"), (b_out, "b_out")]
        ],
    )
    return save("slow", graph, root=TEST_MODELS)


def echo_inputs(rng, rows):
    inputs = {}
    for name, _, dtype in ECHO_TYPES:
        if dtype is object:
            words = ["alpha", "βeta", "", "quote\"d", "x" * 17, "tab\tend"]
            a = np.array([[words[(r * 3 + c) % len(words)] for c in range(3)] for r in range(rows)], dtype=object)
        elif dtype is np.bool_:
            a = rng.integers(0, 2, size=(rows, 3)).astype(np.bool_)
        elif np.issubdtype(dtype, np.floating):
            a = (rng.standard_normal((rows, 3)) * 1000).astype(dtype)
        else:
            info = np.iinfo(dtype)
            # The extremes of each type are the values a lossy codec gets wrong.
            a = rng.integers(info.min, info.max, size=(rows, 3), dtype=dtype, endpoint=True)
            a[0, 0], a[0, 1] = info.min, info.max
        inputs[f"in_{name}"] = a
    return inputs


RECSYS = ROOT / "examples" / "recsys"
RECSYS_FEATURES = 8
RECSYS_USERS = 500
RECSYS_ITEMS = 2000


def write_table(path, key, prefix, rows):
    """A feature table as CSV, values rounded to 4 decimals so the text is the exact data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ",".join([key] + [f"f{j}" for j in range(rows.shape[1])])
    lines = [header] + [
        ",".join([f"{prefix}{i:05d}"] + [f"{v:.4f}" for v in row]) for i, row in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n")


def recsys(rng):
    """The ranking model of examples/recsys: (user, item) feature pairs [N,8]+[N,8] -> a score in
    (0, 1) per pair, from an MLP over [user, item, user*item] plus the user.item affinity; the
    candidate ids ride along as a STRING tensor (Identity), so the post-plugin can name them.
    Also writes the user and item feature tables."""
    d = RECSYS_FEATURES
    w1, b1 = dense(rng, 3 * d, 32, np.sqrt(2))
    w2, b2 = dense(rng, 32, 1, 1.0)
    nodes = [
        helper.make_node("Mul", ["user", "item"], ["cross"]),
        helper.make_node("Concat", ["user", "item", "cross"], ["pair"], axis=1),
        helper.make_node("Gemm", ["pair", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["mlp"]),
        helper.make_node("ReduceSum", ["cross", "axes"], ["affinity"], keepdims=1),
        helper.make_node("Add", ["mlp", "affinity"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
        helper.make_node("Identity", ["item_id"], ["item_ids"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ranker",
        [
            helper.make_tensor_value_info("user", TensorProto.FLOAT, ["batch", d]),
            helper.make_tensor_value_info("item", TensorProto.FLOAT, ["batch", d]),
            helper.make_tensor_value_info("item_id", TensorProto.STRING, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("item_ids", TensorProto.STRING, ["batch"]),
        ],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]]
        + [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    path = save(
        "ranker",
        graph,
        "# A request is one user's candidates (up to 1000 rows); batches stack several.\n"
        "max_batch_size = 4096\nmax_request_rows = 1000\nmax_queue_delay_us = 200\n",
        root=RECSYS / "models",
    )
    users = (rng.standard_normal((RECSYS_USERS, d)) * 0.5).astype(np.float32)
    items = (rng.standard_normal((RECSYS_ITEMS, d)) * 0.5).astype(np.float32)
    write_table(RECSYS / "data" / "users.csv", "user", "u", users)
    write_table(RECSYS / "data" / "items.csv", "item", "i", items)
    return path


def to_json(a):
    if a.dtype == object:
        return [s if isinstance(s, str) else s.decode() for s in a.reshape(-1).tolist()]
    return a.reshape(-1).tolist()


def write_references(name, path, cases):
    """Runs each case through onnxruntime and stores inputs and outputs, flattened, with shapes."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    records = []
    for inputs in cases:
        outputs = session.run(out_names, inputs)
        records.append(
            {
                "inputs": [
                    {"name": k, "datatype": OIP[v.dtype], "shape": list(v.shape), "data": to_json(v)}
                    for k, v in inputs.items()
                ],
                "outputs": [
                    {"name": k, "datatype": OIP[v.dtype], "shape": list(v.shape), "data": to_json(v)}
                    for k, v in zip(out_names, outputs)
                ],
            }
        )
    REFERENCES.mkdir(parents=True, exist_ok=True)
    (REFERENCES / f"{name}.json").write_text(json.dumps({"model": name, "cases": records}, indent=1) + "\n")


def images():
    """Solid red and a left-to-right grey ramp, as PNG and JPEG, for the image plugin's tests."""
    from PIL import Image

    out = ROOT / "examples" / "images"
    out.mkdir(parents=True, exist_ok=True)
    red = Image.new("RGB", (64, 48), (255, 0, 0))
    red.save(out / "red-64x48.png", optimize=True)
    red.save(out / "red-64x48.jpg", quality=95)
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (20, 1)), mode="L")
    ramp.save(out / "ramp-40x20-grey.png", optimize=True)


def main():
    rng = np.random.default_rng(20261128)
    path = fraud(rng)
    write_references("fraud", path, [{"features": rng.standard_normal((n, 32)).astype(np.float32)} for n in (1, 3, 8)])
    path = heavy(rng)
    write_references("heavy", path, [{"input": rng.standard_normal((n, HEAVY_WIDTH)).astype(np.float32)} for n in (1, 2)])
    path = mixed(rng)
    write_references(
        "mixed",
        path,
        [
            {
                "ids": rng.integers(-(2**40), 2**40, size=(n, 4), dtype=np.int64),
                "mask": rng.integers(0, 2, size=(n, 4)).astype(np.bool_),
            }
            for n in (1, 4)
        ],
    )
    path = echo(rng)
    write_references("echo", path, [echo_inputs(rng, n) for n in (1, 2)])
    path = image_stats(rng)
    write_references(
        "image_stats",
        path,
        [{"image": rng.standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)}],
    )
    reshape_by_value(rng)
    # Their own generator, so the models above stay byte-for-byte what they were.
    test_rng = np.random.default_rng(20261129)
    gather_rows(test_rng)
    flatten_rows(test_rng)
    heavy_impostor(test_rng)
    slow(np.random.default_rng(20261206))
    images()
    recsys(np.random.default_rng(20261130))
    print(f"wrote models under {MODELS} and {TEST_MODELS}, references under {REFERENCES}")


if __name__ == "__main__":
    main()
