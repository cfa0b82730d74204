"""A tiny random Llama plus a byte-level BPE tokenizer, saved like a real checkpoint.

Tests and local mode load it through the same ``from_pretrained`` path a real model takes,
so nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(os.environ.get("DSI_TINY_MODEL_DIR", "~/.cache/dsi-worker/tiny-llama"))
_MARKER = "dsi_tiny_model.ok"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "DeepSpeed splits a large language model across GPUs with tensor parallelism.",
    "Ray Serve batches concurrent requests and balances them across replicas.",
    "Kubernetes restarts the whole group when any rank of it fails.",
    "Hello, world! How are you today? I am fine, thank you.",
    "user assistant system: what is the capital of France? Paris.",
]


def build(
    path: str | os.PathLike[str] | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 256,
    seed: int = 0,
    weight_scale: float = 8.0,
) -> Path:
    """Build (once) and return the directory of a tiny random LlamaForCausalLM + tokenizer.

    The build is skipped when the directory already holds a finished build.  Sizes are
    chosen so every sharded dimension divides by 2 and 4 (TP of 2 or 4 ranks).  Larger sizes
    give a real-size random model (for GPU throughput); use ``weight_scale=1`` there so
    fp16 activations stay finite.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path if path is not None else DEFAULT_DIR).expanduser()
    if (out / _MARKER).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename, so concurrent builders never see half a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))

    hf_tok = _tokenizer(vocab_size, max_position_embeddings)
    hf_tok.save_pretrained(tmp)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random weights at init scale give near-uniform logits; scale them up so greedy
    # decoding has clear winners and a TP mismatch would show as different tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(weight_scale)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / _MARKER).write_text("ok\n")
    try:
        tmp.rename(out)
    except OSError:
        # Another process finished first: theirs is as good as ours.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tokenizer(vocab_size: int, max_len: int) -> Any:
    """A byte-level BPE tokenizer trained on a small built-in corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_len,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok
