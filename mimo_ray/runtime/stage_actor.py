"""Ray's calling conventions for stage actors: a stage verb returns a list of outputs, which a remote caller gets as
``num_returns=len(outputs)`` results (:meth:`StageActor.call`), or, over Ray Direct Transport (one object per call),
stashed in the actor and pulled one by one (:meth:`StageActor.run_stashed` then :meth:`StageActor.take`).

Stage classes stay plain Python; :func:`actor_class` adds these methods when the runtime makes them Ray actors.

    remote_cls = ray.remote(actor_class(EncoderStage))
    refs = actor.call.options(num_returns=3).remote("forward_step", step, batch, segments)
"""

from __future__ import annotations

import functools
from typing import Any

from mimo_ray.stages.base import stage_call


class StageActor:
    """Mixed in before a stage class: how a remote caller gets a verb's list of outputs."""

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run a verb that returns a list of outputs, shaped for Ray's ``num_returns=len(outputs)``.

        Returns:
            The only output itself for one output (Ray does not unpack ``num_returns=1``), else a tuple.
        """
        outputs = getattr(self, method)(*args, **kwargs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def run_stashed(self, key: str, method: str, *args: Any, **kwargs: Any) -> int:
        """Run a verb and keep its list of outputs for :meth:`take` (Ray Direct Transport moves one object per call).

        Returns:
            The number of outputs.
        """
        outputs = getattr(self, method)(*args, **kwargs)
        self.__dict__.setdefault("_stash", {})[key] = list(outputs)
        return len(outputs)

    @stage_call
    def take(self, ready: int, key: str, index: int) -> Any:
        """Output ``index`` of a stashed call (``ready`` is that call's result, so errors propagate in order)."""
        stash = self.__dict__.setdefault("_stash", {})
        outputs = stash[key]
        value, outputs[index] = outputs[index], None
        if all(v is None for v in outputs):
            del stash[key]
        return value


@functools.cache
def actor_class(stage_cls: type) -> type:
    """``stage_cls`` with the :class:`StageActor` methods, named like it (the Ray dashboard shows the name)."""
    return type(stage_cls.__name__, (StageActor, stage_cls), {"__doc__": stage_cls.__doc__})
