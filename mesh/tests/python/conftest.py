"""Starts a real meshserve node for the Python client tests."""

import os
import pathlib
import re
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _binary():
    path = os.environ.get("MESHSERVE_BIN", str(ROOT / "target" / "release" / "meshserve"))
    if not os.path.exists(path):
        pytest.fail(f"meshserve binary not found at {path}; build it with `cargo build --release -p meshserve`")
    return path


class Node:
    """A `meshserve serve` process on free loopback ports, killed by `stop`.

    `url` is its HTTP address; `http3` and `quic` its HTTP/3 and mesh addresses when it has them.
    """

    def __init__(self, repository, *args):
        self.process = subprocess.Popen(
            [_binary(), "serve", "--http", "127.0.0.1:0", "--model-repository", str(repository), *map(str, args)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "RUST_LOG": "info"},
        )
        self.log = []
        ready = threading.Event()
        self.url = None
        self.http3 = None
        self.quic = None

        def pump():
            for line in self.process.stderr:
                self.log.append(line)
                quic = re.search(r"mesh endpoint up.* quic=(\S+)", line)
                if quic:
                    self.quic = quic.group(1)
                match = re.search(r"address=https?://(\S+)", line)
                if match and "meshserve serving" in line:
                    self.url = match.group(1)
                    http3 = re.search(r"http3=(\d\S+)", line)
                    self.http3 = http3.group(1) if http3 else None
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(60):
            self.process.kill()
            pytest.fail("meshserve did not start:\n" + "".join(self.log))

    def stop(self):
        self.process.kill()
        self.process.wait()


def metric(node, name, **labels):
    """The sum of a metric's samples with these labels, read over HTTP/1.1."""
    with urllib.request.urlopen(f"http://{node.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def skip_endpoints(folder, names):
    """What `shutil.copytree` leaves out of a model repository: its endpoint folders."""
    return [n for n in names if (pathlib.Path(folder) / n / "endpoint.toml").is_file()]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    repository = tmp_path_factory.mktemp("models")
    # The models only: the endpoint folders beside them would compile every example plugin.
    shutil.copytree(ROOT / "examples" / "models", repository, dirs_exist_ok=True, ignore=skip_endpoints)
    node = Node(repository)
    yield node
    node.stop()


@pytest.fixture
def references():
    import json

    def load(model):
        return json.loads((ROOT / "examples" / "references" / f"{model}.json").read_text())

    return load
