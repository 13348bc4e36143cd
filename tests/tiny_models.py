"""Tiny random-init backbones built from transformers configs, saved like real model directories."""
from __future__ import annotations

import os

import torch

WORDS = ["good", "bad", "great", "awful", "happy", "sad", "love", "hate", "fine", "okay", "movie", "food",
         "the", "a", "is", "was", "very", "not", "day", "night",
         "photo", "of", "an", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle",
         "boot", "t", "-", "/", "top"]


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def tiny_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)


def tiny_bert_dir(root: str, hidden: int = 32, layers: int = 3, seed: int = 0) -> str:
    from transformers import BertConfig, BertModel

    d = os.path.join(root, f"tiny-bert-{hidden}-{layers}")
    if os.path.isdir(d):
        return d
    os.makedirs(d)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=hidden * 2, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def tiny_llama_dir(root: str, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaModel

    d = os.path.join(root, f"tiny-llama-{hidden}-{layers}")
    if os.path.isdir(d):
        return d
    os.makedirs(d)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=hidden * 2, max_position_embeddings=64,
                      architectures=["LlamaForCausalLM"], pad_token_id=0)
    LlamaModel(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def tiny_vit_dir(root: str, hidden: int = 32, layers: int = 2, image_size: int = 16, channels: int = 1) -> str:
    from transformers import ViTConfig, ViTModel

    d = os.path.join(root, f"tiny-vit-{hidden}-{layers}-{image_size}")
    if os.path.isdir(d):
        return d
    os.makedirs(d)
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=hidden * 2,
                    image_size=image_size, patch_size=4, num_channels=channels)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d
