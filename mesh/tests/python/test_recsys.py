"""examples/recsys end to end: a real node with the example's config, its two plugins and its
ranking model; every answer checked against onnxruntime run here on the same feature rows."""

import csv
import json
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT, Node

EXAMPLE = ROOT / "examples" / "recsys"


def table(name):
    with open(EXAMPLE / "data" / f"{name}.csv", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        return {row[0]: np.array([float(v) for v in row[1:]], dtype=np.float32) for row in rows}


@pytest.fixture(scope="module")
def recsys():
    node = Node(EXAMPLE / "models", "--config", EXAMPLE / "node.toml")
    yield node
    node.stop()


def post(node, body, headers=None):
    request = urllib.request.Request(
        f"http://{node.url}/v1/endpoints/recommend/invocations",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def expected(user, items, k):
    """The top k by onnxruntime itself, over the rows the plugin should have built."""
    users, catalogue = table("users"), table("items")
    known = [i for i in items if i in catalogue]
    u = users.get(user, np.zeros(8, dtype=np.float32))
    session = ort.InferenceSession(str(EXAMPLE / "models" / "ranker" / "1" / "model.onnx"))
    scores, ids = session.run(
        ["score", "item_ids"],
        {
            "user": np.tile(u, (len(known), 1)),
            "item": np.stack([catalogue[i] for i in known]),
            "item_id": np.array(known, dtype=object),
        },
    )
    order = sorted(range(len(known)), key=lambda j: (-scores[j][0], j))[:k]
    return [(ids[j], float(scores[j][0])) for j in order]


def assert_ranking(answer, want):
    got = [(entry["item"], entry["score"]) for entry in answer["items"]]
    assert [i for i, _ in got] == [i for i, _ in want], (got, want)
    for (_, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-5, (got, want)


def test_the_top_k_matches_onnxruntime_on_the_same_features(recsys):
    rng = np.random.default_rng(7)
    items = [f"i{j:05d}" for j in rng.choice(2000, size=60, replace=False)] + ["i99999", "nope"]
    for user in ["u00017", "u00498"]:
        status, answer = post(recsys, {"user": user, "items": items})
        assert status == 200, answer
        assert len(answer["items"]) == 10
        assert_ranking(answer, expected(user, items, 10))
    # A user the table does not know ranks with zero features (cold start).
    status, answer = post(recsys, {"user": "newcomer", "items": items})
    assert status == 200, answer
    assert_ranking(answer, expected("newcomer", items, 10))


def test_the_client_picks_k_within_bounds(recsys):
    items = [f"i{j:05d}" for j in range(40)]
    status, answer = post(recsys, {"user": "u00001", "items": items}, {"x-top-k": "3"})
    assert status == 200, answer
    assert_ranking(answer, expected("u00001", items, 3))
    for bad in ["0", "101", "many"]:
        status, answer = post(recsys, {"user": "u00001", "items": items}, {"x-top-k": bad})
        assert status == 400 and "x-top-k" in answer["error"], (bad, answer)


def test_bad_requests_get_clear_errors(recsys):
    cases = [
        ({"user": "u00001", "items": []}, 400, "no candidate items"),
        ({"user": "u00001", "items": [f"i{j:05d}" for j in range(1001)]}, 400, "at most 1000"),
        ({"user": "u00001", "items": ["x", "y"]}, 422, "none of the candidate items"),
        ({"items": ["i00001"]}, 400, "malformed JSON body"),
    ]
    for body, status, message in cases:
        got, answer = post(recsys, body)
        assert got == status and message in answer["error"], (body, got, answer)
