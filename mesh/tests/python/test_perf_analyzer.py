"""Triton's perf_analyzer, unmodified (installed by scripts/setup.sh), measures a node over
HTTP and gRPC as it measures Triton: it reads the model's config, loads it, and reads the
node's statistics extension, whose server-side counts must agree with what the client sent."""

import re
import subprocess

import pytest

from conftest import ROOT

PERF_ANALYZER = ROOT / ".venv" / "bin" / "perf_analyzer"


def number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"no {pattern!r} in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_measures_the_node_with_its_server_statistics(node, protocol):
    run = subprocess.run(
        [
            PERF_ANALYZER, "-m", "fraud", "-u", node.url, "-i", protocol,
            "--concurrency-range", "4", "--measurement-interval", "500",
            # A noisy shared machine need not be stable to 10% for the run to count.
            "--stability-percentage", "100",
        ],
        capture_output=True, text=True, timeout=120,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert number(r"Concurrency: 4, throughput: ([\d.]+) infer/sec", out) > 100
    sent = number(r"Client: \s*Request count: (\d+)", out)
    served = number(r"Successful request count: (\d+)", out)
    # The node's statistics over the same window count what the client sent.
    assert abs(served - sent) <= 0.05 * sent, out
    assert number(r"Execution count: (\d+)", out) <= served
    assert number(r"compute infer (\d+) usec", out) > 0, out
