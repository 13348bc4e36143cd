"""`unipt bench generate`: decoding speed of a causal_lm model against the frozen model's own transformers generate.

Systems, each greedy, 64 new tokens by default, no early stop (every row decodes every token):
* `frozen` — transformers' `generate` of the decoder itself (AutoModelForCausalLM), the serving cost to match;
* `unipt` — causal UniPT over every tapped layer (`unipt.layers=all`) through unipt_scale.generation;
* `unipt-every3` — causal UniPT tapping every third layer;
* `unipt-deep` — the deep causal side network (`unipt.side_blocks=2`) over every tapped layer;
* `lora` — LoRA adapters unmerged (through unipt_scale.generation);
* `lora-merged` — the same adapters merged into the weights (what LoRA serving costs once merged).
Every (batch size, prompt length) shape runs all systems in turn, `--repeats` times interleaved, so drift of the
machine reaches each system alike; the medians give tokens/s and the ratio of each system's time to `frozen`'s.

    unipt bench generate --json F [--backbone builtin:smollm2-135m] [--batch-sizes 1,8] [--prompt-lengths 128,512]
        [--new-tokens 64] [--repeats 3] [--systems frozen,unipt,unipt-every3,unipt-deep,lora,lora-merged] [--threads 2]
        [--quick]

The side networks and adapters are freshly initialised (the cost of decoding does not depend on the trained
values). `--quick` builds a tiny random-init Llama in a temporary directory (the test).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

SYSTEMS = ("frozen", "unipt", "unipt-every3", "unipt-deep", "lora", "lora-merged")


def _parse_ints(text: str, flag: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated whole numbers, e.g. 1,8") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: give comma-separated whole numbers >= 1")
    return values


def _tiny_llama(root: str) -> str:
    import torch
    import transformers

    path = os.path.join(root, "tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                                      pad_token_id=0, eos_token_id=2, bos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(96)}, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", eos_token="w2",
                                         bos_token="w1").save_pretrained(path)
    return path


def _models(backbone: str, systems: List[str]):
    """{system: model} built the package's way (build_model), plus the frozen transformers model."""
    import torch
    from transformers import AutoModelForCausalLM

    from unipt_scale.backbone import _resolve_path
    from unipt_scale.config import load_config
    from unipt_scale.tasks import build_model

    base = [f"backbone.path={backbone}", "task.kind=causal_lm", "data.source=jsonl", "data.path=unused.jsonl"]
    built = {}
    for system in systems:
        if system == "frozen":
            path, _ = _resolve_path(load_config(None, base).backbone)
            built[system] = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True,
                                                                 dtype=torch.float32).eval()
            continue
        extra = {"unipt": ["unipt.layers=all"], "unipt-every3": ["unipt.layers=every:3"],
                 "unipt-deep": ["unipt.layers=all", "unipt.side_blocks=2"],
                 "lora": ["method=lora"], "lora-merged": ["method=lora"]}[system]
        model = build_model(load_config(None, base + extra)).eval()
        if system == "lora-merged":
            merged = 0
            for module in model.modules():
                if hasattr(module, "merge") and hasattr(module, "lora_A"):
                    module.merge()
                    merged += 1
            if not merged:
                raise RuntimeError("no LoRA layer to merge")
        built[system] = model
    return built


def _decode(system: str, model, ids, mask, new_tokens: int):
    import torch

    from unipt_scale.generation import generate

    with torch.no_grad():
        if system == "frozen":
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=model.config.pad_token_id or 0)[:, ids.shape[1]:]
        return generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=None)


def run(args) -> dict:
    import torch

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ValueError(f"--systems: unknown {unknown or 'empty list'}; choose from {','.join(SYSTEMS)}")
    batch_sizes = _parse_ints(args.batch_sizes, "--batch-sizes")
    prompt_lengths = _parse_ints(args.prompt_lengths, "--prompt-lengths")
    if args.new_tokens < 1 or args.repeats < 1:
        raise ValueError("--new-tokens and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    # Ratios move when other jobs share the cores: the load average around the run says whether they did.
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="unipt-bench-generate-") as work:
            models = _models(_tiny_llama(work), systems)  # loaded into memory: the files can go
        backbone = None
    else:
        backbone = args.backbone
        models = _models(backbone, systems)
    load_s = time.perf_counter() - t0
    vocab = models[systems[0]].config.vocab_size if systems[0] == "frozen" else \
        models[systems[0]].backbone.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    times: Dict[tuple, List[float]] = {}
    outputs = {}
    for _ in range(args.repeats):
        for batch in batch_sizes:
            for length in prompt_lengths:
                ids = torch.randint(4, vocab, (batch, length), generator=gen)
                mask = torch.ones_like(ids)
                for system in systems:
                    start = time.perf_counter()
                    out = _decode(system, models[system], ids, mask, args.new_tokens)
                    times.setdefault((system, batch, length), []).append(time.perf_counter() - start)
                    outputs[(system, batch, length)] = tuple(out.shape)
    rows = []
    for batch in batch_sizes:
        for length in prompt_lengths:
            frozen = statistics.median(times[("frozen", batch, length)]) if "frozen" in systems else None
            for system in systems:
                median = statistics.median(times[(system, batch, length)])
                shape = outputs[(system, batch, length)]
                if shape != (batch, args.new_tokens):
                    raise RuntimeError(f"{system} decoded {shape}, not ({batch}, {args.new_tokens})")
                rows.append({"system": system, "batch": batch, "prompt_tokens": length, "new_tokens": args.new_tokens,
                             "seconds_median": median, "seconds": times[(system, batch, length)],
                             "tokens_per_second": batch * args.new_tokens / median,
                             "time_vs_frozen": median / frozen if frozen else None})
    return {"backbone": "tiny random-init Llama (--quick)" if args.quick else backbone, "rows": rows,
            "repeats": args.repeats, "threads": args.threads, "load_seconds": load_s, "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg()) if load_start else None,
            "machine": f"{platform.node() or 'host'} ({os.cpu_count()} cpus), torch {torch.__version__}"}


def format_rows(result: dict) -> str:
    lines = [f"{'system':<14}{'batch':>6}{'prompt':>8}{'tok/s':>10}{'s (median)':>12}{'vs frozen':>11}"]
    if result.get("loadavg_start"):
        lines.insert(0, f"# load average at start {result['loadavg_start'][0]:.2f}, at end "
                        f"{result['loadavg_end'][0]:.2f} (ratios are only meaningful with the cores otherwise idle)")
    for r in result["rows"]:
        ratio = f"{r['time_vs_frozen']:.2f}x" if r["time_vs_frozen"] is not None else "-"
        lines.append(f"{r['system']:<14}{r['batch']:>6}{r['prompt_tokens']:>8}{r['tokens_per_second']:>10.1f}"
                     f"{r['seconds_median']:>12.3f}{ratio:>11}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="unipt bench generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="builtin:smollm2-135m", help="a decoder (backbone.path)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-lengths", default="128,512")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("--quick", action="store_true", help="a tiny random-init Llama (CI)")
    args = p.parse_args(argv)
    from unipt_scale.assets import AssetError
    from unipt_scale.backbone import BackboneLoadError
    from unipt_scale.config import ConfigError

    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            print(f"unipt bench generate: --json {args.json}: the directory {parent} does not exist",
                  file=sys.stderr)
            return 2
    try:
        result = run(args)
    except (ValueError, BackboneLoadError, AssetError, ConfigError) as err:
        print(f"unipt bench generate: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(format_rows(result))
    if args.json:
        from unipt_scale.atomic import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
