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


def _save_dir(root: str, name: str, build, tokenizer=None) -> str:
    """Build (seeded) and save a model directory once; `build()` returns the model to save."""
    d = os.path.join(root, name)
    if os.path.isdir(d):
        return d
    build().save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


def _t5_config(hidden: int, layers: int):
    from transformers import T5Config

    return T5Config(vocab_size=len(VOCAB), d_model=hidden, d_kv=hidden // 4, d_ff=hidden * 2, num_layers=layers,
                    num_heads=2, decoder_start_token_id=0, pad_token_id=0)


def tiny_t5_dir(root: str, hidden: int = 32, layers: int = 2, seed: int = 0, encoder_only: bool = False) -> str:
    """A full T5ForConditionalGeneration checkpoint (the format of t5-base / t5-3b), or T5EncoderModel's."""
    from transformers import T5EncoderModel, T5ForConditionalGeneration

    def build():
        torch.manual_seed(seed)
        cls = T5EncoderModel if encoder_only else T5ForConditionalGeneration
        return cls(_t5_config(hidden, layers))

    return _save_dir(root, f"tiny-t5{'-encoder' if encoder_only else ''}-{hidden}-{layers}", build, tiny_tokenizer())


def tiny_bart_dir(root: str, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A full BartForConditionalGeneration checkpoint (model.encoder.*, model.decoder.*, model.shared.*)."""
    from transformers import BartConfig, BartForConditionalGeneration

    def build():
        torch.manual_seed(seed)
        return BartForConditionalGeneration(BartConfig(
            vocab_size=len(VOCAB), d_model=hidden, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=hidden * 2,
            decoder_ffn_dim=hidden * 2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
            decoder_start_token_id=3, forced_eos_token_id=3))

    return _save_dir(root, f"tiny-bart-{hidden}-{layers}", build, tiny_tokenizer())


# RoBERTa's pad id is 1 and its positions start at pad id + 1: the same words with [PAD] at id 1.
ROBERTA_VOCAB = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def tiny_roberta_dir(root: str, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    def build():
        torch.manual_seed(seed)
        return RobertaModel(RobertaConfig(
            vocab_size=len(ROBERTA_VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=hidden * 2, max_position_embeddings=64 + 2, pad_token_id=1, bos_token_id=2,
            eos_token_id=3), add_pooling_layer=False)

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(ROBERTA_VOCAB)}, do_lower_case=True)
    return _save_dir(root, f"tiny-roberta-{hidden}-{layers}", build, tok)


def tiny_conv_dir(root: str, arch: str = "resnet") -> str:
    """A transformers convolutional tower (ResNet or ConvNeXt, four stages), loaded as a feature-map backbone."""
    from transformers import ConvNextConfig, ConvNextModel, ResNetConfig, ResNetModel

    def build():
        torch.manual_seed(0)
        if arch == "resnet":
            return ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                            layer_type="basic"))
        return ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]))

    return _save_dir(root, f"tiny-{arch}", build)


def tiny_vilt_dir(root: str, hidden: int = 16, layers: int = 2, image_size: int = 32) -> str:
    """A vision-language backbone (ViLT): question tokens and image patches through the same layers."""
    from transformers import ViltConfig, ViltModel

    def build():
        torch.manual_seed(0)
        return ViltModel(ViltConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=2, intermediate_size=2 * hidden, image_size=image_size,
                                    patch_size=8, max_position_embeddings=40))

    path = _save_dir(root, f"tiny-vilt-{hidden}-{layers}-{image_size}", build, tiny_tokenizer())
    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        from transformers import ViltImageProcessor

        ViltImageProcessor(size={"shortest_edge": image_size}).save_pretrained(path)  # resizes the shortest edge
    return path


def tiny_swin_dir(root: str, embed_dim: int = 8, image_size: int = 32) -> str:
    """A hierarchical vision tower: every stage halves the tokens and doubles the width."""
    from transformers import SwinConfig, SwinModel

    def build():
        torch.manual_seed(0)
        return SwinModel(SwinConfig(image_size=image_size, patch_size=4, num_channels=3, embed_dim=embed_dim,
                                    depths=[1, 1], num_heads=[1, 2], window_size=2))

    return _save_dir(root, f"tiny-swin-{embed_dim}-{image_size}", build)


def tiny_causal_lm_dir(root: str, arch: str = "llama", hidden: int = 32, layers: int = 2, tie: bool = False,
                       seed: int = 0) -> str:
    """A tiny *ForCausalLM checkpoint (untied head unless `tie`) with the tiny tokenizer: [SEP] ends a text."""
    import transformers

    d = os.path.join(root, f"tiny-{arch}-lm-{hidden}-{layers}{'-tied' if tie else ''}")
    if os.path.isdir(d):
        return d
    os.makedirs(d)
    torch.manual_seed(seed)
    vocab = len(VOCAB)
    special = dict(tie_word_embeddings=tie, pad_token_id=0, eos_token_id=3, bos_token_id=2)
    if arch in ("llama", "qwen2"):
        config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
        model = model_cls(config_cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=2, num_key_value_heads=1, intermediate_size=hidden * 2,
                                     max_position_embeddings=128, **special))
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers,
                                                                     n_head=2, n_positions=128, **special))
    else:
        raise ValueError(arch)
    model.save_pretrained(d)
    tok = tiny_tokenizer()
    tok.eos_token = "[SEP]"
    tok.save_pretrained(d)
    return d
