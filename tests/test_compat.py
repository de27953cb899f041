"""Every private attribute behind fastgen_diffusers.compat, checked on the installed libraries:
a test fails naming the version the attribute was checked against when it disappears."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from fastgen_diffusers import compat

pytestmark = pytest.mark.usefixtures("single_thread")


def _has(obj, name: str, checked: str) -> None:
    assert hasattr(obj, name), (
        f"{type(obj).__qualname__}.{name} is gone from the installed library; "
        f"fastgen_diffusers.compat was checked against {checked}: update it"
    )


def test_importing_compat_imports_no_training_library():
    code = (
        "import sys, fastgen_diffusers.compat, fastgen_diffusers.io; "
        "print(sorted(m for m in ('diffusers', 'accelerate', 'peft', 'datasets') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_accelerator_models_and_optimizers():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    _has(accelerator, "_models", compat.ACCELERATE_CHECKED)
    _has(accelerator, "_optimizers", compat.ACCELERATE_CHECKED)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    models, optimizers = compat.accelerator_models_and_optimizers(accelerator)
    assert len(models) == 1 and len(optimizers) == 1
    assert models is accelerator._models  # the live list: appending registers a model
    models.append(model)
    assert len(accelerator._models) == 2


def test_dataset_fingerprint():
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]})
    _has(ds, "_fingerprint", compat.DATASETS_CHECKED)
    fingerprint = compat.dataset_fingerprint(ds)
    assert isinstance(fingerprint, str) and fingerprint
    assert compat.dataset_fingerprint(ds.select(range(2))) != fingerprint


def _lora_layers():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(
        Tiny(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    )
    model.add_adapter("other", LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    return model, layers


def test_peft_layer_adapter_switches_without_touching_requires_grad():
    model, layers = _lora_layers()
    layer = layers[0]
    _has(layer, "_disable_adapters", compat.PEFT_CHECKED)
    _has(layer, "_active_adapter", compat.PEFT_CHECKED)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(3, 4)
    with torch.no_grad():
        compat.set_peft_layer_adapter(layer, None)
        assert layer.disable_adapters
        base = model(x)
        compat.set_peft_layer_adapter(layer, "default")
        assert not layer.disable_adapters and layer.active_adapters == ["default"]
        with_default = model(x)
        compat.set_peft_layer_adapter(layer, "other")
        assert layer.active_adapters == ["other"]
        with_other = model(x)
        compat.set_peft_layer_adapter(layer, None)
        assert layer.active_adapters == ["other"]  # kept while disabled
        compat.enable_peft_layer_adapters(layer)
        assert not layer.disable_adapters and torch.equal(model(x), with_other)
    assert not torch.equal(base, with_default) and not torch.equal(with_default, with_other)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_missing_attribute_names_the_checked_version():
    class NotALayer(nn.Module):
        pass

    with pytest.raises(AttributeError, match=r"'_disable_adapters'.*checked against peft 0\.21\.2"):
        compat.set_peft_layer_adapter(NotALayer(), "default")
    with pytest.raises(AttributeError, match=r"checked against accelerate 1\.16\.0"):
        compat.accelerator_models_and_optimizers(object())
    with pytest.raises(AttributeError, match=r"checked against datasets 5\.2\.0"):
        compat.dataset_fingerprint(object())


def test_torch_hook_dicts_and_removal_on_a_deep_copy():
    import copy

    module = nn.Linear(2, 2)
    for name in (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
    ):
        _has(module, name, compat.TORCH_CHECKED)
    calls = []
    hook = module.register_forward_hook(lambda *a: calls.append("post"))
    pre = module.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append("pre"), with_kwargs=True
    )
    clone = copy.deepcopy(module)
    compat.remove_forward_hook(clone, hook.id)
    compat.remove_forward_pre_hook(clone, pre.id)
    clone(torch.zeros(1, 2))
    assert calls == []  # the copy's hooks are gone
    module(torch.zeros(1, 2))
    assert calls == ["pre", "post"]  # the original keeps its own
    compat.remove_forward_hook(module, hook.id)
    compat.remove_forward_pre_hook(module, pre.id)
    compat.remove_forward_hook(module, hook.id)  # already gone: a no-op
    module(torch.zeros(1, 2))
    assert calls == ["pre", "post"]
    assert not module._forward_hooks and not module._forward_pre_hooks_with_kwargs
