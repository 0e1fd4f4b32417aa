"""The official Triton HTTP client, unmodified, against meshserve."""

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

NUMPY = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


@pytest.fixture(scope="module")
def client(node):
    return httpclient.InferenceServerClient(url=node.url, concurrency=4)


def as_array(tensor):
    if tensor["datatype"] == "BYTES":
        values = [s.encode() for s in tensor["data"]]
        return np.array(values, dtype=np.object_).reshape(tensor["shape"])
    return np.array(tensor["data"], dtype=NUMPY[tensor["datatype"]]).reshape(tensor["shape"])


def test_health_metadata_and_repository(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fraud")
    assert client.is_model_ready("fraud", "1")
    assert not client.is_model_ready("fraud", "7")
    assert client.get_server_metadata()["name"] == "meshserve"
    meta = client.get_model_metadata("mixed")
    assert [i["name"] for i in meta["inputs"]] == ["ids", "mask"]
    assert meta["inputs"][1]["datatype"] == "BOOL"
    config = client.get_model_config("fraud")
    assert config["max_batch_size"] == 64
    names = {entry["name"] for entry in client.get_model_repository_index()}
    assert {"fraud", "heavy", "mixed", "echo"} <= names


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("model", ["fraud", "mixed", "echo"])
def test_infer_matches_onnxruntime(client, references, model, binary):
    for case in references(model)["cases"]:
        inputs = []
        for tensor in case["inputs"]:
            entry = httpclient.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
            entry.set_data_from_numpy(as_array(tensor), binary_data=binary)
            inputs.append(entry)
        outputs = [httpclient.InferRequestedOutput(t["name"], binary_data=binary) for t in case["outputs"]]
        result = client.infer(model, inputs, outputs=outputs, request_id="py-1")
        assert result.get_response()["id"] == "py-1"
        assert_outputs(result, case)


def assert_outputs(result, case):
    """Every output of a reference case, as tritonclient (HTTP or gRPC) returned it."""
    for expected in case["outputs"]:
        got = result.as_numpy(expected["name"])
        want = as_array(expected)
        assert got.shape == want.shape, expected["name"]
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        elif expected["datatype"] == "BYTES":
            # tritonclient returns JSON BYTES as str and binary BYTES as bytes.
            as_bytes = np.vectorize(lambda v: v if isinstance(v, bytes) else v.encode(), otypes=[object])
            np.testing.assert_array_equal(as_bytes(got), want)
        else:
            np.testing.assert_array_equal(got, want)


def test_requested_output_subset_and_async_batching(client, references):
    case = references("mixed")["cases"][1]
    inputs = []
    for tensor in case["inputs"]:
        entry = httpclient.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
        entry.set_data_from_numpy(as_array(tensor))
        inputs.append(entry)
    result = client.infer("mixed", inputs, outputs=[httpclient.InferRequestedOutput("mean")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["mean"]

    fraud = references("fraud")["cases"][0]
    entry = httpclient.InferInput("features", fraud["inputs"][0]["shape"], "FP32")
    entry.set_data_from_numpy(as_array(fraud["inputs"][0]))
    pending = [client.async_infer("fraud", [entry]) for _ in range(32)]
    for request in pending:
        np.testing.assert_allclose(request.get_result().as_numpy("probabilities"), as_array(fraud["outputs"][0]), rtol=1e-5, atol=1e-5)


def test_errors_surface_as_exceptions_with_the_server_message(client):
    entry = httpclient.InferInput("features", [1, 31], "FP32")
    entry.set_data_from_numpy(np.zeros((1, 31), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="expects"):
        client.infer("fraud", [entry])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [entry])


def test_load_and_unload(client):
    client.unload_model("echo")
    assert not client.is_model_ready("echo")
    client.load_model("echo")
    assert client.is_model_ready("echo")


def test_statistics_over_rest_count_requests_and_runs(client):
    def stats():
        (row,) = client.get_inference_statistics("fraud")["model_stats"]
        return row

    before = stats()
    assert (before["name"], before["version"]) == ("fraud", "1")
    features = httpclient.InferInput("features", [2, 32], "FP32")
    features.set_data_from_numpy(np.ones((2, 32), np.float32))
    for _ in range(3):
        client.infer("fraud", [features])
    after = stats()
    grew = lambda key: after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"]
    assert grew("success") == 3
    assert grew("queue") == grew("compute_infer") == grew("compute_input") == 3
    assert after["inference_count"] - before["inference_count"] == 6
    assert "statistics" in client.get_server_metadata()["extensions"]
    every = client.get_inference_statistics()["model_stats"]
    assert "fraud" in {row["name"] for row in every}
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_inference_statistics("nope")
