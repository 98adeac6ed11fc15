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


def attach_reducer(model, spec: str) -> TokenReducer:
    """Build the reducer `spec` names for `model` and attach it at the model's hook points."""
    reducer = build_reducer(spec, model)
    if hasattr(reducer, "bind"):
        reducer.bind(model.model)
    return model.attach_hook(reducer)


__all__ = ["REDUCERS", "IdealSlice", "Stage", "TokenReducer", "attach_reducer", "build_reducer", "keep_tokens", "parse_spec"]
