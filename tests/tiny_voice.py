"""A tiny piper voice built in code, for tests and the benchmark: random weights, real I/O.

No published piper voice is clean to rely on here (the one packaged on PyPI, en_US-joe-medium,
is fine-tuned from the lessac voice, whose dataset licence forbids redistribution), so this
builds one: an ONNX graph with piper's exact inputs (`input` phoneme ids [1, n] int64,
`input_lengths` [1] int64, `scales` [3] float: noise, length, noise_w) and output (`output`
audio [1, 1, 1, samples] float), and an .onnx.json with piper's own default espeak phoneme map.
Each phoneme id becomes 256 samples (one "hop") of a fixed random waveform, so a sentence
lasts as long as its phonemes do and sounds like band-limited noise, with word gaps quiet.
piper-tts phonemizes the text with its espeak-ng and runs this graph through onnxruntime,
exactly as for a real voice; only the sound is meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HOP = 256
RATE = 22_050


def build_tiny_voice(folder: Path, name: str = "tiny-voice", *, seed: int = 0) -> Path:
    """Write NAME.onnx and NAME.onnx.json into `folder`; returns the .onnx path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP

    symbols = 1 + max(i for ids in DEFAULT_PHONEME_ID_MAP.values() for i in ids)
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((symbols, HOP)) * 0.25).astype(np.float32)
    table[DEFAULT_PHONEME_ID_MAP[" "][0]] *= 0.01  # a space between words is near silence
    nodes = [
        helper.make_node("Gather", ["table", "input"], ["frames"], axis=0),  # [1, n, HOP]
        helper.make_node("Reshape", ["frames", "shape"], ["flat"]),  # [1, 1, 1, n * HOP]
        helper.make_node("Gather", ["scales", "one"], ["length_scale"], axis=0),
        helper.make_node("Mul", ["flat", "length_scale"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "storyreel-tiny-voice",
        inputs=[
            helper.make_tensor_value_info("input", TensorProto.INT64, [1, "phonemes"]),
            helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3]),
        ],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 1, "samples"])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([1, 1, 1, -1], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime 1.2x reads
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    config = {
        "audio": {"sample_rate": RATE, "quality": "x_low"},
        "espeak": {"voice": "en-us"},
        "language": {"code": "en_US"},
        "inference": {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8},
        "phoneme_type": "espeak",
        "phoneme_map": {},
        "phoneme_id_map": DEFAULT_PHONEME_ID_MAP,
        "num_symbols": symbols,
        "num_speakers": 1,
        "speaker_id_map": {},
        "piper_version": "1.0.0",
        "dataset": "storyreel-tiny-voice (random weights)",
    }
    Path(f"{path}.json").write_text(json.dumps(config, ensure_ascii=False), "utf-8")
    return path
