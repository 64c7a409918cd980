"""``clicktrain inspect FILE.onnx``: per-conv table and a check that each conv honours its patterns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ClicktrainError
from ..util import format_table
from .export import METADATA_KEY, decode_ids, decode_library


def _load(path: Path):
    import onnx
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ClicktrainError(f"{path} is not a readable ONNX model: {type(exc).__name__}: {exc}", original=exc) from None


def inspect_onnx(path: str | Path) -> tuple[str, bool]:
    """Returns (report text, every conv honours its declared patterns)."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    proto = _load(path)
    meta_raw = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
    meta = {e["node"]: e for e in json.loads(meta_raw)["layers"]} if meta_raw else {}
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    except Exception:  # noqa: BLE001 - FLOPs are optional
        shapes = {}
    rows, problems = [], []
    total_dense = total_pruned = 0
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        name = node.input[1]
        while name in aliases:
            name = aliases[name]
        w = weights.get(name)
        if w is None:
            problems.append(f"{node.name}: weight {node.input[1]} is not an initializer")
            continue
        o, c = w.shape[:2]
        nz_kernels = (w.reshape(o, c, -1) != 0).any(-1)
        entry = meta.get(node.name)
        status, patterns = "dense", "-"
        if entry and "library" in entry:
            library = decode_library(entry["library"])
            ids = decode_ids(entry["pattern_ids"], (o, c)).astype(np.int64)
            mask = library[np.clip(ids, 0, None)] & (ids >= 0)[..., None]
            outside = int(((w.reshape(o, c, 9) != 0) & ~mask).sum())
            if outside:
                problems.append(f"{node.name} ({entry['conv']}): {outside} non-zero weights outside the declared patterns")
            status = f"pattern k={entry['k']}" + (" VIOLATED" if outside else "")
            patterns = str(len(np.unique(ids[ids >= 0])))
        elif entry:
            status = f"dense ({entry.get('dense', '')})"
        out = shapes.get(node.output[0], [])
        hw = int(np.prod(out[2:])) if len(out) == 4 and all(out[2:]) else 0
        dense_flops = 2 * w.size * hw
        pruned_flops = 2 * int((w != 0).sum()) * hw
        total_dense += dense_flops
        total_pruned += pruned_flops
        rows.append([entry["conv"] if entry else node.name, "x".join(map(str, w.shape)), status,
                     f"{int(nz_kernels.sum())}/{o * c}", patterns, f"{(w != 0).mean():.3f}",
                     f"{dense_flops / 1e6:.2f}" if hw else "?", f"{pruned_flops / 1e6:.2f}" if hw else "?"])
    text = format_table(["conv", "weight", "status", "kept kernels", "patterns", "density", "MFLOPs dense", "MFLOPs kept"],
                        rows, title=f"{path}: {len(rows)} Conv nodes, pattern metadata: {'yes' if meta else 'no'}")
    if total_dense:
        text += f"\nconv FLOPs per sample: dense {total_dense / 1e6:.2f} M, non-zero weights only {total_pruned / 1e6:.2f} M " \
                f"({total_dense / max(1, total_pruned):.2f}x fewer)"
    if problems:
        text += "\nPROBLEMS:\n" + "\n".join(f"  {p}" for p in problems)
    else:
        text += "\nall convs honour their declared patterns"
    return text, not problems
