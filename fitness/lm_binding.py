"""A causal LM without weights, whose parameters are views of one flat candidate buffer, by name.

Workers never read a model's weights: the skeleton is built from the first seed's config with its
parameters on the meta device (buffers such as rotary frequencies stay real, because they are
computed, not loaded), then every parameter is pointed once at its slice of the buffer the worker
materialises candidates into. Materialising the next candidate rewrites the model's weights in
place; nothing model-sized is copied.

Binding goes by tensor name through the seeds' layout, never by position: the flat order of a
checkpoint depends on how it was sharded (`layers.10` sorts before `layers.2` inside one file).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from evomerge.models.layout import Layout

SKELETON_BUILDS = 0  # how many skeletons this process built: tests assert the population builds none


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device; buffers are left as built."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(folder: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model class and config of `folder`, with meta parameters: no weight file is opened."""
    global SKELETON_BUILDS
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with parameters_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # meta-init warnings from some torch versions
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    _load_generation_config(model, folder)
    SKELETON_BUILDS += 1
    return model


def meta_model(folder: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of `folder` built entirely on the meta device, with no bytes allocated (not a
    skeleton: nothing here can be bound or run); for reading names, shapes and module types."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_binding(folder: str | Path, layout: Layout, trust_remote_code: bool = False) -> BindingPlan:
    """`plan_binding` against the meta-device model: names and shapes checked, nothing allocated."""
    return plan_binding(meta_model(folder, trust_remote_code), layout, str(folder))


def _load_generation_config(model: nn.Module, folder: str | Path) -> None:
    """`from_config` derives a generation config from config.json; the folder's own file (its EOS
    list, e.g. an instruct model's end-of-turn token) is what `from_pretrained` would use."""
    if not (Path(folder) / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        pass  # a broken generation config only loses the extra stop tokens


@dataclass
class Slot:
    """One place in the model a layout tensor goes to: a parameter (all its tied aliases) or a buffer."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]
    owners: list[tuple[nn.Module, str]]  # (module, attribute) for every alias of one parameter
    is_buffer: bool = False


@dataclass
class BindingPlan:
    params: list[Slot]
    buffers: list[Slot]  # persistent floating buffers: copied from the candidate at every bind
    skipped: list[str] = field(default_factory=list)  # seed tensors the model computes itself (not loaded)


def _owner(modules: dict[str, nn.Module], name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return modules[prefix], leaf


def plan_binding(model: nn.Module, layout: Layout, source: str) -> BindingPlan:
    """Match the model's parameters and buffers to the seeds' tensors by name; refuse any mismatch.

    Tied parameters (an LM head sharing the embedding) are one Parameter under several names; they
    are bound to the first of those names the seeds hold, as `from_pretrained` ties them. A seed
    tensor that is neither a parameter nor a persistent buffer (an old `rotary_emb.inv_freq`) is
    skipped, as transformers skips it.
    """
    modules = dict(model.named_modules())
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    model_name = type(model).__name__
    params, claimed, missing = [], set(), []
    for aliases in groups.values():
        held = [n for n in aliases if n in layout]
        if not held:
            missing.append(aliases[0])
            continue
        spec = layout.index(held[0])
        module, leaf = _owner(modules, aliases[0])
        shape = tuple(module._parameters[leaf].shape)
        if tuple(spec.shape) != shape:
            raise ValueError(f"{spec.name}: the seeds hold shape {tuple(spec.shape)} but the {model_name} "
                             f"built from {source} has {shape}; the seeds and the model must share one "
                             "architecture (fitness.options.model, if set, must be the seeds' base)")
        params.append(Slot(spec.name, spec.offset, spec.numel, shape, [_owner(modules, n) for n in aliases]))
        claimed.update(aliases)
    buffers, skipped = [], []
    named_buffers = dict(model.named_buffers())
    unknown = []
    for spec in layout.tensors:
        if spec.name in claimed:
            continue
        if spec.name in named_buffers:
            module, leaf = _owner(modules, spec.name)
            if leaf in module._non_persistent_buffers_set or not named_buffers[spec.name].is_floating_point():
                skipped.append(spec.name)
                continue
            if tuple(named_buffers[spec.name].shape) != tuple(spec.shape):
                raise ValueError(f"{spec.name}: the seeds hold shape {tuple(spec.shape)} but the {model_name} "
                                 f"buffer has {tuple(named_buffers[spec.name].shape)}")
            buffers.append(Slot(spec.name, spec.offset, spec.numel, tuple(spec.shape), [(module, leaf)], True))
        else:
            unknown.append(spec.name)
    if missing:
        extra = f"; the first seed tensor it does not know is {unknown[0]!r}" if unknown else ""
        raise ValueError(f"the {model_name} built from {source} has parameter {missing[0]!r} that the seeds "
                         f"lack ({len(missing)} missing in all){extra}; the seeds and the model must share "
                         "one architecture (fitness.options.model, if set, must be the seeds' base)")
    # Tensors a model computes rather than loads (old per-layer `rotary_emb.inv_freq`) share a leaf
    # name with one of its buffers; any other unknown tensor means the seeds hold more than the model.
    computed = {n.rpartition(".")[2] for n in named_buffers}
    foreign = [n for n in unknown if n.rpartition(".")[2] not in computed]
    if foreign:
        raise ValueError(f"seed tensor {foreign[0]!r} is neither a parameter nor a buffer of the {model_name} "
                         f"built from {source} ({len(foreign)} such tensors); the seeds and the model must share "
                         "one architecture (fitness.options.model, if set, must be the seeds' base)")
    skipped.extend(unknown)
    return BindingPlan(params, buffers, skipped)


def bind(plan: BindingPlan, flat: torch.Tensor) -> None:
    """Point every parameter at its slice of `flat` (no copy); the persistent buffers are copied."""
    for slot in plan.params:
        param = nn.Parameter(flat[slot.offset:slot.offset + slot.numel].view(slot.shape), requires_grad=False)
        for module, leaf in slot.owners:
            module._parameters[leaf] = param
    copy_buffers(plan, flat)


def copy_buffers(plan: BindingPlan, flat: torch.Tensor) -> None:
    for slot in plan.buffers:
        module, leaf = slot.owners[0]
        module._buffers[leaf].copy_(flat[slot.offset:slot.offset + slot.numel].view(slot.shape))


def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers built on the CPU go to the scoring device (parameters are bound there already)."""
    for module in model.modules():
        for leaf, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[leaf] = buf.to(device)


def all_finite(flat: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Chunked, so a 7B candidate costs no model-sized boolean mask."""
    for lo in range(0, flat.numel(), chunk):
        if not bool(torch.isfinite(flat[lo:lo + chunk]).all()):
            return False
    return True

