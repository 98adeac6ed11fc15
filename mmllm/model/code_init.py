"""Start each media code's embedding and LM-head rows from what the code decodes to.

A fresh model's code rows are independent noise, so the LM must learn, code by code, that two
of the 512 image codes are both "a red cell": on the toy world a code is seen a few dozen times
per epoch, and captions stayed at chance colour for 500 steps. Here every code of a modality
whose tokenizer can show it (`ModalityTokenizer.code_appearance`: the medium decoded from an
item made of that code alone) gets, on top of its random row, a fixed Gaussian projection of
that appearance. Codes that look alike then start with alike rows, in the input embedding and
in the LM head, so what the model learns about one code carries over to its neighbours from the
first step. Like initialising a VQ model's token embeddings from its codebook, but from the
decoded pixels, which every decodable tokenizer has and which FSQ's bare 3-number codes lack.

Measured on the demo's model and data (500 steps, 10.5 minutes of 2-rank pretraining each): the
caption's colour word, teacher-forced on 300 training captions, is right for 35% of 462 against
22% from random rows; for a single large shape 65% against 26%.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from mmllm.model.mmllm import MMLLM
from mmllm.tokenizers.base import ModalityTokenizer

logger = logging.getLogger(__name__)


@torch.no_grad()
def init_code_rows(model: MMLLM, tokenizers: Mapping[str, ModalityTokenizer], scale: float, seed: int) -> list[str]:
    """Add `scale` x initializer_range-sized appearance projections to the code rows of every
    modality whose tokenizer has a `code_appearance`; return the modalities changed."""
    generator = torch.Generator().manual_seed(seed)
    target_std = scale * model.config.initializer_range
    heads = [model.model.embed_tokens.weight]
    if not model.config.tie_word_embeddings:
        heads.append(model.lm_head.weight)
    changed = []
    for name, tokenizer in tokenizers.items():
        appearance = tokenizer.code_appearance()
        if appearance is None or name not in model.layout.modalities:
            continue
        features = standardised(appearance)
        m = model.layout.modality(name)
        for weight in heads:
            projection = torch.randn(features.shape[1], weight.shape[1], generator=generator) / features.shape[1] ** 0.5
            rows = features @ projection
            rows = rows * (target_std / rows.std().clamp(min=1e-12))
            weight[m.start : m.start + m.codebook_size] += rows.to(weight.dtype)
        changed.append(name)
    logger.info("code rows started from decoded appearance: %s", ", ".join(changed) or "none")
    return changed


def standardised(appearance: np.ndarray) -> torch.Tensor:
    """(codes, features) with each feature centred and scaled to unit variance across the codes;
    features no code changes (a border every code leaves black) are dropped."""
    features = torch.from_numpy(np.asarray(appearance, dtype=np.float32))
    spread = features.std(0)
    varying = spread > 1e-6
    if not bool(varying.any()):
        return torch.zeros(features.shape[0], 1)
    return (features[:, varying] - features[:, varying].mean(0)) / spread[varying]
