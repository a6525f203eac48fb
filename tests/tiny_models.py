"""Tiny random-weight decoders of every architecture the patch supports, built offline."""

from __future__ import annotations

import torch

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3", "gpt2"]
VOCAB = 128


def tiny_model(arch: str, *, sliding_window: int | None = None, seed: int = 0, attn: str = "sdpa"):
    """A 2-layer fp32 model in eval mode; GQA (4 query heads, 2 KV heads) where the
    architecture has it. ``sliding_window`` applies to models that have one."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    win = sliding_window or 256
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(
            tf.Qwen2Config(
                **common, use_sliding_window=sliding_window is not None, sliding_window=win, max_window_layers=0
            )
        )
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(
            tf.Qwen3Config(
                **common,
                head_dim=16,
                use_sliding_window=sliding_window is not None,
                sliding_window=win,
                max_window_layers=0,
            )
        )
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=sliding_window))
    elif arch == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=16))
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=win, layer_types=["sliding_attention", "full_attention"]
        )
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        )
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_tokenizer():
    """A character-level HF fast tokenizer (ids < VOCAB), built offline, with a chat template."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    return tok


def save_tiny(folder, arch: str = "llama") -> str:
    """A tiny model plus the character tokenizer, saved as an HF folder (for the CLI)."""
    tiny_model(arch).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)
