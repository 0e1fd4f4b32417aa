"""The official Triton gRPC client, unmodified, against meshserve's gRPC door on its HTTP port;
and a raw grpcio stub (from the same package's generated modules) sending typed contents, as
KServe and OpenVINO clients do."""

import queue
import shutil
import ssl
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import metric
from test_tritonclient import as_array, assert_outputs


@pytest.fixture(scope="module")
def client(node):
    return grpcclient.InferenceServerClient(url=node.url)


@pytest.fixture(scope="module")
def stub(node):
    channel = grpc.insecure_channel(node.url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def inputs_of(case):
    inputs = []
    for tensor in case["inputs"]:
        entry = grpcclient.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
        entry.set_data_from_numpy(as_array(tensor))
        inputs.append(entry)
    return inputs


def test_health_metadata_and_config(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fraud")
    assert client.is_model_ready("fraud", "1")
    assert not client.is_model_ready("fraud", "7")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server.name == "meshserve"
    assert "model_repository" in server.extensions
    meta = client.get_model_metadata("mixed")
    assert [i.name for i in meta.inputs] == ["ids", "mask"]
    assert meta.inputs[1].datatype == "BOOL"
    assert meta.versions == ["1"]
    # What perf_analyzer reads: the batch size, and dims without the batch dimension.
    config = client.get_model_config("fraud").config
    assert config.max_batch_size == 64
    assert config.input[0].name == "features"
    assert list(config.input[0].dims) == [32]
    assert config.input[0].data_type == 11  # TYPE_FP32
    assert config.output[0].name == "probabilities"
    assert config.dynamic_batching.max_queue_delay_microseconds == 200


@pytest.mark.parametrize("model", ["fraud", "mixed", "echo"])
def test_infer_matches_onnxruntime_every_datatype(client, references, model):
    # echo carries every datatype, BYTES included, through raw contents both ways.
    for case in references(model)["cases"]:
        outputs = [grpcclient.InferRequestedOutput(t["name"]) for t in case["outputs"]]
        result = client.infer(model, inputs_of(case), outputs=outputs, request_id="grpc-1")
        assert result.get_response().id == "grpc-1"
        assert_outputs(result, case)


def test_statistics_count_what_the_node_ran(node, client):
    def stats(model):
        (row,) = client.get_inference_statistics(model).model_stats
        return row

    before = stats("fraud")
    counted = metric(node, "meshserve_requests_total", model="fraud", status="200", protocol="grpc")
    assert (before.name, before.version) == ("fraud", "1")
    # Four requests of 3 rows and one that fails.
    features = grpcclient.InferInput("features", [3, 32], "FP32")
    features.set_data_from_numpy(np.ones((3, 32), np.float32))
    for _ in range(4):
        client.infer("fraud", [features])
    wrong = grpcclient.InferInput("features", [1, 31], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 31), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("fraud", [wrong])
    after = stats("fraud")
    # The node's request counter names the door.
    assert metric(node, "meshserve_requests_total", model="fraud", status="200", protocol="grpc") == counted + 4

    def grew(field):
        was, now = getattr(before.inference_stats, field), getattr(after.inference_stats, field)
        return now.count - was.count, now.ns - was.ns

    assert after.inference_count - before.inference_count == 12
    assert 1 <= after.execution_count - before.execution_count <= 4
    count, ns = grew("success")
    assert count == 4 and ns > 0
    count, ns = grew("fail")
    assert count == 1 and ns > 0
    # Every request that ran waited (perhaps 0 ns) and was computed, once each.
    assert grew("queue")[0] == 4
    count, ns = grew("compute_infer")
    assert count == 4 and ns > 0
    assert after.last_inference >= before.last_inference and after.last_inference > 0

    # No name: every model here; an unknown one: NOT_FOUND.
    names = {row.name for row in client.get_inference_statistics().model_stats}
    assert {"fraud", "mixed", "echo"} <= names
    with pytest.raises(InferenceServerException) as failure:
        client.get_inference_statistics("nope")
    assert failure.value.status() == "StatusCode.NOT_FOUND"


def test_requested_outputs_and_async_infer(client, references):
    case = references("mixed")["cases"][1]
    result = client.infer("mixed", inputs_of(case), outputs=[grpcclient.InferRequestedOutput("mean")])
    assert [o.name for o in result.get_response().outputs] == ["mean"]

    fraud = references("fraud")["cases"][0]
    answers = queue.Queue()
    for i in range(32):
        client.async_infer(
            "fraud",
            inputs_of(fraud),
            lambda result, error: answers.put((result, error)),
            request_id=str(i),
        )
    ids = set()
    for _ in range(32):
        result, error = answers.get(timeout=30)
        assert error is None, error
        ids.add(result.get_response().id)
        assert_outputs(result, fraud)
    assert ids == {str(i) for i in range(32)}


def test_each_failure_has_its_status_and_the_servers_message(node, client, stub):
    wrong = grpcclient.InferInput("features", [1, 31], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 31), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="expects") as failure:
        client.infer("fraud", [wrong])
    assert failure.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as failure:
        client.infer("nope", [wrong])
    assert failure.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="system shared memory") as failure:
        client.get_system_shared_memory_status()
    assert failure.value.status() == "StatusCode.UNIMPLEMENTED"

    # A message past the node's body limit (32 MiB) is refused before it is read.
    big = service_pb2.ModelInferRequest(model_name="fraud")
    big.inputs.add(name="features", datatype="FP32", shape=[1 << 18, 32])
    big.raw_input_contents.append(bytes(33 << 20))
    with pytest.raises(grpc.RpcError) as failure:
        stub.ModelInfer(big, timeout=30)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Raw and typed contents together are refused, naming the input.
    both = service_pb2.ModelInferRequest(model_name="fraud")
    tensor = both.inputs.add(name="features", datatype="FP32", shape=[1, 32])
    tensor.contents.fp32_contents.extend([0.0] * 32)
    both.raw_input_contents.append(np.zeros((1, 32), np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as failure:
        stub.ModelInfer(both, timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "both contents and raw_input_contents" in failure.value.details()

    # A body that is not protobuf at all.
    garbage = grpc.insecure_channel(node.url).unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as failure:
        garbage(b"\xff\xff\xff\xff\xff", timeout=30)
    assert failure.value.code() == grpc.StatusCode.INTERNAL


def test_typed_contents_in_and_out_with_a_raw_grpcio_stub(stub, references):
    case = references("fraud")["cases"][0]
    features = np.array(case["inputs"][0]["data"], dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="fraud", id="typed")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=case["inputs"][0]["shape"])
    tensor.contents.fp32_contents.extend(features.tolist())
    response, call = stub.ModelInfer.with_call(request, timeout=30)
    assert response.id == "typed"
    assert not response.raw_output_contents
    want = as_array(case["outputs"][0])
    got = np.array(response.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(response.outputs[0].shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # Narrow integer types travel widened, and come back so.
    echo = references("echo")["cases"][0]
    request = service_pb2.ModelInferRequest(model_name="echo")
    fields = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
              "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
              "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
              "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
    for t in echo["inputs"]:
        entry = request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        values = [v.encode() for v in t["data"]] if t["datatype"] == "BYTES" else t["data"]
        getattr(entry.contents, fields[t["datatype"]]).extend(values)
    response = stub.ModelInfer(request, timeout=30)
    by_name = {o.name: o for o in response.outputs}
    for t in echo["outputs"]:
        got = list(getattr(by_name[t["name"]].contents, fields[t["datatype"]]))
        want = [v.encode() for v in t["data"]] if t["datatype"] == "BYTES" else t["data"]
        if t["datatype"].startswith("FP"):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        else:
            assert got == want, t["name"]


def test_a_stream_answers_in_order_and_a_failure_in_its_place(client, references):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        fraud = references("fraud")["cases"][0]
        for i in range(100):
            client.async_stream_infer("fraud", inputs_of(fraud), request_id=str(i))
        wrong = grpcclient.InferInput("features", [1, 31], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 31), dtype=np.float32))
        client.async_stream_infer("fraud", [wrong], request_id="wrong")
        client.async_stream_infer("fraud", inputs_of(fraud), request_id="after")
        got = [answers.get(timeout=30) for _ in range(102)]
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(got[:100]):
        assert error is None, error
        assert result.get_response().id == str(i)
        assert_outputs(result, fraud)
    result, error = got[100]
    assert result is None and "expects" in str(error)
    result, error = got[101]
    assert error is None and result.get_response().id == "after"


def test_repository_index_load_and_unload(client):
    index = client.get_model_repository_index()
    assert {"fraud", "heavy", "mixed", "echo"} <= {m.name for m in index.models}
    assert all(m.state == "READY" for m in index.models if m.name == "fraud")
    client.unload_model("echo")
    assert not client.is_model_ready("echo")
    client.load_model("echo")
    assert client.is_model_ready("echo")
    with pytest.raises(InferenceServerException, match="not supported") as failure:
        client.load_model("echo", config='{"max_batch_size": 8}')
    assert failure.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as failure:
        client.load_model("not-in-the-repository")
    assert failure.value.status() == "StatusCode.NOT_FOUND"


def test_repository_calls_need_the_admin_token_when_the_node_has_one(tmp_path):
    from conftest import ROOT, Node, skip_endpoints


    repository = tmp_path / "models"
    shutil.copytree(ROOT / "examples" / "models", repository, ignore=skip_endpoints)
    token = "grpc-admin-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "node.toml").write_text('[http]\nadmin_token_file = "token"\n')
    node = Node(repository, "--config", tmp_path / "node.toml")
    try:
        client = grpcclient.InferenceServerClient(node.url)
        with pytest.raises(InferenceServerException, match="admin token") as failure:
            client.unload_model("echo")
        assert failure.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as failure:
            client.unload_model("echo", headers={"authorization": "Bearer not-the-token-at-all"})
        assert failure.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.is_model_ready("echo")
        client.unload_model("echo", headers={"authorization": f"Bearer {token}"})
        assert not client.is_model_ready("echo")
    finally:
        node.stop()


def test_standard_health_checking_answers_for_the_node_and_each_model(node):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(node.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="fraud"), timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as failure:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        # A watch sends the status at once.
        watch = health.Watch(health_pb2.HealthCheckRequest(service="fraud"), timeout=10)
        assert next(watch).status == serving
        watch.cancel()


def test_reflection_lists_and_describes_the_services(node):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(node.url) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        assert "ModelInfer" in [m.name for m in service.methods]
        request = pool.FindMessageTypeByName("inference.ModelInferRequest")
        assert request.fields_by_name["raw_input_contents"].number == 7


def test_an_endpoint_runs_its_pipeline_over_grpc(tmp_path, references):
    """OIP tensors in: a post stage's tensors come back as outputs, a post stage's own reply
    as one BYTES output `reply`, a plugin's refusal as its status."""
    from conftest import ROOT, Node, skip_endpoints

    import json

    repository = tmp_path / "models"
    shutil.copytree(ROOT / "examples" / "models", repository, ignore=skip_endpoints)
    plugins = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"
    (tmp_path / "node.toml").write_text(
        "[endpoints.passthrough]\nmodel = \"fraud\"\n"
        f"post = {{ path = \"{plugins / 'noop.wasm'}\" }}\n"
        "[endpoints.decide]\nmodel = \"fraud\"\n"
        f"post = {{ path = \"{plugins / 'threshold.wasm'}\", config = '{{\"index\": 1, \"review\": 0.0, \"block\": 2.0}}' }}\n"
        "[endpoints.missing-output]\nmodel = \"fraud\"\n"
        f"post = {{ path = \"{plugins / 'threshold.wasm'}\", config = '{{\"output\": \"nope\"}}' }}\n"
    )
    node = Node(repository, "--config", tmp_path / "node.toml")
    try:
        client = grpcclient.InferenceServerClient(node.url)
        fraud = references("fraud")["cases"][0]
        assert client.is_model_ready("decide")

        passed = client.infer("passthrough", inputs_of(fraud), request_id="e1")
        assert passed.get_response().model_name == "passthrough"
        np.testing.assert_allclose(
            passed.as_numpy("probabilities"), as_array(fraud["outputs"][0]), rtol=1e-5, atol=1e-5
        )

        decided = client.infer("decide", inputs_of(fraud))
        reply = decided.as_numpy("reply")
        decision = json.loads(reply.reshape(-1)[0])
        rows = decision if isinstance(decision, list) else [decision]
        want = as_array(fraud["outputs"][0])[:, 1]
        assert [r["decision"] for r in rows] == ["review"] * len(want)
        np.testing.assert_allclose([r["score"] for r in rows], want, rtol=1e-5)
        assert decided.get_response().parameters["content_type"].string_param == "application/json"

        with pytest.raises(InferenceServerException, match="no output 'nope'") as failure:
            client.infer("missing-output", inputs_of(fraud))
        assert failure.value.status() == "StatusCode.INTERNAL"
    finally:
        node.stop()


def test_unary_messages_count_against_the_nodes_byte_budget(tmp_path, references):
    """A message the node's in-flight byte budget cannot hold is refused at once with
    UNAVAILABLE and a retry pushback, as REST answers 503 + Retry-After; smaller ones pass."""
    from conftest import ROOT, Node, skip_endpoints


    repository = tmp_path / "models"
    shutil.copytree(ROOT / "examples" / "models", repository, ignore=skip_endpoints)
    (tmp_path / "node.toml").write_text("[http]\nmax_body_bytes_in_flight = 1048576\n")
    node = Node(repository, "--config", tmp_path / "node.toml")
    try:
        with grpc.insecure_channel(node.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            rows = 16384  # 2 MiB of FP32 features
            big = service_pb2.ModelInferRequest(model_name="fraud")
            big.inputs.add(name="features", datatype="FP32", shape=[rows, 32])
            big.raw_input_contents.append(bytes(rows * 32 * 4))
            with pytest.raises(grpc.RpcError) as failure:
                stub.ModelInfer(big, timeout=30)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "max_body_bytes_in_flight" in failure.value.details()
            pushback = dict(failure.value.trailing_metadata() or [])
            assert int(pushback["grpc-retry-pushback-ms"]) >= 1
        client = grpcclient.InferenceServerClient(node.url)
        fraud = references("fraud")["cases"][0]
        assert_outputs(client.infer("fraud", inputs_of(fraud)), fraud)
    finally:
        node.stop()


def test_grpc_over_tls_shares_the_port_with_rest(tmp_path, references):
    """With `http.tls_cert` the HTTP port speaks TLS and offers ALPN h2: tritonclient's TLS
    channel calls the node there, checking its certificate against the CA."""
    from conftest import ROOT, Node, _binary, skip_endpoints

    certs = tmp_path / "certs"
    subprocess.run([_binary(), "certs", "--dir", certs, "--server", "127.0.0.1"], check=True, capture_output=True)
    repository = tmp_path / "models"
    shutil.copytree(ROOT / "examples" / "models", repository, ignore=skip_endpoints)
    (tmp_path / "node.toml").write_text(
        f'[http]\ntls_cert = "{certs / "server.pem"}"\ntls_key = "{certs / "server.key"}"\n'
    )
    node = Node(repository, "--config", tmp_path / "node.toml")
    try:
        client = grpcclient.InferenceServerClient(node.url, ssl=True, root_certificates=str(certs / "ca.pem"))
        assert client.is_server_ready()
        fraud = references("fraud")["cases"][0]
        assert_outputs(client.infer("fraud", inputs_of(fraud)), fraud)
        # REST over TLS on the same port.
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with urllib.request.urlopen(f"https://{node.url}/v2/health/ready", context=context, timeout=30) as ready:
            assert ready.status == 200
        # A client that does not trust the node's CA gets no answer.
        untrusting = grpcclient.InferenceServerClient(node.url, ssl=True)
        with pytest.raises(InferenceServerException):
            untrusting.is_server_live(client_timeout=5)
    finally:
        node.stop()
