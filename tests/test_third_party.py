"""normkit on the models people use: timm's resnet18, convnext_atto, efficientnet_b0, regnety_002, resnet50_gn,
vit_tiny (64-px images) and Hugging Face's Llama, Qwen2, Gemma, T5, GPT-2, BERT (tiny configs), all random init.

Before (measured on these models, torch 2.13): ``convert`` changed no layer of the timm models but resnet18
and none of the hand-written RMS norms; float32 at scale 1e20 was 100% wrong or non-finite on every model;
``fold_batchnorm`` folded 0 of 49 and 0 of 44; ``export_onnx`` refused vit_tiny and efficientnet_b0 and wrote
Llama's norms unhardened. The float64 references are true float64 computations
(:func:`normkit.reference.float64_call`: Hugging Face's own ``.to(torch.float32)`` stays float64).
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import normkit
import third_party as tp
from conftest import assert_matches_torch_or_oracle, assert_rel_close
from normkit.reference import float64_call
from normkit.robust import Hardened, record_norm_calls

MODELS = [*tp.TIMM_MODELS, *tp.HF_MODELS]
SCALE = 1e20


@dataclass
class Case:
    name: str
    model: nn.Module  # float32, eval
    converted: nn.Module
    report: list
    warned: list

    @property
    def language(self) -> bool:
        return self.name in tp.HF_MODELS


@pytest.fixture(scope="module", params=MODELS)
def case(request) -> Case:
    """Each model built and converted once for this module's tests."""
    model = tp.build(request.param)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted, report = normkit.convert(model, return_report=True)
    return Case(request.param, model, converted, report, [str(w.message) for w in caught if "convert" in str(w.message)])


def batch_statistics(model: nn.Module) -> nn.Module:
    """``model`` with its BatchNorms in training mode (batch statistics, as in training) and dropout off."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return model


def scaled(case: Case, scale: float):
    """(original, converted, input) at ``scale``: images times ``scale``; word embeddings at that RMS."""
    original, converted = copy.deepcopy(case.model), copy.deepcopy(case.converted)
    if case.language:
        return tp.scale_embeddings(original, scale), tp.scale_embeddings(converted, scale), tp.token_ids()
    return batch_statistics(original), batch_statistics(converted), tp.image(scale)


def norm_alone(layer: nn.Module) -> nn.Module:
    """A copy of a norm layer with batch statistics and its own submodules (timm's ``drop`` and ``act`` after the
    norm) made identities: in a low precision each op rounds once more, and the activation is not the norm's."""
    layer = batch_statistics(copy.deepcopy(layer))
    for name, _ in list(layer.named_children()):
        setattr(layer, name, nn.Identity())
    return layer


@pytest.fixture(autouse=True)
def _one_thread():
    """These models run many small ops, which a second intra-op thread only slows down (10-100x on a loaded
    2-core machine); the suite's setting is restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def norm_names(model: nn.Module) -> set[str]:
    """The norm layers of ``model`` by an independent, name-based census: classes named *Norm* (torch's, timm's,
    Hugging Face's; the *NormAct* variants included) that hold a weight of their own."""
    return {n for n, m in model.named_modules() if re.search("Norm", type(m).__name__) and "weight" in dict(m.named_parameters(recurse=False))}


# -------------------------------------------------------------------------------------------- convert
def test_convert_hardens_every_norm_and_reports_it(case):
    """Every norm layer changed and reported, nothing warned; running the converted model, the torch functional
    norm calls left are made by hardened modules only (which route them to normkit), and every call the
    original made comes from a module convert changed."""
    assert not case.warned, case.warned
    assert {s.name for s in case.report} == norm_names(case.model)
    assert all(s.changed for s in case.report), [s for s in case.report if not s.changed]
    original, converted, x = scaled(case, 1.0)
    with torch.no_grad(), record_norm_calls(original) as before:
        original(x)
    with torch.no_grad(), record_norm_calls(converted) as after:
        converted(x)
    hardened = {n for n, m in converted.named_modules() if isinstance(m, Hardened)}
    assert {c.module for c in after.calls} <= hardened, [(c.function, c.module) for c in after.calls[:5]]
    assert {c.module for c in before.calls} - {""} <= hardened | {s.name for s in case.report}
    assert list(case.converted.state_dict()) == list(case.model.state_dict())


def test_float64_output_unchanged(case):
    original, converted, x = scaled(case, 1.0)
    want, lowered = float64_call(original.double(), x)
    got, lowered_too = float64_call(converted.double(), x)
    assert lowered == lowered_too == []  # a true float64 computation on both sides
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_float32_at_1e20_is_accurate_where_torch_is_not(case):
    original, converted, x = scaled(case, SCALE)
    truth, lowered = float64_call(copy.deepcopy(original).double(), x)
    assert lowered == []
    with torch.no_grad():
        assert_rel_close(converted(x), truth, torch.float32, f"{case.name} converted at {SCALE:g}", rel=1e-4)
        before = original(x)
    err = ((before.double() - truth).abs().max() / truth.abs().max()).item()
    assert not err <= 1e-4, f"torch's own kernels were expected to fail here (error {err:.1e})"  # the test could fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_layers_in_each_dtype(case, dtype):
    """Up to six norm layers, each on the input it gets in the float64 model, rounded to ``dtype``: the converted
    layer gives the original's output dtype and values wherever the original is right, and the float64 answer
    where the original is off -- at scale 1 and where the input is large (float32/bfloat16 1e20, float16 3e4)."""
    original, converted, x = scaled(case, 1.0)
    names = sorted({s.name for s in case.report})
    names = [names[i] for i in sorted({round(k * (len(names) - 1) / 5) for k in range(6)})]
    inputs = {}
    hooks = [original.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach()))
             for n in names]
    with torch.no_grad():
        float64_call(original.double(), x)
    for h in hooks:
        h.remove()
    big = 3e4 if dtype == torch.float16 else SCALE
    for name in names:
        layer, twin = case.model.get_submodule(name), case.converted.get_submodule(name)
        for scale in (1.0, big / inputs[name].abs().max().item()):
            xin = (inputs[name] * scale).to(dtype)
            mine, theirs, ref = (norm_alone(m) for m in (twin, layer, layer))
            with torch.no_grad():
                got, want = mine.to(dtype)(xin), theirs.to(dtype)(xin)
            truth, _ = float64_call(ref.double(), xin.double())
            assert got.dtype == want.dtype
            assert_matches_torch_or_oracle(got, want, truth, dtype, f"{case.name}.{name} {dtype} scale {scale:.1e}")


def test_revert_is_exact(case):
    back = normkit.revert(case.converted)
    assert [type(m) for m in back.modules()] == [type(m) for m in case.model.modules()]
    assert repr(back) == repr(case.model)
    x = tp.example(case.name)
    with torch.no_grad():
        assert torch.equal(back(x), case.model(x))


@pytest.mark.slow
def test_converted_models_pickle_into_a_fresh_process(tmp_path):
    """torch.save of whole converted models (hardened classes, twins) and torch.load in a new process."""
    for name in ("convnext_atto", "llama"):
        converted = normkit.convert(tp.build(name))
        x = tp.example(name)
        torch.save({"model": converted, "x": x, "y": converted(x)}, tmp_path / f"{name}.pt")
        assert torch.equal(copy.deepcopy(converted)(x), converted(x))
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import third_party; third_party.stub_torchvision_ops()\n"
            "for name in ('convnext_atto', 'llama'):\n"
            "    saved = torch.load(f'{sys.argv[2]}/{name}.pt', weights_only=False)\n"
            "    assert torch.equal(saved['model'](saved['x']), saved['y']), name\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.stdout.strip() == "ok", result.stderr[-3000:]


# -------------------------------------------------------------------------------------------- fold
def has_statistics(m: nn.Module) -> bool:
    return isinstance(m._buffers.get("running_mean"), torch.Tensor)


@pytest.mark.parametrize("prepare", ["as-built", "converted", "frozen"])
@pytest.mark.parametrize("name", ["efficientnet_b0", "regnety_002"])
def test_fold_leaves_no_batchnorm_after_a_conv(name, prepare):
    """Before: 0 of 49 / 0 of 44 folded ("BatchNormAct2d overrides forward"). Each BatchNormAct2d's batch norm is
    folded into its conv; its activation and drop stay, as modules; the float64 output is unchanged. The same
    after ``convert``, and after timm's ``freeze_batch_norm_2d`` (torchvision's FrozenBatchNorm2d, timm's
    FrozenBatchNormAct2d)."""
    model = tp.timm_model(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # running statistics of a trained model, so that folding changes the weights
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    if prepare == "frozen":
        model = tp.timm().layers.freeze_batch_norm_2d(model)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model = (normkit.convert(model) if prepare == "converted" else model).double()
    x = tp.image().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left, so no warning
        folded, report = normkit.fold_batchnorm(model, example_input=x, return_report=True)
    assert report and all(s.changed for s in report)
    assert not [n for n, m in folded.named_modules() if has_statistics(m)]
    acts = [m for n, m in folded.named_modules() if n.endswith(".act") or n == "act"]
    assert len(acts) >= len(report)  # the activations are still there
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


# -------------------------------------------------------------------------------------------- export
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "efficientnet_b0", "llama"])
def test_export_onnx_runs_in_onnxruntime_at_1e20(name):
    """Before: OnnxError (vit_tiny, efficientnet_b0) and Llama's 5 RMS norms written unhardened (0.9 off at 1e20).
    Every norm comes out as normkit's robust subgraph; ONNX Runtime within 1e-4 of the float64 model at 1e20."""
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install -e '.[dev]') is not installed")
    from normkit.onnx.verify import run

    model = tp.build(name)
    norms = len(norm_names(model))
    proto = None
    for scale in (1.0, SCALE):
        m = copy.deepcopy(model)
        x = tp.example(name, scale)
        if name in tp.HF_MODELS:  # the scale lives in the embedding weights, which are in the graph: export again
            tp.scale_embeddings(m, scale)
            proto = None
        if proto is None:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # nothing stayed unhardened
                proto, report = normkit.export_onnx(m, x)
            assert sum(report.counts().values()) == norms and not report.skipped
            assert not {n.op_type for n in proto.graph.node} & {"LayerNormalization", "BatchNormalization", "RMSNormalization",
                                                                 "GroupNormalization", "InstanceNormalization", "LRN"}
        out, = run(proto, {proto.graph.input[0].name: x.numpy()})
        truth, lowered = float64_call(m.double(), x)
        assert lowered == []
        assert_rel_close(torch.from_numpy(out), truth, torch.float32, f"{name} ONNX Runtime at {scale:g}", rel=1e-4)


# -------------------------------------------------------------------------- the norm classes themselves
def _hf(module: str, cls: str, *args):
    def make():  # (hidden size, eps) by default
        tp.transformers()
        return getattr(__import__(f"transformers.models.{module}", fromlist=[cls]), cls)(*(args or (16, 1e-6)))
    return make


def _timm(cls: str, *args, **kwargs):
    def make():
        return getattr(tp.timm().layers, cls)(*args, **kwargs)
    return make


def _torchvision_frozen():
    tp.timm()  # timm imports torchvision's FrozenBatchNorm2d (the one timm uses)
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d(16)


LLAMA, GEMMA = "normkit.nn.RMSNorm(casting_mode='llama')", "normkit.nn.RMSNorm(offset=1.0)"
HARDENED = "hardened in place"
CLASSES = {  # name -> (constructor, input shape, what convert makes of it)
    "LlamaRMSNorm": (_hf("llama.modeling_llama", "LlamaRMSNorm"), (2, 3, 16), LLAMA),
    "MistralRMSNorm": (_hf("mistral.modeling_mistral", "MistralRMSNorm"), (2, 3, 16), LLAMA),
    "Qwen2RMSNorm": (_hf("qwen2.modeling_qwen2", "Qwen2RMSNorm"), (2, 3, 16), LLAMA),
    "Qwen3RMSNorm": (_hf("qwen3.modeling_qwen3", "Qwen3RMSNorm"), (2, 3, 4, 16), LLAMA),
    "Phi3RMSNorm": (_hf("phi3.modeling_phi3", "Phi3RMSNorm"), (2, 3, 16), LLAMA),
    "GemmaRMSNorm": (_hf("gemma.modeling_gemma", "GemmaRMSNorm"), (2, 3, 16), GEMMA),
    "Gemma2RMSNorm": (_hf("gemma2.modeling_gemma2", "Gemma2RMSNorm"), (2, 3, 16), GEMMA),
    "Gemma3RMSNorm": (_hf("gemma3.modeling_gemma3", "Gemma3RMSNorm"), (2, 3, 16), GEMMA),
    "T5LayerNorm": (_hf("t5.modeling_t5", "T5LayerNorm"), (2, 3, 16), "normkit.nn.RMSNorm(casting_mode='t5')"),
    "CohereLayerNorm": (_hf("cohere.modeling_cohere", "CohereLayerNorm", 16), (2, 3, 16),
                        "normkit.nn.LayerNorm(casting_mode='gemma')"),  # written out, no bias, in float32
    "OlmoLayerNorm": (_hf("olmo.modeling_olmo", "OlmoLayerNorm", 16), (2, 3, 16), HARDENED),  # no parameters
    "Qwen3NextRMSNorm": (_hf("qwen3_next.modeling_qwen3_next", "Qwen3NextRMSNorm"), (2, 3, 16), GEMMA),
    "timm RmsNorm": (_timm("RmsNorm", 16), (2, 3, 16), HARDENED),  # its forward calls F.rms_norm
    "timm RmsNorm2d": (_timm("RmsNorm2d", 16), (2, 16, 3, 5), "normkit.nn.RMSNorm(casting_mode='llama', channels_first=True)"),
    "timm RmsNorm2dFp32": (_timm("RmsNorm2dFp32", 16), (2, 16, 3, 5), "normkit.nn.RMSNorm(channels_first=True)"),
    "timm LayerNorm2d": (_timm("LayerNorm2d", 16), (2, 16, 3, 5), HARDENED),
    "timm LayerNormAct2d": (_timm("LayerNormAct2d", 16), (2, 16, 3, 5), HARDENED),
    "timm GroupNormAct": (_timm("GroupNormAct", 16, 4), (2, 16, 3, 5), HARDENED),
    "timm GroupNorm1": (_timm("GroupNorm1", 16), (2, 16, 3, 5), HARDENED),
    "timm BatchNormAct2d": (_timm("BatchNormAct2d", 16), (2, 16, 3, 5), HARDENED),
    "torchvision FrozenBatchNorm2d": (_torchvision_frozen, (2, 16, 3, 5), "normkit.nn.FrozenBatchNorm2d(casting_mode='promote')"),
}


@pytest.mark.parametrize("name", CLASSES)
def test_each_norm_class_converts_with_its_dtype_behaviour(name):
    """Hugging Face's RMS norms (Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3, T5), timm's and torchvision's:
    what convert makes of each, and that it keeps the class's dtype behaviour in every (input, weight) pair."""
    from test_convert import assert_twin, randomized

    make, shape, what = CLASSES[name]
    model = nn.Sequential(randomized(make(), torch.Generator().manual_seed(0)))
    converted, report = normkit.convert(model, return_report=True)
    assert len(report) == 1 and report[0].changed and report[0].after.startswith(what), report
    assert_twin(model, converted, torch.randn(shape, dtype=torch.float64) * 2 + 0.5, name)


LEFT_CLASSES = {  # timm classes normkit has no form for -> the reason
    "FrozenBatchNormAct2d": (_timm("FrozenBatchNormAct2d", 16), r"has submodules \(drop, act\)"),
    "RmsNormAct2d": (_timm("RmsNormAct2d", 16), r"has submodules \(drop, act\)"),
    "SimpleNorm": (_timm("SimpleNorm", 16), r"no normalization of its input"),
}


@pytest.mark.parametrize("name", LEFT_CLASSES)
def test_classes_normkit_has_no_form_for_are_left_with_the_reason(name):
    make, reason = LEFT_CLASSES[name]
    with pytest.warns(RuntimeWarning, match=name):
        converted, report = normkit.convert(nn.Sequential(make()), return_report=True)
    assert not report[0].changed and re.search(reason, report[0].after), report[0].after
