"""The embedded tiny model (tokenizer, Llama, SFT warm start) and model-name resolution.

``resolve_model("embedded:tiny")`` builds the default policy offline on first use and caches it; any
other name is validated as a local HF folder or passed through as a hub name.
"""

from ppg.models.registry import (
    EMBEDDED_PREFIX,
    EmbeddedRecipe,
    ModelPathError,
    build_embedded_model,
    default_cache_dir,
    resolve_model,
    validate_model_folder,
)
from ppg.models.sft import SFTResult, SFTSpec, train_sft
from ppg.models.tiny import TinyModelSpec, init_model, save_model_folder
from ppg.models.tokenizer import (
    CHAT_TEMPLATE,
    END,
    SPECIAL_TOKENS,
    encode_conversation,
    stop_token_ids,
    train_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "EMBEDDED_PREFIX",
    "END",
    "SPECIAL_TOKENS",
    "EmbeddedRecipe",
    "ModelPathError",
    "SFTResult",
    "SFTSpec",
    "TinyModelSpec",
    "build_embedded_model",
    "default_cache_dir",
    "encode_conversation",
    "init_model",
    "resolve_model",
    "save_model_folder",
    "stop_token_ids",
    "train_sft",
    "train_tokenizer",
    "validate_model_folder",
]
