"""Visual-token reducers at the backbone's hook points (see base.py); `--reducer NAME[:key=val,...]`."""

from mmllm.model.reducers.base import (
    REDUCERS,
    IdealSlice,
    Stage,
    TokenReducer,
    build_reducer,
    keep_tokens,
    parse_spec,
)
from mmllm.model.reducers.learned import LearnedReducer


def attach_reducer(model, spec: str, train: bool = False) -> TokenReducer:
    """Build the reducer `spec` names for `model` and attach it at the model's hook points.

    A learned reducer (learned.py) loads what it learned from the model's checkpoint dir; with
    `train` (the finetune path) it is set up to be trained instead.
    """
    reducer = build_reducer(spec, model)
    if hasattr(reducer, "bind"):
        reducer.bind(model.model)
    if isinstance(reducer, LearnedReducer):
        reducer.prepare(model, train)
    return model.attach_hook(reducer)


__all__ = [
    "REDUCERS",
    "IdealSlice",
    "LearnedReducer",
    "Stage",
    "TokenReducer",
    "attach_reducer",
    "build_reducer",
    "keep_tokens",
    "parse_spec",
]
