"""The op table stays in sync with torch.

* Every autograd node type produced by real small models (torchvision VGG-11, ResNet-18, a tiny
  VisionTransformer; tiny HF BERT, GPT-2 and Llama with grouped-query attention, each with ``sdpa`` and ``eager``
  attention) has an explicit entry in ``dynamiclrp.ops.OPS``, so that a torch rename fails loudly here.
* ``dynamiclrp.explain`` runs on each of these models for every preset that applies and gives finite relevance of
  the right shape.
* Every torch-private saved attribute an op entry reads exists on real nodes of that type (through
  ``dynamiclrp.ops.saved``, which raises ``TorchInternalsError`` for a missing one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp.ops import OPS, saved
from dynamiclrp.ops.attention import ATTENTION_OPS
from dynamiclrp.ops.elementwise import ELEMENTWISE_OPS
from dynamiclrp.ops.index import INDEX_OPS
from dynamiclrp.ops.leaf import LEAF_OPS
from dynamiclrp.ops.linear import MATMUL_OPS
from dynamiclrp.ops.norm import NORM_OPS
from dynamiclrp.ops.reduce import REDUCE_OPS
from dynamiclrp.ops.resample import RESAMPLE_OPS
from dynamiclrp.ops.shape import SHAPE_OPS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

# the built-in table, as shipped (OPS itself may gain entries from register_op in other tests)
BUILTIN = {**ELEMENTWISE_OPS, **MATMUL_OPS, **REDUCE_OPS, **SHAPE_OPS, **NORM_OPS, **ATTENTION_OPS, **LEAF_OPS,
           **RESAMPLE_OPS, **INDEX_OPS}
OPS_DIR = Path(dynamiclrp.ops.__file__).parent

VISION_PRESETS = ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1", "paper"]
TEXT_PRESETS = ["epsilon", "attnlrp", "cp_lrp", "paper"]


def node_kinds(*outputs: torch.Tensor) -> set[str]:
    """Type names of every autograd node below ``outputs`` (read independently of dynamiclrp)."""
    kinds, seen = set(), set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        kinds.add(type(fn).__name__)
        stack.extend(c for c, _ in fn.next_functions if c is not None)
    return kinds


def find_node(t: torch.Tensor, kind: str):
    """The first node of type ``kind`` below ``t`` (breadth first)."""
    seen, queue = set(), [t.grad_fn]
    while queue:
        fn = queue.pop(0)
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == kind:
            return fn
        queue.extend(c for c, _ in fn.next_functions)
    raise AssertionError(f"no {kind} node below {type(t.grad_fn).__name__}")


# ----------------------------------------------------------------------------------------------------------
# real models


def _vit():
    from torchvision.models import VisionTransformer

    m = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    torch.nn.init.normal_(m.heads.head.weight)  # torchvision zero-initialises the head: all logits would be 0
    return m


VISION = {
    "vgg11": (lambda: torchvision.models.vgg11(weights=None, num_classes=10), (1, 3, 64, 64)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (1, 3, 64, 64)),
    "vit": (_vit, (1, 3, 32, 32)),
}


def _text_model(name: str, impl: str):
    t = transformers
    if name == "bert":
        cfg = t.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
        cls = t.BertForSequenceClassification
    elif name == "gpt2":
        cfg = t.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        cls = t.GPT2LMHeadModel
    else:
        cfg = t.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        cls = t.LlamaForCausalLM
    return cls._from_config(cfg, attn_implementation=impl).eval()


TEXT = [(n, impl) for n in ("bert", "gpt2", "llama") for impl in ("sdpa", "eager")]


def _text_output(name):
    return None if name == "bert" else (lambda o: o.logits[:, -1])


@pytest.fixture(scope="module")
def vision_models():
    torch.manual_seed(0)
    return {name: build().eval() for name, (build, _) in VISION.items()}


@pytest.fixture(scope="module")
def text_models():
    torch.manual_seed(0)
    return {key: _text_model(*key) for key in TEXT}


def _ids(batch=2, seq=6):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def _kinds_of_vision(model, shape):
    x = torch.randn(*shape, requires_grad=True)
    return node_kinds(model(x))


def _kinds_of_text(model, name):
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)  # as explain does: biases and weights appear in the graph
        out = model(input_ids=_ids())
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    logits = out.logits if name == "bert" else out.logits[:, -1]
    return node_kinds(logits)


def _assert_all_known(kinds: set[str]):
    missing = sorted(k for k in kinds if k not in OPS)
    assert not missing, f"node types without an op entry: {missing}"
    fallbacks = sorted(k for k in kinds if OPS[k].fallback)
    assert not fallbacks, f"node types handled only by a fallback: {fallbacks}"


@pytest.mark.parametrize("name", list(VISION))
def test_vision_model_node_types_have_entries(vision_models, name):
    kinds = _kinds_of_vision(vision_models[name], VISION[name][1])
    assert {"ConvolutionBackward0", "AddmmBackward0", "AccumulateGrad"} <= kinds
    _assert_all_known(kinds)


@pytest.mark.parametrize("name, impl", TEXT)
def test_text_model_node_types_have_entries(text_models, name, impl):
    kinds = _kinds_of_text(text_models[(name, impl)], name)
    assert "EmbeddingBackward0" in kinds
    fused = any(k.startswith("ScaledDotProduct") for k in kinds)
    assert fused == (impl == "sdpa"), sorted(kinds)  # eager attention is written out (matmul + softmax)
    if impl == "eager":
        assert kinds & {"SoftmaxBackward0", "SafeSoftmaxBackward0"}
    _assert_all_known(kinds)


def test_known_node_types_include_all_of_these_models_together(vision_models, text_models):
    """The union over all models, as one list (a torch upgrade that renames several shows them all at once)."""
    kinds = set()
    for name, model in vision_models.items():
        kinds |= _kinds_of_vision(model, VISION[name][1])
    for (name, _), model in text_models.items():
        kinds |= _kinds_of_text(model, name)
    _assert_all_known(kinds)
    assert len(kinds) >= 30


@pytest.mark.parametrize("preset", VISION_PRESETS)
@pytest.mark.parametrize("name", list(VISION))
def test_explain_vision(vision_models, name, preset):
    model, shape = vision_models[name], VISION[name][1]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    flags = [p.requires_grad for p in model.parameters()]
    att = dynamiclrp.explain(model, x, preset=preset)
    assert [p.requires_grad for p in model.parameters()] == flags  # the model is left as it was
    (rx,) = att.inputs
    assert rx.shape == x.shape
    assert torch.isfinite(rx).all()
    assert rx.abs().sum() > 0
    assert att.stats.nodes > 10 and att.stats.rules_run > 0
    assert not att.approximations, att.approximations
    assert att.total_seed() != 0


@pytest.mark.parametrize("preset", TEXT_PRESETS)
@pytest.mark.parametrize("name, impl", TEXT)
def test_explain_text(text_models, name, impl, preset):
    model = text_models[(name, impl)]
    ids = _ids()
    att = dynamiclrp.explain(model, {"input_ids": ids}, preset=preset, output=_text_output(name))
    assert att.inputs == []  # no floating-point input: relevance per token instead
    assert att.tokens is not None
    assert att.tokens.shape == ids.shape
    assert torch.isfinite(att.tokens).all()
    assert att.tokens.abs().sum() > 0
    assert att.outputs[0].shape == ((2, 2) if name == "bert" else (2, 128))


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_explain_text_sdpa_and_eager_agree(text_models, name, preset, padded):
    """The same weights with fused (split by the op table) and written-out attention give the same explanation.

    With padding (an attention mask autograd does not record), tokens nobody attends to get no relevance.
    """
    ids = _ids()
    inputs = {"input_ids": ids}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 3:5] = 0  # positions 3 and 4 of row 1 are padding (the explained last position is not)
        inputs["attention_mask"] = mask
    fused, eager = text_models[(name, "sdpa")], text_models[(name, "eager")]
    eager.load_state_dict(fused.state_dict())
    a = dynamiclrp.explain(fused, inputs, preset=preset, output=_text_output(name))
    b = dynamiclrp.explain(eager, inputs, preset=preset, output=_text_output(name))
    torch.testing.assert_close(a.outputs[0], b.outputs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-3, atol=1e-5)
    assert a.tokens.abs().sum() > 0
    if padded:
        assert (a.tokens[1, 3:5] == 0).all() and (b.tokens[1, 3:5] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# torch-private saved attributes


def _t(*shape, positive=False):
    t = torch.rand(*shape, dtype=torch.float64) + 0.5 if positive else torch.randn(*shape, dtype=torch.float64)
    return t.requires_grad_(True)


def _p(*shape):
    return torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))


def _bn():
    bn = torch.nn.BatchNorm2d(2).double().eval()
    return bn(_t(1, 2, 3, 3))


# kind -> (builder of a tensor with a node of that kind below it, saved names the op entry reads)
SAVED = {
    "AddBackward0": (lambda: _t(2, 3) + _t(2, 3), ["alpha"]),
    "SubBackward0": (lambda: _t(2, 3) - _t(2, 3), ["alpha"]),
    "RsubBackward0": (lambda: torch.rsub(_t(2, 3), _t(2, 3)), ["alpha"]),
    "MulBackward0": (lambda: _t(2, 3) * _t(2, 3), ["self", "other"]),
    "AddcmulBackward0": (lambda: torch.addcmul(_t(2, 3), _t(2, 3), _t(2, 3), value=0.5),
                         ["value", "tensor1", "tensor2"]),
    "DivBackward0": (lambda: _t(2, 3) / _t(2, 3), ["self", "other"]),
    "AddBackward1": (lambda: torch.ops.aten.add.Scalar(_t(2, 3), 2.0), []),
    "SubBackward1": (lambda: torch.ops.aten.sub.Scalar(_t(2, 3), 2.0), []),
    "RsubBackward1": (lambda: 1.0 - _t(2, 3), []),
    "MulBackward1": (lambda: torch.ops.aten.mul.Scalar(_t(2, 3), 2.0), ["other"]),
    "DivBackward1": (lambda: torch.ops.aten.div.Scalar(_t(2, 3), 2.0), ["other"]),
    "NativeDropoutBackward0": (lambda: torch.ops.aten.native_dropout(_t(2, 3), 0.5, True)[0], ["result1", "p"]),
    "NegBackward0": (lambda: -_t(2, 3), []),
    "CloneBackward0": (lambda: _t(2, 3).clone(), []),
    "AliasBackward0": (lambda: torch.ops.aten.alias(_t(2, 3)), []),
    "ToCopyBackward0": (lambda: _t(2, 3).float(), []),
    "ReluBackward0": (lambda: torch.relu(_t(2, 3)), ["result"]),
    "GeluBackward0": (lambda: F.gelu(_t(2, 3)), ["approximate", "self"]),
    "SiluBackward0": (lambda: F.silu(_t(2, 3)), ["self"]),
    "TanhBackward0": (lambda: torch.tanh(_t(2, 3)), ["result"]),
    "SigmoidBackward0": (lambda: torch.sigmoid(_t(2, 3)), ["result"]),
    "ExpBackward0": (lambda: torch.exp(_t(2, 3)), ["result"]),
    "LogBackward0": (lambda: torch.log(_t(2, 3, positive=True)), ["self"]),
    "SqrtBackward0": (lambda: torch.sqrt(_t(2, 3, positive=True)), ["result"]),
    "RsqrtBackward0": (lambda: torch.rsqrt(_t(2, 3, positive=True)), ["result"]),
    "PowBackward0": (lambda: _t(2, 3).pow(2), ["exponent", "self"]),
    "HardtanhBackward0": (lambda: F.hardtanh(_t(2, 3)), ["min_val", "max_val", "self"]),
    "LeakyReluBackward0": (lambda: F.leaky_relu(_t(2, 3), 0.1), ["negative_slope", "self"]),
    "EluBackward0": (lambda: F.elu(_t(2, 3)), []),
    "SoftplusBackward0": (lambda: F.softplus(_t(2, 3)), ["beta", "threshold", "self"]),
    "ErfBackward0": (lambda: torch.erf(_t(2, 3)), ["self"]),
    "AbsBackward0": (lambda: torch.abs(_t(2, 3)), ["self"]),
    "ClampMinBackward0": (lambda: torch.clamp_min(_t(2, 3), 0.0), ["min", "self"]),
    "ClampBackward1": (lambda: _t(2, 3).clamp(-0.5, 0.5), ["min", "max", "self"]),
    "MmBackward0": (lambda: _t(2, 3) @ _p(3, 4), ["self", "mat2"]),
    "MvBackward0": (lambda: _t(2, 3) @ _p(3), ["self", "vec"]),
    "BmmBackward0": (lambda: torch.bmm(_t(2, 2, 3), _p(2, 3, 4)), ["self", "mat2"]),
    "AddmmBackward0": (lambda: F.linear(_t(2, 3), _p(4, 3), _p(4)), ["mat1", "mat2", "beta", "alpha"]),
    "BaddbmmBackward0": (lambda: torch.baddbmm(_t(2, 2, 4), _t(2, 2, 3), _p(2, 3, 4)),
                         ["batch1", "batch2", "beta", "alpha"]),
    "ConvolutionBackward0": (lambda: F.conv2d(_t(1, 2, 4, 4), _p(3, 2, 2, 2), _p(3)),
                             ["input", "weight", "bias_sym_sizes_opt", "stride", "padding", "dilation", "groups",
                              "transposed", "output_padding"]),
    "SumBackward0": (lambda: _t(2, 3).sum(), []),
    "SumBackward1": (lambda: _t(2, 3).sum(-1), ["dim", "keepdim"]),
    "MeanBackward0": (lambda: _t(2, 3).mean(), []),
    "MeanBackward1": (lambda: _t(2, 3).mean(0, keepdim=True), ["dim", "keepdim"]),
    "CumsumBackward0": (lambda: _t(2, 3).cumsum(1), ["dim"]),
    "AvgPool2DBackward0": (lambda: F.avg_pool2d(_t(1, 2, 4, 4), 2),
                           ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override",
                            "self"]),
    "AvgPool3DBackward0": (lambda: F.avg_pool3d(_t(1, 1, 2, 4, 4), 2),
                           ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override",
                            "self"]),
    "AdaptiveAvgPool2DBackward0": (lambda: F.adaptive_avg_pool2d(_t(1, 2, 5, 5), 3), ["self"]),
    "AdaptiveAvgPool3DBackward0": (lambda: F.adaptive_avg_pool3d(_t(1, 1, 3, 5, 5), 2), ["self"]),
    "ViewBackward0": (lambda: _t(2, 3).view(6), []),
    "UnsafeViewBackward0": (lambda: _t(2, 3, 4) @ _p(4, 2), []),
    "ReshapeAliasBackward0": (lambda: torch.ops.aten._reshape_alias(_t(2, 3), (6,), (1,)), []),
    "SqueezeBackward0": (lambda: _t(1, 3).squeeze(), []),
    "SqueezeBackward1": (lambda: _t(1, 3).squeeze(0), []),
    "SqueezeBackward2": (lambda: _t(1, 1, 3).squeeze((0, 1)), []),
    "UnsqueezeBackward0": (lambda: _t(2, 3).unsqueeze(1), []),
    "ExpandBackward0": (lambda: _t(1, 3).expand(2, 3), []),
    "TransposeBackward0": (lambda: _t(2, 3).transpose(0, 1), ["dim0", "dim1"]),
    "TransposeBackward1": (lambda: (_t(2, 3) * 1).transpose_(0, 1), ["dim0", "dim1"]),
    "TBackward0": (lambda: _t(2, 3).t(), []),
    "PermuteBackward0": (lambda: _t(2, 3, 4).permute(2, 0, 1), ["dims"]),
    "RepeatBackward0": (lambda: _t(2, 3).repeat(2, 1), ["repeats"]),
    "SliceBackward0": (lambda: _t(2, 6)[:, 1:5:2], ["dim", "start", "end", "step"]),
    "SelectBackward0": (lambda: _t(2, 3)[:, -1], ["dim", "index"]),
    "IndexBackward0": (lambda: _t(4, 3)[[0, 2]], ["indices"]),
    "IndexSelectBackward0": (lambda: _t(4, 3).index_select(0, torch.tensor([1, 1])), ["dim", "index"]),
    "FlipBackward0": (lambda: _t(2, 3).flip(1), ["dims"]),
    "RollBackward0": (lambda: _t(2, 3).roll(1, 1), ["shifts", "dims"]),
    "UnfoldBackward0": (lambda: _t(2, 5).unfold(1, 2, 1), ["dimension", "size", "step"]),
    "CatBackward0": (lambda: torch.cat([_t(2, 3), _t(2, 3)], -1), ["dim"]),
    "StackBackward0": (lambda: torch.stack([_t(2, 3), _t(2, 3)]), ["dim"]),
    "SplitBackward0": (lambda: _t(4, 3).split(2)[0], ["split_size", "dim"]),
    "SplitWithSizesBackward0": (lambda: _t(4, 3).split([1, 3])[1], ["split_sizes", "dim"]),
    "UnbindBackward0": (lambda: _t(2, 3).unbind(1)[0], ["dim"]),
    "GatherBackward0": (lambda: _t(2, 3).gather(1, torch.tensor([[0], [2]])), ["dim", "index", "self"]),
    "MaxBackward0": (lambda: _t(2, 3).max(1).values, ["dim", "keepdim"]),
    "MaxBackward1": (lambda: _t(2, 3).max(), ["result", "self"]),
    "MaskedFillBackward0": (lambda: _t(2, 3).masked_fill(torch.tensor([True, False, True]), 0.0), ["mask"]),
    "WhereBackward0": (lambda: torch.where(torch.tensor([True, False, True]), _t(2, 3), _t(2, 3)), ["condition"]),
    "ConstantPadNdBackward0": (lambda: F.pad(_t(2, 3), (1, 1)), []),
    "MaxPool2DWithIndicesBackward0": (lambda: F.max_pool2d(_t(1, 2, 4, 4), 2),
                                      ["self", "kernel_size", "stride", "padding", "dilation", "ceil_mode"]),
    "MaxPool3DWithIndicesBackward0": (lambda: F.max_pool3d(_t(1, 1, 2, 4, 4), 2),
                                      ["self", "kernel_size", "stride", "padding", "dilation", "ceil_mode"]),
    "NativeLayerNormBackward0": (lambda: F.layer_norm(_t(2, 3), (3,), _p(3), _p(3)),
                                 ["input", "weight", "bias", "result1", "result2", "normalized_shape"]),
    "NativeBatchNormBackward0": (_bn, ["input", "weight", "training", "result1", "result2", "running_mean",
                                       "running_var", "eps"]),
    "SoftmaxBackward0": (lambda: torch.softmax(_t(2, 3), -1), ["result", "dim"]),
    "SafeSoftmaxBackward0": (lambda: torch._safe_softmax(_t(2, 3), -1), ["result", "dim"]),
    "ScaledDotProductFlashAttentionForCpuBackward0": (
        lambda: F.scaled_dot_product_attention(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4)),
        ["query", "key", "value", "output", "dropout_p", "is_causal", "scale", "attn_mask"]),
    "EmbeddingBackward0": (lambda: F.embedding(torch.tensor([1, 2]), _p(4, 3)), ["indices", "padding_idx"]),
    "AccumulateGrad": (lambda: _t(2, 3) * 2.0, []),
}

# fused attention of the CUDA backends: checked on the node classes (no CPU node of these types can be made)
CUDA_SDPA = {
    "ScaledDotProductFlashAttentionBackward0": ["query", "key", "value", "output", "dropout_p", "is_causal", "scale"],
    "ScaledDotProductEfficientAttentionBackward0": ["query", "key", "value", "output", "dropout_p", "is_causal",
                                                    "scale", "attn_bias"],
    "ScaledDotProductCudnnAttentionBackward0": ["query", "key", "value", "output", "dropout_p", "is_causal", "scale",
                                                "attn_bias"],
}


def _coverage_rows():
    """The rows for the op entries added with the architecture coverage tests (kept beside those tests)."""
    from test_coverage_text import SAVED_TEXT
    from test_coverage_vision import CUDA_ONLY, SAVED_VISION

    return {**SAVED_TEXT, **SAVED_VISION}, CUDA_ONLY


SAVED.update(_coverage_rows()[0])
CUDA_SDPA = {**CUDA_SDPA, **_coverage_rows()[1]}


def test_saved_table_covers_every_builtin_entry():
    """A new op entry needs a row here (a real node and the saved names it reads), so that it is checked."""
    assert set(BUILTIN) <= set(SAVED) | set(CUDA_SDPA), sorted(set(BUILTIN) - set(SAVED) - set(CUDA_SDPA))


def _names_read_in_ops_sources() -> set[str]:
    names = set()
    for path in OPS_DIR.glob("*.py"):
        src = path.read_text()
        names |= set(re.findall(r'saved\(\s*[\w.]+\s*,\s*"(\w+)"', src))
        for group in re.findall(r'saved\(\s*[\w.]+\s*,\s*\(([^)]*)\)\s*\[', src):
            names |= set(re.findall(r'"(\w+)"', group))
        for group in re.findall(r'names\s*=\s*\(([^)]*)\)', src):
            names |= set(re.findall(r'"(\w+)"', group))
        for group in re.findall(r'Product\(\s*torch\.\w+\s*,\s*\(([^)]*)\)', src):
            names |= set(re.findall(r'"(\w+)"', group))
    return names


def test_every_saved_name_read_by_the_ops_is_in_the_table():
    read = _names_read_in_ops_sources()
    assert {"self", "mat2", "query", "alpha", "result"} <= read  # the scan itself works
    listed = {n for _, names in SAVED.values() for n in names} | {n for v in CUDA_SDPA.values() for n in v}
    assert read <= listed, f"saved names read by the op table but checked nowhere: {sorted(read - listed)}"


@pytest.mark.parametrize("kind", sorted(SAVED))
def test_saved_attributes_exist_on_real_nodes(kind):
    build, names = SAVED[kind]
    torch.manual_seed(0)
    t = build()
    if kind == "AccumulateGrad":
        fn = t.grad_fn.next_functions[0][0]
        assert type(fn).__name__ == kind
        assert isinstance(fn.variable, torch.Tensor)  # Leaf reads .variable
        return
    fn = find_node(t, kind)
    assert kind in OPS
    for name in names:
        saved(fn, name)  # raises TorchInternalsError if torch renamed it
        assert hasattr(type(fn), "_saved_" + name)
    assert fn._input_metadata[0].shape is not None  # out_shape() reads the private _input_metadata


@pytest.mark.parametrize("kind", sorted(CUDA_SDPA))
def test_saved_attributes_exist_on_cuda_attention_node_classes(kind):
    cls = getattr(torch._C._functions, kind)
    for name in CUDA_SDPA[kind]:
        assert hasattr(cls, "_saved_" + name), f"{kind} has no _saved_{name} in torch {torch.__version__}"


def test_every_builtin_kind_is_a_torch_node_type():
    """A key that torch no longer has (renamed node type) would never match: it is reported here."""
    stale = sorted(k for k in BUILTIN if k != "AccumulateGrad" and not hasattr(torch._C._functions, k))
    assert not stale, stale


def test_missing_attribute_raises_torch_internals_error():
    y = _t(2, 3) * _t(2, 3)
    fn = y.grad_fn
    with pytest.raises(dynamiclrp.TorchInternalsError, match="_saved_no_such_name"):
        saved(fn, "no_such_name")
    assert saved(fn, "no_such_name", None) is None
    assert saved(fn, "no_such_name", 7) == 7
    assert isinstance(dynamiclrp.TorchInternalsError("x"), dynamiclrp.DynamicLRPError)


def test_saved_negative_dims_read_back_signed():
    fn = _t(2, 3, 4).sum((-1, 0)).grad_fn
    assert saved(fn, "dim") == (-1, 0)
    fn = _t(2, 3).transpose(-1, -2).grad_fn
    assert (saved(fn, "dim0"), saved(fn, "dim1")) == (-1, -2)
    fn = torch.softmax(_t(2, 3), -1).grad_fn
    assert saved(fn, "dim") == -1


def test_saved_after_backward_raises_graph_freed():
    x = _t(2, 3)
    y = x * x
    y.sum().backward()
    with pytest.raises(dynamiclrp.GraphFreedError):
        saved(y.grad_fn, "self")


def test_unknown_node_type_is_refused_in_strict_mode():
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    x = _t(2, 3)
    y = Twice.apply(x)
    assert type(y.grad_fn).__name__ not in OPS
    with pytest.raises(dynamiclrp.MissingRuleError, match="TwiceBackward"):
        dynamiclrp.propagate(y, target=torch.ones(2, 3, dtype=torch.float64), wrt=[x])
