"""Convert MediaPipe's selfie segmentation .tflite files to ``models/weights/*.safetensors``.

Reproduce (converter-only tools live in a throwaway venv, never in the project's):

    python3 -m venv /tmp/tfl
    /tmp/tfl/bin/pip install tflite ai-edge-litert safetensors scikit-image torch==2.13.0
    pip download --no-deps mediapipe==0.10.14 -d /tmp/mp && cd /tmp/mp && unzip -o mediapipe-*.whl \\
        'mediapipe/modules/selfie_segmentation/*'
    PYTHONPATH=. /tmp/tfl/bin/python tools/convert_selfie.py \\
        --tflite /tmp/mp/mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite \\
        --out models/weights/selfie.safetensors --fixture tests/data/selfie_reference.npz
    (same for selfie_segmentation_landscape.tflite → selfie_landscape.safetensors, 144×256)

What it does: walks the graph in operator order, takes the weights of every CONV_2D,
DEPTHWISE_CONV_2D and the custom ``Convolution2DTransposeBias`` (float16 behind DEQUANTIZE ops,
widened exactly to float32), transposes them to PyTorch layouts and pairs them one to one with
``models.selfie.conv_modules`` (checking every shape). With ``--fixture`` it also runs the
reference interpreter (ai-edge-litert) on a few real photographs from scikit-image and stores
inputs and reference probabilities, which ``tests/unit/test_models_selfie.py`` compares against.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from models.selfie import SelfieSegmenter, conv_modules

CONV, DEPTHWISE, TRANSPOSE = "conv", "depthwise", "transpose"


def read_convs(path: Path) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(kind, tensor name, weight, bias) for each convolution, in graph order, TFLite layouts."""
    import tflite

    buf = path.read_bytes()
    model = tflite.Model.GetRootAsModel(buf, 0)
    graph = model.Subgraphs(0)
    codes = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}

    def op_name(op) -> str:
        oc = model.OperatorCodes(op.OpcodeIndex())
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if code == tflite.BuiltinOperator.CUSTOM:
            return "CUSTOM:" + oc.CustomCode().decode()
        return codes[code]

    def raw(tensor_index: int) -> np.ndarray:
        t = graph.Tensors(tensor_index)
        dtype = {tflite.TensorType.FLOAT16: np.float16, tflite.TensorType.FLOAT32: np.float32}[t.Type()]
        data = model.Buffers(t.Buffer()).DataAsNumpy()
        return np.frombuffer(data.tobytes(), dtype=dtype).reshape(t.ShapeAsNumpy()).astype(np.float32)

    dequant_source: dict[int, int] = {}
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        if op_name(op) == "DEQUANTIZE":
            dequant_source[int(op.Outputs(0))] = int(op.Inputs(0))

    def const(tensor_index: int) -> np.ndarray:
        return raw(dequant_source.get(tensor_index, tensor_index))

    out: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        name = op_name(op)
        kind = {
            "CONV_2D": CONV,
            "DEPTHWISE_CONV_2D": DEPTHWISE,
            "CUSTOM:Convolution2DTransposeBias": TRANSPOSE,
        }.get(name)
        if kind is None:
            continue
        w_idx, b_idx = int(op.Inputs(1)), int(op.Inputs(2))
        if kind == TRANSPOSE:
            # 12-byte options: padding, stride_w, stride_h; the module assumes stride 2.
            _, sw, sh = np.frombuffer(op.CustomOptionsAsNumpy().tobytes(), dtype="<i4")
            if (sw, sh) != (2, 2):
                raise ValueError(f"transposed conv stride {(sh, sw)} != (2, 2)")
        out.append((kind, graph.Tensors(w_idx).Name().decode(), const(w_idx), const(b_idx)))
    return out


def to_torch_layout(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == CONV:  # [out, h, w, in] → [out, in, h, w]
        return w.transpose(0, 3, 1, 2)
    if kind == DEPTHWISE:  # [1, h, w, channels] → [channels, 1, h, w]
        return w.transpose(3, 0, 1, 2)
    return w.transpose(3, 0, 1, 2)  # transposed conv [out, h, w, in] → [in, out, h, w]


def convert(tflite_path: Path) -> dict[str, torch.Tensor]:
    model = SelfieSegmenter()
    modules = conv_modules(model)
    convs = read_convs(tflite_path)
    if len(convs) != len(modules):
        raise ValueError(f"{tflite_path}: {len(convs)} convolutions in the graph, module has {len(modules)}")
    names = {id(m): n for n, m in model.named_modules()}
    state: dict[str, torch.Tensor] = {}
    for (kind, tname, w, b), module in zip(convs, modules, strict=True):
        weight = torch.from_numpy(np.ascontiguousarray(to_torch_layout(kind, w)))
        if tuple(weight.shape) != tuple(module.weight.shape):
            raise ValueError(f"{tname}: shape {tuple(weight.shape)} != module {tuple(module.weight.shape)}")
        prefix = names[id(module)]
        state[f"{prefix}.weight"] = weight
        state[f"{prefix}.bias"] = torch.from_numpy(b.copy())
    model.load_state_dict(state, strict=True)
    return state


def parity_images(size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (public domain / CC0), resized to the model input."""
    from PIL import Image
    from skimage import data

    h, w = size
    images = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    return {k: np.asarray(Image.fromarray(v).resize((w, h), Image.BILINEAR)) for k, v in images.items()}


def reference_outputs(tflite_path: Path, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(tflite_path))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    result = {}
    for name, img in images.items():
        interp.set_tensor(inp["index"], (img.astype(np.float32) / 255.0)[None])
        interp.invoke()
        result[name] = interp.get_tensor(out["index"])[0, :, :, 0].copy()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tflite", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fixture", type=Path, help="also store reference outputs of the TFLite interpreter")
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    state = convert(args.tflite)
    digest = hashlib.sha256(args.tflite.read_bytes()).hexdigest()
    save_file(
        state,
        str(args.out),
        metadata={"source": args.tflite.name, "source_sha256": digest, "licence": "Apache-2.0 (MediaPipe)"},
    )
    n = sum(t.numel() for t in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {n} parameters (from {args.tflite.name} sha256 {digest})")

    if args.fixture:
        model = SelfieSegmenter().eval()
        model.load_state_dict(state)
        size = tuple(int(s) for s in model_input_size(args.tflite))
        images = parity_images(size)
        ref = reference_outputs(args.tflite, images)
        names = sorted(images)
        x = torch.from_numpy(np.stack([images[k] for k in names])).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            ours = torch.sigmoid(model(x))[:, 0].numpy()
        for i, k in enumerate(names):
            err = np.abs(ours[i] - ref[k])
            print(
                f"{k}: max abs err {err.max():.2e}, mean {err.mean():.2e}"
            )
        np.savez_compressed(
            args.fixture,
            names=np.array(names),
            images=np.stack([images[k] for k in names]),
            reference=np.stack([ref[k] for k in names]).astype(np.float16),
        )
        print(f"wrote {args.fixture}")
    return 0


def model_input_size(path: Path) -> tuple[int, int]:
    from ai_edge_litert.interpreter import Interpreter

    shape = Interpreter(model_path=str(path)).get_input_details()[0]["shape"]
    return int(shape[1]), int(shape[2])


if __name__ == "__main__":
    sys.exit(main())
