"""The HTTP/3 front door, driven by a third-party HTTP/3 client (niquests, over qh3)."""

import json
import re
import shutil
import subprocess
import time

import niquests
import numpy as np
import onnxruntime
import pytest

from conftest import ROOT, Node, _binary, metric

PLUGINS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"
MAX_BODY = 2 * 1024 * 1024
BODY_TIMEOUT_MS = 1500


def make_certs(directory, *args):
    subprocess.run([_binary(), "certs", "--dir", str(directory), *args], check=True, capture_output=True)
    return directory


class H3Session(niquests.Session):
    """A session that speaks only HTTP/3 and trusts the mesh CA (passed per request: the
    session-wide `verify` does not reach niquests' QUIC connections)."""

    def __init__(self, ca, **options):
        super().__init__(disable_http1=True, disable_http2=True, **options)
        self.ca = str(ca)

    def request(self, *args, **kwargs):
        if kwargs.get("verify") is None:
            kwargs["verify"] = self.ca
        return super().request(*args, **kwargs)


def h3_session(node, ca, **options):
    """An HTTP/3 session to `node`."""
    session = H3Session(ca, **options)
    host, port = node.http3.rsplit(":", 1)
    session.quic_cache_layer.add_domain(host, int(port))
    return session


def h3_url(node, path):
    return f"https://{node.http3}{path}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"), "--server", "127.0.0.1", "--node", "a", "--node", "b")


@pytest.fixture(scope="module")
def h3node(certs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("h3node")
    config = folder / "node.toml"
    config.write_text(
        f"""
[http]
max_body_bytes = {MAX_BODY}
body_read_timeout_ms = {BODY_TIMEOUT_MS}

[http3]
tls_cert = "{certs / 'server.pem'}"
tls_key = "{certs / 'server.key'}"

[plugins]
cache_dir = "{folder / 'plugin-cache'}"

[features.cards]
path = "{ROOT / 'examples' / 'models' / 'fraud-check' / 'cards.csv'}"

[endpoints.fraud-check]
model = "fraud"
pre = {{ path = "{PLUGINS / 'fraud_features.wasm'}", config = '{{"table": "cards"}}' }}
post = {{ path = "{PLUGINS / 'threshold.wasm'}", config = '{{"output": "probabilities", "index": 1, "review": 0.5, "block": 0.9}}' }}

[endpoints.broken]
model = "fraud"
pre = {{ path = "{folder / 'missing.wasm'}" }}
"""
    )
    node = Node(ROOT / "examples" / "models", "--config", config, "--http3", "127.0.0.1:0")
    yield node
    node.stop()


@pytest.fixture
def h3(h3node, certs):
    with h3_session(h3node, certs / "ca.pem") as session:
        yield session


def fraud_case():
    reference = json.loads((ROOT / "examples" / "references" / "fraud.json").read_text())
    case = reference["cases"][0]
    return {"inputs": case["inputs"]}, case["outputs"][0]["data"]


def test_health_metadata_and_alt_svc(h3node, h3):
    for path in ["/v2/health/live", "/v2/health/ready", "/v2/models/fraud/ready"]:
        response = h3.get(h3_url(h3node, path))
        assert response.status_code == 200, path
        assert response.http_version == 30, "answered over HTTP/3"
    server = h3.get(h3_url(h3node, "/v2")).json()
    assert server["name"] == "meshserve"
    metadata = h3.get(h3_url(h3node, "/v2/models/fraud")).json()
    assert metadata["name"] == "fraud"
    assert metadata["inputs"][0]["name"] == "features"
    metrics = h3.get(h3_url(h3node, "/metrics")).text
    assert 'meshserve_connections_total{protocol="h3",outcome="accepted"} 1' in metrics
    # The TCP door tells HTTP/1.1 and HTTP/2 clients where HTTP/3 is.
    port = h3node.http3.rsplit(":", 1)[1]
    plain = niquests.get(f"http://{h3node.url}/v2/health/live")
    assert plain.headers["alt-svc"] == f'h3=":{port}"; ma=86400'
    # Inference takes its own path past the router, and says so too.
    body, _ = fraud_case()
    inferred = niquests.post(f"http://{h3node.url}/v2/models/fraud/infer", json=body)
    assert inferred.status_code == 200
    assert inferred.headers["alt-svc"] == f'h3=":{port}"; ma=86400'


def test_repository_over_http3(h3node, h3):
    index = h3.post(h3_url(h3node, "/v2/repository/index"), json={})
    assert index.status_code == 200
    assert "fraud" in {entry["name"] for entry in index.json()}
    # Admin operations from loopback (no token configured): unload, then load back.
    assert h3.post(h3_url(h3node, "/v2/repository/models/mixed/unload")).status_code == 200
    assert h3.get(h3_url(h3node, "/v2/models/mixed/ready")).status_code != 200
    assert h3.post(h3_url(h3node, "/v2/repository/models/mixed/load")).status_code == 200
    assert h3.get(h3_url(h3node, "/v2/models/mixed/ready")).status_code == 200


def test_json_inference_matches_onnxruntime(h3node, h3):
    body, expected = fraud_case()
    response = h3.post(h3_url(h3node, "/v2/models/fraud/infer"), json=body)
    assert response.status_code == 200, response.text
    assert response.http_version == 30
    assert response.headers["server-timing"].startswith("queue;dur=")
    np.testing.assert_allclose(response.json()["outputs"][0]["data"], expected, rtol=1e-5, atol=1e-6)


def test_one_mebibyte_binary_body_matches_onnxruntime(h3node, h3):
    rows = 512
    x = np.random.default_rng(3).standard_normal((rows, 512)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [{"name": "input", "shape": [rows, 512], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = header + x.tobytes()
    assert len(body) > 1024 * 1024
    response = h3.post(
        h3_url(h3node, "/v2/models/heavy/infer"),
        data=body,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    split = int(response.headers["inference-header-content-length"])
    answer = json.loads(response.content[:split])
    output = np.frombuffer(response.content[split:], dtype=np.float32).reshape(answer["outputs"][0]["shape"])
    session = onnxruntime.InferenceSession(str(ROOT / "examples" / "models" / "heavy" / "1" / "model.onnx"))
    (expected,) = session.run(None, {"input": x})
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5)


def test_endpoint_with_plugins(h3node, h3):
    transaction = {"card": "card-0003", "amount": 950.0, "hour": 3, "merchant_risk": 0.8, "foreign": True}
    response = h3.post(h3_url(h3node, "/v1/endpoints/fraud-check/invocations"), json=transaction)
    assert response.status_code == 200, response.text
    assert response.json()["decision"] in {"allow", "review", "block"}
    timing = response.headers["server-timing"]
    assert "pre;dur=" in timing and "post;dur=" in timing, timing


def slow_body(chunks, pause):
    for chunk in chunks:
        yield chunk
        time.sleep(pause)


def test_each_error_status(h3node, h3):
    body, _ = fraud_case()

    def error(response, status):
        assert response.status_code == status, (status, response.status_code, response.text)
        return response.json()["error"] if response.content else ""

    url = h3_url(h3node, "/v2/models/fraud/infer")
    assert "JSON" in error(h3.post(url, data=b"{not json", headers={"content-type": "application/json"}), 400)
    wrong = json.loads(json.dumps(body))
    wrong["inputs"][0]["shape"] = [1, 31]
    wrong["inputs"][0]["data"].pop()
    assert "shape" in error(h3.post(url, json=wrong), 400)
    assert "unknown model 'nope'" in error(h3.post(h3_url(h3node, "/v2/models/nope/infer"), json=body), 404)
    assert h3.get(url).status_code == 405
    assert "max_body_bytes" in error(h3.post(url, data=b"x" * (MAX_BODY + 1)), 413)
    late = dict(body, parameters={"timeout": 1})
    assert "it was not run" in error(h3.post(url, json=late), 504)
    assert "broken" in error(h3.post(h3_url(h3node, "/v1/endpoints/broken/invocations"), json=body), 503)
    slow = h3.post(url, data=slow_body([b'{"inputs": [', b"]}"], BODY_TIMEOUT_MS / 1000 + 1.0))
    assert "body_read_timeout_ms" in error(slow, 408)
    # A header section past max_header_bytes (64 KiB by default) is refused by HTTP/3 itself.
    big = {f"x-big-{i}": "a" * 1000 for i in range(80)}
    assert h3.get(h3_url(h3node, "/v2/health/live"), headers=big).status_code == 431
    # The node still serves after all of that.
    assert h3.post(url, json=body).status_code == 200


def test_64_concurrent_streams_share_one_connection(h3node, certs):
    body, expected = fraud_case()
    before = metric(h3node, "meshserve_connections_total", protocol="h3", outcome="accepted")
    with h3_session(h3node, certs / "ca.pem", multiplexed=True) as session:
        # Multiplexed: every request is sent before any answer is awaited.
        pending = [session.post(h3_url(h3node, "/v2/models/fraud/infer"), json=body) for _ in range(64)]
        session.gather()
        for response in pending:
            assert response.status_code == 200
            np.testing.assert_allclose(response.json()["outputs"][0]["data"], expected, rtol=1e-5, atol=1e-6)
    after = metric(h3node, "meshserve_connections_total", protocol="h3", outcome="accepted")
    assert after - before == 1


MASK = (1 << 64) - 1


def placement_score(model, node):
    """mesh/src/placement.rs `score`: FNV-1a over both names, then SplitMix64's finaliser."""
    value = 0xCBF29CE484222325
    for byte in model.encode() + b"\xff" + node.encode():
        value = ((value ^ byte) * 0x100000001B3) & MASK
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & MASK
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & MASK
    return value ^ (value >> 31)


def test_forwarded_request_names_the_replicas_http3_address_and_going_there_skips_the_hop(certs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    owner_models = tmp_path / "models"
    shutil.copytree(ROOT / "examples" / "models" / "fraud", owner_models / "fraud")
    # One replica, on the node placement picks for it: with two, the front would load fraud too.
    config = owner_models / "fraud" / "config.toml"
    config.write_text(config.read_text().replace("replicas = 2", "replicas = 1"))
    owner_name = max(["a", "b"], key=lambda name: (placement_score("fraud", name), [-ord(c) for c in name]))
    front_name = "b" if owner_name == "a" else "a"
    common = ["--certs", certs, "--http3", "127.0.0.1:0", "--http3-cert", certs / "server.pem", "--http3-key", certs / "server.key"]
    front = Node(empty, "--quic", "127.0.0.1:0", "--name", front_name, *common)
    owner = None
    try:
        owner = Node(owner_models, "--quic", "127.0.0.1:0", "--name", owner_name, "--seed", front.quic, *common)
        body, expected = fraud_case()
        with h3_session(front, certs / "ca.pem") as session:
            deadline = time.time() + 30
            while True:
                response = session.post(h3_url(front, "/v2/models/fraud/infer"), json=body)
                if response.status_code == 200 or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert response.status_code == 200, response.text
            assert response.headers["server-timing"].startswith("forward;dur="), "forwarded over the mesh"
            route = response.headers["meshserve-route"]
            h3_list = re.search(r"h3=([^;]+)", route).group(1).split(",")
            assert h3_list == [owner.http3], route
        np.testing.assert_allclose(response.json()["outputs"][0]["data"], expected, rtol=1e-5, atol=1e-6)

        forwarded = metric(front, "meshserve_forwarded_requests_total")
        from_mesh = metric(owner, "meshserve_mesh_served_requests_total")
        served = metric(owner, "meshserve_requests_total", model="fraud", status="200", protocol="h3")
        with h3_session(owner, certs / "ca.pem") as direct:
            response = direct.post(h3_url(owner, "/v2/models/fraud/infer"), json=body)
        assert response.status_code == 200
        assert "forward" not in response.headers["server-timing"]
        # Counted once, under the door it came by.
        assert metric(owner, "meshserve_requests_total", model="fraud", status="200", protocol="h3") == served + 1
        assert metric(owner, "meshserve_mesh_served_requests_total") == from_mesh, "no hop through the mesh"
        assert metric(front, "meshserve_forwarded_requests_total") == forwarded
    finally:
        front.stop()
        if owner:
            owner.stop()
