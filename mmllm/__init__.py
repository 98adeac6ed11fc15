"""mmllm: train, finetune, chat with, serve and evaluate any-to-any multimodal LLMs.

from mmllm import MMLLM, VocabLayout
model = MMLLM.from_pretrained("path/to/checkpoint")
"""

from mmllm.errors import MMLLMError
from mmllm.model.config import ModelConfig
from mmllm.model.mmllm import MMLLM
from mmllm.vocab import ModalityRange, VocabLayout

__all__ = ["MMLLM", "MMLLMError", "ModalityRange", "ModelConfig", "VocabLayout"]
__version__ = "0.1.0"
