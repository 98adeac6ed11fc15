"""LoRA adapters (peft) on an `MMLLM`: loading one saved by `mmllm finetune` or plain peft.

Parameter names equal Hugging Face's (ARCHITECTURE decision 3), so an adapter trained on our
model or on its `export_hf` twin loads with `peft.PeftModel.from_pretrained` on either.
"""

from __future__ import annotations

from pathlib import Path

from mmllm.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"


def apply_adapter(model, path: str | Path, merge: bool = True):
    """`model` with the peft adapter at `path`; merged into the weights unless `merge` is False
    (then a `peft.PeftModel` wrapping it is returned)."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (not a peft adapter dir)")
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(path))
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the adapter does not fit this model ({type(err).__name__}: {err})") from None
    return wrapped.merge_and_unload() if merge else wrapped
