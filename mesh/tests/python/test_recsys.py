"""examples/recsys end to end: a real node with the example's config, its two plugins and its
ranking model; every answer checked against onnxruntime run here on the same feature rows."""

import csv
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT, Node

EXAMPLE = ROOT / "examples" / "recsys"


def table(name, data=EXAMPLE / "data"):
    with open(data / f"{name}.csv", newline="") as f:
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


def expected(user, items, k, data=EXAMPLE / "data"):
    """The top k by onnxruntime itself, over the rows the plugin should have built."""
    users, catalogue = table("users", data), table("items", data)
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


def test_a_changed_item_table_is_picked_up_under_load_with_no_failed_request(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLE / "data", data)
    plugins = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"
    config = (EXAMPLE / "node.toml").read_text()
    config = config.replace('"data/', f'"{data}/').replace('"../../plugins/target/wasm32-wasip2/release/', f'"{plugins}/')
    config = config.replace('"../../target/plugin-cache"', f'"{tmp_path / "cache"}"')
    (tmp_path / "node.toml").write_text(config)
    node = Node(EXAMPLE / "models", "--config", tmp_path / "node.toml")
    try:
        items = [f"i{j:05d}" for j in range(20)]
        body = {"user": "u00017", "items": items}
        status, before = post(node, body, {"x-top-k": "20"})
        assert status == 200, before
        assert_ranking(before, expected("u00017", items, 20, data))

        statuses = []
        stop = threading.Event()

        def load():
            while not stop.is_set():
                statuses.append(post(node, body)[0])

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        # The catalogue changes under load: item i00003 gets new features. Written whole and
        # renamed into place, as a table export would be.
        lines = (data / "items.csv").read_text().splitlines()
        lines = [",".join(["i00003"] + ["2.0000"] * 8) if l.startswith("i00003,") else l for l in lines]
        staging = data / "items.csv.new"
        staging.write_text("\n".join(lines) + "\n")
        os.replace(staging, data / "items.csv")
        want = expected("u00017", items, 20, data)
        assert [i for i, _ in want] != [e["item"] for e in before["items"]], "the change must show"
        deadline = time.time() + 10
        while True:
            status, after = post(node, body, {"x-top-k": "20"})
            assert status == 200, after
            if [e["item"] for e in after["items"]] == [i for i, _ in want]:
                break
            assert time.time() < deadline, f"the new table was not picked up: {after}"
            time.sleep(0.1)
        assert_ranking(after, want)
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join()
        assert len(statuses) > 50, len(statuses)
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert any("feature table reloaded" in line for line in node.log), "".join(node.log[-20:])
    finally:
        node.stop()
