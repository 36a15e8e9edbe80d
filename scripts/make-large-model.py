"""Writes a large synthetic ONNX graph for memory measurements (never committed, never downloaded).

    .venv-export/bin/python scripts/make-large-model.py OUT_DIR [--mb 512] [--embedded]

OUT_DIR/model.onnx (+ OUT_DIR/model.onnx_data unless --embedded) holds about --mb megabytes of random float32
weights in the three kinds of layers a diffusion model has, so that what ONNX Runtime shares or copies can be
told apart by kind:

* `ids` int64 [n] -> Gather from an embedding [V, D] (like a text encoder's token table): 1/8 of the weights;
* -> MatMul + Add chain with [D, D] weights (attention and feed-forward projections): 5/8;
* `sample` float32 [1, C, 8, 8] -> 3x3 Conv chain with [C, C, 3, 3] weights (a U-Net's convolutions): 2/8.

Outputs `hidden` [n, D] and `out_sample` [1, C, 8, 8]. Needs only `onnx` and `numpy`.
"""

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D = 1024
C = 256


def weights(rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
    return ((rng.random(shape, dtype=np.float32) - 0.5) * scale).astype(np.float32)


def build(total_mb: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    budget = total_mb * 1024 * 1024 // 4  # floats
    vocab = max(16, budget // 8 // D)
    layers = max(1, (budget * 5 // 8) // (D * D))
    convs = max(1, (budget * 2 // 8) // (C * C * 9))
    inits = [numpy_helper.from_array(weights(rng, (vocab, D), 1.0), "embedding")]
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["h0"], name="gather")]
    for i in range(layers):
        inits.append(numpy_helper.from_array(weights(rng, (D, D), 2.0 / np.sqrt(D)), f"w{i}"))
        inits.append(numpy_helper.from_array(weights(rng, (D,), 0.1), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
        last = "hidden" if i == layers - 1 else f"h{i + 1}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [last], name=f"add{i}"))
    for i in range(convs):
        inits.append(numpy_helper.from_array(weights(rng, (C, C, 3, 3), 2.0 / np.sqrt(C * 9)), f"k{i}"))
        src = "sample" if i == 0 else f"c{i}"
        dst = "out_sample" if i == convs - 1 else f"c{i + 1}"
        nodes.append(helper.make_node("Conv", [src, f"k{i}"], [dst], pads=[1, 1, 1, 1], name=f"conv{i}"))
    graph = helper.make_graph(
        nodes,
        "large",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, C, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", D]),
            helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [1, C, 8, 8]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mb", type=int, default=512, help="megabytes of weights (about)")
    parser.add_argument("--embedded", action="store_true", help="one file, weights inside (must stay < 2 GB)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = build(args.mb)
    path = args.out_dir / "model.onnx"
    if args.embedded:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=0)
    size = sum(p.stat().st_size for p in args.out_dir.glob("model.onnx*"))
    print(f"{path}: {size / 1e6:.1f} MB in {'one file' if args.embedded else 'model.onnx + model.onnx_data'}")


if __name__ == "__main__":
    main()
