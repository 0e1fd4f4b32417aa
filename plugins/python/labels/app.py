"""A meshserve post-processing plugin in Python, built with componentize-py against the same
WIT world as the Rust plugins (guest-sdk/wit/plugin.wit).

Config (JSON): {"output": "probabilities", "labels": ["legit", "fraud"]}. For each row of the
output it answers the most likely label with every label's probability:
{"label": "fraud", "probabilities": {"legit": 0.1, "fraud": 0.9}}; several rows answer a list.
"""

import json
import struct

from componentize_py_types import Err
from wit_world import WitWorld as Protocol
from wit_world.imports import host, types


def fail(status, message):
    raise Err(types.PluginError(status=status, message=message))


class WitWorld(Protocol):
    def preprocess(self, request):
        fail(500, "labels only post-processes")

    def postprocess(self, context, outputs):
        try:
            config = json.loads(host.config() or "{}")
        except ValueError as e:
            fail(500, f"labels: invalid config: {e}")
        name = config.get("output", "probabilities")
        labels = config.get("labels", [])
        tensor = next((t for t in outputs if t.name == name), None)
        if tensor is None:
            fail(500, f"labels: the model has no output '{name}'")
        if tensor.datatype != types.Datatype.FP32:
            fail(500, f"labels: output '{name}' is not FP32")
        width = tensor.shape[-1] if tensor.shape else 1
        if width != len(labels):
            fail(500, f"labels: {len(labels)} labels configured, the model scores {width} classes")
        values = struct.unpack(f"<{len(tensor.data) // 4}f", tensor.data)
        rows = []
        for start in range(0, len(values), width):
            row = values[start:start + width]
            best = max(range(width), key=lambda i: row[i])
            rows.append({"label": labels[best], "probabilities": dict(zip(labels, row))})
        answer = rows[0] if len(rows) == 1 else rows
        host.log(host.LogLevel.DEBUG, f"labelled {len(rows)} rows")
        body = types.Body(content_type="application/json", data=json.dumps(answer).encode())
        return types.Answer_Body(body)
