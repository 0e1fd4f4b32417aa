"""A meshserve post-processing plugin in Python, built with componentize-py for world `post`
of the same WIT as the Rust plugins (guest-sdk/wit/plugin.wit, meshserve:plugin@0.2.0).

Config (JSON): {"output": "probabilities", "labels": ["legit", "fraud"]}, parsed once per
instance in `init`. For each row of the output it answers the most likely label with every
label's probability: {"label": "fraud", "probabilities": {"legit": 0.1, "fraud": 0.9}}; several
rows answer a list.
"""

import json
import struct

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types


# componentize-py makes a new `Postprocess` object for every call, so what `init` parses lives
# at module level: one module per instance.
CONFIG = {"output": "probabilities", "labels": []}


def fail(status, message):
    raise Err(types.PluginError(status=status, message=message))


class Postprocess(exports.Postprocess):
    def init(self, config):
        try:
            parsed = json.loads(config or "{}")
        except ValueError as e:
            fail(500, f"labels: invalid config: {e}")
        CONFIG["output"] = parsed.get("output", "probabilities")
        CONFIG["labels"] = parsed.get("labels", [])

    def handle(self, context, outputs):
        name, labels = CONFIG["output"], CONFIG["labels"]
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
        reply = types.Reply(
            status=200,
            headers=[],
            content_type="application/json",
            body=json.dumps(answer).encode(),
        )
        return types.PostOutcome_Reply(reply)
