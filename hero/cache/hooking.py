"""Installing and removing diffusers hooks, and where a denoising call sits in its generation.

Every cache in this project (HERO, the FORA/ToCa baselines, the probe, the accelerator registry's
call tracker) puts :class:`~diffusers.hooks.hooks.ModelHook` objects on a transformer and its
blocks, takes them off again leaving the modules exactly as they were, and needs to know, per
cache context, which step of which generation a call is. Both are written here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from diffusers.hooks.hooks import CacheContext, HookRegistry, ModelHook
from torch import nn


# ------------------------------------------------------------------------------------- hooks
def find_hook(module: nn.Module, name: str) -> ModelHook | None:
    """The hook registered on ``module`` as ``name``, or None."""
    registry = module.__dict__.get("_diffusers_hook")
    return None if registry is None else registry.get_hook(name)


def install_hooks(transformer: nn.Module, block_hooks: Iterable[tuple[nn.Module, str, ModelHook]],
                  root: tuple[str, ModelHook] | None = None) -> None:
    """Register each ``(module, name, hook)`` of ``block_hooks`` and then ``root`` (name, hook) on
    the transformer, so the root hook runs first on every call."""
    for module, name, hook in block_hooks:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if root is not None:
        registry.register_hook(root[1], root[0])
    registry.invalidate_child_registries_cache()


def uninstall_hooks(transformer: nn.Module, names: Sequence[str],
                    modules: Iterable[nn.Module] | None = None) -> None:
    """Remove the hooks ``names`` from the transformer and every module under it; the modules
    left with no hook (``modules``, default all of them) get their own ``forward`` back."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in names:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    drop_empty_registries(transformer.modules() if modules is None else [transformer, *modules])


def reset_hook_states(module: nn.Module, keep: ModelHook | None = None) -> None:
    """Reset every stateful hook on ``module`` and the modules under it, except ``keep``."""
    for child in module.modules():
        registry = child.__dict__.get("_diffusers_hook")
        for hook in [] if registry is None else list(registry.hooks.values()):
            if hook._is_stateful and hook is not keep:
                hook.reset_state(child)


def drop_empty_registries(modules: Iterable[nn.Module]) -> None:
    """Undo what emptied diffusers hook registries left on ``modules``: the registry itself and the
    instance attribute ``forward`` pinned to the class's own method."""
    for module in modules:
        registry = module.__dict__.get("_diffusers_hook")
        if registry is None or registry.hooks:
            continue
        del module._diffusers_hook
        forward = module.__dict__.get("forward")
        if getattr(forward, "__self__", None) is module and \
                getattr(forward, "__func__", None) is type(module).forward:
            del module.forward


# ---------------------------------------------------------------------------------- position
def input_signature(inputs: dict[str, Any]) -> tuple:
    """Every tensor input's name, shape, dtype and device: cached tensors are reusable only while
    all of them stay the same (batch size, frames, resolution, text length)."""
    return tuple((name, tuple(value.shape), str(value.dtype), str(value.device))
                 for name, value in inputs.items() if isinstance(value, torch.Tensor))


@dataclass(frozen=True)
class Position:
    """A call's step (0-based), the generation's step count (None when unknown) and whether the
    call starts a new generation."""

    step: int
    num_steps: int | None
    new_generation: bool


class StepClock:
    """One cache context's position in its generation.

    The step is the cache context's ``step_index`` when the pipeline gives it; otherwise the calls
    of this context are counted (modulo the step count when it is known). A call starts a new
    generation when its inputs' signature or the step count changed, or when the step did not
    advance (step 0 again). Stock diffusers pipelines give no step index but reset stateful hooks
    at the end of every call, which restarts the count.
    """

    def __init__(self) -> None:
        self.signature: tuple | None = None
        self.num_steps: int | None = None
        self.step = -1
        self.generation = 0

    def advance(self, context: CacheContext, signature: tuple, num_steps: int | None) -> Position:
        """The position of a call with inputs ``signature`` under ``context``."""
        num_steps = context.num_inference_steps or num_steps
        num_steps = None if num_steps is None else int(num_steps)
        if context.step_index is not None:
            step = int(context.step_index)
        else:
            step = self.step + 1 if signature == self.signature else 0
            step = step if num_steps is None else step % num_steps
        new = signature != self.signature or num_steps != self.num_steps or step <= self.step
        self.generation += int(new)
        self.signature, self.num_steps, self.step = signature, num_steps, step
        return Position(step, num_steps, new)
