"""The ONNX frontend against onnxruntime: small models built with ``onnx.helper``, each loaded
with ``certfx.load`` and its canonical graph compared with onnxruntime on random inputs; and the
errors for bad files and unsupported models."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import certfx
from certfx import ops
from certfx.errors import (InvalidValueError, ModelLoadError, ShapeError, UnsupportedOpsError)
from certfx.frontends.onnx import onnx_source

RNG = np.random.default_rng(0)
Dim = int | str


# ---- building and checking models -----------------------------------------------------------

def w(*shape: int, name: str | None = None, scale: float = 0.5) -> onnx.TensorProto:
    """A random float32 initializer named ``name`` (default: a fresh name)."""
    w.count = getattr(w, "count", 0) + 1  # type: ignore[attr-defined]
    array = (RNG.standard_normal(shape) * scale).astype(np.float32)
    return numpy_helper.from_array(array, name or f"w{w.count}")  # type: ignore[attr-defined]


def i64(values: list[int], name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def model(nodes: list[onnx.NodeProto], shape: list[Dim], inits: list[onnx.TensorProto] = (),
          opset: int = 13, inputs: list[tuple[str, list[Dim]]] | None = None,
          outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    """A one-input model reading ``x`` and writing ``y``."""
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
           for n, s in (inputs or [("x", shape)])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    graph = helper.make_graph(nodes, "test", ins, outs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)  # fills in the output shapes it can
    del m.graph.value_info[:]
    for out in m.graph.output:
        if not out.type.tensor_type.HasField("shape"):  # e.g. after a computed Reshape
            _output_shape_from_onnxruntime(m, out)
    onnx.checker.check_model(m)
    return m


def _output_shape_from_onnxruntime(m: onnx.ModelProto, out: onnx.ValueInfoProto) -> None:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    x = np.zeros([d.dim_value or 1 for d in dims], np.float32)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    shape: list[Dim] = list(sess.run([out.name], {m.graph.input[0].name: x})[0].shape)
    if dims[0].dim_param:
        shape[0] = dims[0].dim_param
    out.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, shape))


def node(op: str, ins: list[str], outs: list[str], name: str | None = None,
         **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, ins, outs, name=name or f"{op}_{outs[0]}", **attrs)


def ort_run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check(m: onnx.ModelProto, low: float = -1.0, high: float = 1.0,
          atol: float = 1e-5, rtol: float = 1e-5) -> torch.fx.GraphModule:
    """Load ``m`` and compare the canonical graph with onnxruntime on batches of 1 and 3."""
    gm = certfx.load(m)
    shape = gm.meta["certfx.input_shape"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    batched = len(dims) == len(shape) + 1
    for batch in (1, 3):
        x = torch.empty(batch, *shape).uniform_(low, high)
        got = gm(x).detach()
        for i in range(batch):
            xi = x[i:i + 1].numpy() if batched else x[i].numpy()
            want = torch.from_numpy(ort_run(m, xi))
            torch.testing.assert_close(got[i:i + 1] if batched else got[i], want,
                                       atol=atol, rtol=rtol)
        if batched and dims[0].dim_param:  # a symbolic batch: onnxruntime takes all at once
            want = torch.from_numpy(ort_run(m, x.numpy()))
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return gm


def core_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]


# ---- one model per op -------------------------------------------------------------------------

def _gemm_linear() -> onnx.ModelProto:  # constant weights: onnx2torch makes an nn.Linear
    return model([node("Gemm", ["x", "W", "C"], ["y"], transB=1)], ["N", 4],
                 [w(3, 4, name="W"), w(3, name="C")])


def _gemm_general() -> onnx.ModelProto:  # 2-D bias, alpha/beta: onnx2torch's OnnxGemm
    return model([node("Gemm", ["x", "W", "C"], ["y"], alpha=0.5, beta=2.0)], [1, 4],
                 [w(4, 3, name="W"), w(1, 3, name="C")])


def _gemm_constant_node() -> onnx.ModelProto:  # weight from a Constant node, transA on constant
    return model([node("Constant", [], ["W"], value=w(3, 4, name="Wc")),
                  node("Gemm", ["x", "W"], ["y"], transB=1)], ["N", 4])


def _gemm_weight_first() -> onnx.ModelProto:  # W @ x on an unbatched (4, 2) input
    return model([node("Gemm", ["W", "x", "C"], ["y"], transA=1)], [4, 2],
                 [w(4, 3, name="W"), w(3, 1, name="C")])


def _matmul_add() -> onnx.ModelProto:
    return model([node("MatMul", ["x", "W"], ["h"]), node("Add", ["h", "b"], ["y"])], ["N", 4],
                 [w(4, 3, name="W"), w(3, name="b")])


def _matmul_3d() -> onnx.ModelProto:
    return model([node("MatMul", ["x", "W"], ["y"])], ["N", 2, 4], [w(4, 3, name="W")])


def _matmul_stack() -> onnx.ModelProto:
    return model([node("MatMul", ["x", "W"], ["y"])], [1, 2, 3, 4], [w(2, 4, 5, name="W")])


def _matmul_weight_first() -> onnx.ModelProto:
    return model([node("MatMul", ["W", "x"], ["y"])], [1, 4, 2], [w(3, 4, name="W")])


def _matmul_unbatched() -> onnx.ModelProto:  # like vnncomp test_tiny: W @ x on an input [4]
    return model([node("MatMul", ["W", "x"], ["h"]), node("Add", ["h", "b"], ["r"]),
                  node("Relu", ["r"], ["y"])], [4], [w(3, 4, name="W"), w(3, name="b")])


def _matmul_fixed_rows() -> onnx.ModelProto:  # dim 0 fixed at 2: one unbatched example
    return model([node("MatMul", ["x", "W"], ["h"]), node("Add", ["h", "b"], ["y"])], [2, 4],
                 [w(4, 3, name="W"), w(2, 3, name="b")])


def _conv() -> onnx.ModelProto:
    return model([node("Conv", ["x", "W", "B"], ["y"], strides=[2, 1], pads=[1, 2, 1, 2],
                       dilations=[2, 1], group=2)], ["N", 4, 9, 8],
                 [w(6, 2, 3, 3, name="W"), w(6, name="B")])


def _conv_asymmetric() -> onnx.ModelProto:  # onnx2torch: Sequential(pad, conv)
    return model([node("Conv", ["x", "W"], ["y"], pads=[0, 1, 2, 0])], [1, 2, 6, 6],
                 [w(3, 2, 3, 3, name="W")])


def _conv_bn() -> onnx.ModelProto:
    var = numpy_helper.from_array(RNG.uniform(0.5, 2.0, 3).astype(np.float32), "var")
    return model([node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
                  node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["y"], epsilon=1e-3)],
                 ["N", 2, 5, 5], [w(3, 2, 3, 3, name="W"), w(3, name="B"), w(3, name="g"),
                                  w(3, name="be"), w(3, name="mu"), var])


def _batch_norm_alone() -> onnx.ModelProto:
    var = numpy_helper.from_array(RNG.uniform(0.5, 2.0, 3).astype(np.float32), "var")
    return model([node("BatchNormalization", ["x", "g", "be", "mu", "var"], ["y"])],
                 ["N", 3, 4, 4], [w(3, name="g"), w(3, name="be"), w(3, name="mu"), var])


def _activations() -> onnx.ModelProto:
    return model([node("Relu", ["x"], ["a"]), node("LeakyRelu", ["x"], ["b"], alpha=0.2),
                  node("Sigmoid", ["x"], ["c"]), node("Tanh", ["x"], ["d"]),
                  node("Clip", ["x", "lo", "hi"], ["e"]), node("Clip", ["x", "zero"], ["f"]),
                  node("Concat", ["a", "b", "c", "d", "e", "f"], ["y"], axis=1)], ["N", 3],
                 [numpy_helper.from_array(np.array(-0.3, np.float32), "lo"),
                  numpy_helper.from_array(np.array(0.4, np.float32), "hi"),
                  numpy_helper.from_array(np.array(0.0, np.float32), "zero")])


def _arithmetic() -> onnx.ModelProto:  # Add/Sub/Mul/Div by constants, Add of two tensors, Neg
    return model([node("Add", ["x", "c1"], ["a"]), node("Sub", ["c2", "a"], ["b"]),
                  node("Mul", ["b", "c3"], ["c"]), node("Div", ["c", "c4"], ["d"]),
                  node("Sub", ["d", "c1"], ["e"]), node("Mul", ["c3", "e"], ["f"]),
                  node("Relu", ["f"], ["g"]), node("Neg", ["f"], ["h"]),
                  node("Add", ["g", "h"], ["i"]), node("Sub", ["i", "x"], ["y"])],
                 ["N", 2, 3], [w(3, name="c1"), w(2, 1, name="c2"), w(1, 2, 3, name="c3"),
                               numpy_helper.from_array(np.array([2.0, -4.0, 0.5], np.float32),
                                                       "c4")])


def _normalize_conv() -> onnx.ModelProto:  # (x - mean) / std as in ERAN models
    mean = numpy_helper.from_array(np.array([0.4, 0.5, 0.6], np.float32).reshape(1, 3, 1, 1),
                                   "mean")
    std = numpy_helper.from_array(np.array([0.2, 0.25, 0.3], np.float32).reshape(1, 3, 1, 1),
                                  "std")
    return model([node("Sub", ["x", "mean"], ["s"]), node("Div", ["s", "std"], ["d"]),
                  node("Conv", ["d", "W"], ["c"]), node("Relu", ["c"], ["r"]),
                  node("Flatten", ["r"], ["f"]), node("Gemm", ["f", "V"], ["y"], transB=1)],
                 [1, 3, 6, 6], [mean, std, w(2, 3, 3, 3, name="W"), w(5, 32, name="V")])


def _reshape_flatten_transpose() -> onnx.ModelProto:
    return model([node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                  node("Reshape", ["t", "s1"], ["r"]), node("Flatten", ["r"], ["f"], axis=2),
                  node("Flatten", ["f"], ["y"])], ["N", 2, 3, 4], [i64([0, 1, 6, 4], "s1")])


def _concat_slice() -> onnx.ModelProto:
    return model([node("Relu", ["x"], ["r"]), node("Concat", ["x", "r"], ["c"], axis=1),
                  node("Slice", ["c", "st", "en", "ax", "sp"], ["s"]),
                  node("Concat", ["k", "s", "k"], ["y"], axis=-1)], [1, 2, 5],
                 [i64([1, -4], "st"), i64([4, 100], "en"), i64([1, 2], "ax"),
                  i64([2, 1], "sp"), w(1, 2, 2, name="k")])


def _pad() -> onnx.ModelProto:
    value = numpy_helper.from_array(np.array(0.5, np.float32), "v")
    return model([node("Pad", ["x", "p", "v"], ["y"])], ["N", 2, 3, 3],
                 [i64([0, 0, 1, 2, 0, 0, 2, 1], "p"), value])


def _pools() -> onnx.ModelProto:
    return model([node("AveragePool", ["x"], ["a"], kernel_shape=[3, 3], strides=[2, 2],
                       pads=[1, 1, 1, 1]),
                  node("AveragePool", ["x"], ["b"], kernel_shape=[3, 3], strides=[2, 2],
                       pads=[1, 1, 1, 1], count_include_pad=1),
                  node("MaxPool", ["x"], ["c"], kernel_shape=[3, 3], strides=[2, 2],
                       pads=[1, 1, 1, 1]),
                  node("Concat", ["a", "b", "c"], ["y"], axis=1)], ["N", 2, 6, 6])


def _reductions() -> onnx.ModelProto:
    return model([node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=1),
                  node("ReduceSum", ["x", "ax"], ["s"], keepdims=1),
                  node("GlobalAveragePool", ["x"], ["g"]),
                  node("Add", ["m", "s"], ["a"]), node("Add", ["a", "g"], ["y"])],
                 ["N", 2, 3, 4], [i64([2, 3], "ax")])


def _reduce_sum_squeeze() -> onnx.ModelProto:
    return model([node("ReduceSum", ["x", "ax"], ["s"], keepdims=0),
                  node("Unsqueeze", ["s", "ua"], ["u"]), node("Squeeze", ["u", "ua"], ["y"])],
                 ["N", 2, 3], [i64([1], "ax"), i64([2], "ua")])


def _identity_dropout_cast() -> onnx.ModelProto:
    return model([node("Identity", ["x"], ["a"]), node("Dropout", ["a"], ["b"]),
                  node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)], ["N", 3])


def _dropout_mask_clip6() -> onnx.ModelProto:  # Dropout with a mask output; Clip-6 attributes
    return model([node("Dropout", ["x"], ["d", "mask"]),
                  node("Clip", ["d"], ["y"], min=-0.5, max=0.25)], ["N", 3], opset=10)


def _old_opset() -> onnx.ModelProto:  # Flatten-1 and Dropout-7: upgraded before conversion
    return model([node("Sub", ["x", "m"], ["s"]), node("Flatten", ["s"], ["f"]),
                  node("Dropout", ["f"], ["d"]), node("MatMul", ["d", "W"], ["y"])],
                 [1, 1, 1, 5], [w(5, name="m"), w(5, 3, name="W")], opset=8)


def _shape_arithmetic() -> onnx.ModelProto:  # torch-style flatten: x.view(x.size(0), -1)
    return model([node("Shape", ["x"], ["sh"]), node("Gather", ["sh", "zero"], ["n"], axis=0),
                  node("Unsqueeze", ["n", "ax0"], ["nu"]),
                  node("Concat", ["nu", "minus1"], ["target"], axis=0),
                  node("Reshape", ["x", "target"], ["y"])], ["N", 2, 3],
                 [numpy_helper.from_array(np.array(0, np.int64), "zero"), i64([0], "ax0"),
                  i64([-1], "minus1")])


def _expand_constant_of_shape() -> onnx.ModelProto:  # shape arithmetic feeding a constant
    half = helper.make_tensor("half", TensorProto.FLOAT, [1], [0.5])
    return model([node("Shape", ["x"], ["sh"]), node("ConstantOfShape", ["sh"], ["c"], value=half),
                  node("Add", ["x", "c"], ["a"]), node("Expand", ["a", "one3"], ["y"])],
                 ["N", 3], [i64([1, 3], "one3")])


def _gather() -> onnx.ModelProto:
    return model([node("Gather", ["x", "i"], ["a"], axis=1),
                  node("Gather", ["x", "j"], ["b"], axis=2),
                  node("Flatten", ["a"], ["fa"]), node("Flatten", ["b"], ["fb"]),
                  node("Concat", ["fa", "fb"], ["y"], axis=1)], ["N", 3, 4],
                 [numpy_helper.from_array(np.array(-1, np.int64), "i"), i64([0, 2], "j")])


def _reduce_mean_opset18() -> onnx.ModelProto:  # axes as an input (opset 18)
    return model([node("ReduceMean", ["x", "ax"], ["y"], keepdims=0)], ["N", 2, 3],
                 [i64([2], "ax")], opset=18)


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    f.__name__.lstrip("_"): f for f in [
        _gemm_linear, _gemm_general, _gemm_constant_node, _gemm_weight_first, _matmul_add,
        _matmul_3d, _matmul_stack, _matmul_weight_first, _matmul_unbatched, _matmul_fixed_rows,
        _conv, _conv_asymmetric, _conv_bn, _batch_norm_alone, _activations, _arithmetic,
        _normalize_conv, _reshape_flatten_transpose, _concat_slice, _pad, _pools, _reductions,
        _reduce_sum_squeeze, _identity_dropout_cast, _dropout_mask_clip6, _old_opset,
        _shape_arithmetic, _expand_constant_of_shape, _gather, _reduce_mean_opset18]}


# onnx2torch's Slice indexes with a list of slices, which torch deprecates (still correct).
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_onnxruntime(name: str) -> None:
    check(MODELS[name]())


def test_matmul_add_is_one_linear() -> None:
    gm = check(_matmul_add())
    assert core_ops(gm) == ["linear"]


def test_batch_norm_is_folded_into_conv() -> None:
    assert core_ops(check(_conv_bn())) == ["conv"]
    assert core_ops(check(_batch_norm_alone())) == ["batch_norm"]


def test_unbatched_input_gets_a_batch_dim() -> None:
    gm = check(_matmul_unbatched())
    assert gm.meta["certfx.input_shape"] == (4,)
    assert gm.meta["certfx.output_shape"] == (3,)
    gm = check(_matmul_fixed_rows())
    assert gm.meta["certfx.input_shape"] == (2, 4)


def test_source_has_frozen_weights_and_onnx_names(tmp_path: Path) -> None:
    path = tmp_path / "net.onnx"
    onnx.save(_conv_bn(), str(path))
    source, example, batched, name = onnx_source(path)
    assert (tuple(example.shape), batched, name) == ((1, 2, 5, 5), True, "net.onnx")
    assert all(not p.requires_grad for p in source.parameters())
    where = [n.meta["certfx.source"] for n in source.graph.nodes if n.op == "call_module"]
    assert where == ["ONNX node 'Conv_c' (Conv)", "ONNX node 'BatchNormalization_y' "
                     "(BatchNormalization)"]
    check(onnx.load(str(path)))
    torch.testing.assert_close(certfx.load(path)(example), certfx.load(str(path))(example))


def test_canonical_nodes_name_their_onnx_node() -> None:
    gm = certfx.load(_matmul_add())
    (linear,) = [n for n in gm.graph.nodes if n.target is ops.linear]
    assert linear.meta["certfx.source"] == ("ONNX node 'MatMul_h' (MatMul) + "
                                            "ONNX node 'Add_y' (Add)")


def test_torch_exported_model() -> None:
    """A model from ``torch.onnx.export`` (the TorchScript exporter, which works offline)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(16, 5)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (torch.zeros(1, 3, 4, 4),), buffer, dynamo=False,
                              input_names=["x"], dynamic_axes={"x": {0: "N"}})
        except Exception as err:  # pragma: no cover - depends on the torch build
            pytest.skip(f"torch.onnx.export is unavailable: {err}")
    m = onnx.load_from_string(buffer.getvalue())
    gm = check(m)
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(gm(x), net(x), atol=1e-5, rtol=1e-5)


# ---- errors -----------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        certfx.load(tmp_path / "nope.onnx")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        certfx.load(path)


def test_invalid_model() -> None:
    m = _matmul_add()
    m.graph.node[0].input[1] = "missing"
    with pytest.raises(ModelLoadError, match="check_model"):
        certfx.load(m)


def test_two_inputs() -> None:
    m = model([node("Add", ["x", "z"], ["y"])], [], inputs=[("x", [1, 3]), ("z", [1, 3])])
    with pytest.raises(ModelLoadError, match=r"2 inputs \('x', 'z'\).*exactly one input"):
        certfx.load(m)


def test_two_outputs() -> None:
    m = model([node("Relu", ["x"], ["y"]), node("Neg", ["x"], ["z"])], [1, 3],
              outputs=("y", "z"))
    with pytest.raises(ModelLoadError, match=r"2 outputs \('y', 'z'\)"):
        certfx.load(m)


def test_dynamic_spatial_dims() -> None:
    m = model([node("Relu", ["x"], ["y"])], ["N", 3, "H", "W"])
    with pytest.raises(ShapeError, match=r"dynamic spatial dims \[2, 3\]; fix the shape"):
        certfx.load(m)


def test_unsupported_ops_are_listed_together() -> None:
    m = model([node("Sqrt", ["x"], ["a"], name="sq"), node("Abs", ["a"], ["b"], name="ab"),
               node("Relu", ["b"], ["y"])], ["N", 4])
    with pytest.raises(UnsupportedOpsError) as info:
        certfx.load(m)
    assert len(info.value.ops) == 2
    text = str(info.value)
    assert "ONNX node 'sq' (Sqrt)" in text and "ONNX node 'ab' (Abs)" in text


def test_ops_without_converter_are_listed_together() -> None:
    m = model([node("Sinh", ["x"], ["a"], name="s1"), node("Cosh", ["a"], ["y"], name="c1")],
              ["N", 4])
    with pytest.raises(UnsupportedOpsError) as info:
        certfx.load(m)
    assert [o.where for o in info.value.ops] == ["ONNX node 's1' (Sinh)", "ONNX node 'c1' (Cosh)"]


def test_matmul_of_perturbed_tensors_is_unsupported() -> None:
    """Mul of two perturbed tensors is an elementwise ``product``; MatMul of two is not."""
    m = model([node("MatMul", ["x", "x"], ["y"], name="mm")], ["N", 4, 4])
    with pytest.raises(UnsupportedOpsError, match="ONNX node 'mm' \\(MatMul\\)"):
        certfx.load(m)


def test_used_dropout_mask_is_unsupported() -> None:
    m = model([node("Dropout", ["x"], ["d", "mask"], name="drop"),
               node("Cast", ["mask"], ["y"], to=TensorProto.FLOAT)], ["N", 3], opset=10)
    with pytest.raises(UnsupportedOpsError, match="ONNX node 'drop' \\(Dropout\\).*'mask'"):
        certfx.load(m)


def test_asymmetric_max_pool_padding_is_unsupported() -> None:
    m = model([node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1])],
              [1, 1, 4, 4])
    with pytest.raises(UnsupportedOpsError, match="asymmetric max-pool padding"):
        certfx.load(m)


def test_conv_on_unbatched_input_is_unsupported() -> None:
    m = model([node("Conv", ["x", "W"], ["y"], name="conv")], [2, 1, 4, 4],
              [w(1, 1, 3, 3, name="W")])
    with pytest.raises(UnsupportedOpsError, match="ONNX node 'conv' \\(Conv\\).*no batch dim"):
        certfx.load(m)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_initializer(bad: float) -> None:
    weight = RNG.standard_normal((4, 3)).astype(np.float32)
    weight[1, 2] = bad
    m = model([node("MatMul", ["x", "W"], ["y"])], ["N", 4],
              [numpy_helper.from_array(weight, "W")])
    with pytest.raises(InvalidValueError, match="initializer 'W'"):
        certfx.load(m)


def test_non_finite_constant_node() -> None:
    m = model([node("Constant", [], ["c"], name="k", value_float=float("nan")),
               node("Add", ["x", "c"], ["y"])], ["N", 3])
    with pytest.raises(InvalidValueError, match="Constant node 'k' contains NaN"):
        certfx.load(m)


def test_non_float_input() -> None:
    graph = helper.make_graph([node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "int",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ModelLoadError, match="floating-point input"):
        certfx.load(m)
