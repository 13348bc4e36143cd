"""`unipt` command line: train, eval, predict, info, plan, shards, bench."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

# Nothing is ever fetched from a model hub: the package works offline by design.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from unipt_scale.config import ConfigError, config_help, dump_config, load_config  # noqa: E402
from unipt_scale.host_memory import retain_freed_memory  # noqa: E402

log = logging.getLogger("unipt_scale")
BENCHES = ("kernels", "data", "methods", "quality", "headlines", "quantization", "generate", "shared")


def _quiet_libraries():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    from unipt_scale.quantization import quiet_bitsandbytes

    quiet_bitsandbytes()


def _config_args(p: argparse.ArgumentParser):
    p.add_argument("--config", help="YAML run config (defaults: the embedded MiniLM + tweets demo)")
    p.add_argument("--output-dir", help="where the run writes (overrides output_dir)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-4")


def _remote_code_arg(p: argparse.ArgumentParser):
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers import and run the Python code a model directory ships (auto_map); "
                        "never enabled by a config or checkpoint file")


def _load(args, extra=()) -> "RunConfig":  # noqa: F821
    overrides = list(args.overrides) + list(extra)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def _another_rank() -> bool:
    """Under DeepSpeed every rank returns the same result, and rank 0 alone prints it."""
    return int(os.environ.get("RANK", "0")) != 0


def cmd_train(args) -> int:
    if args.help_config:
        print(config_help())
        return 0
    cfg = _load(args)
    if args.print_config:
        print(dump_config(cfg))
        return 0
    if cfg.tasks:
        return _train_tasks(cfg, args)
    from unipt_scale.trainer import train

    metrics = train(cfg, trust_remote_code=args.trust_remote_code)
    if metrics.get("world_size", 1) > 1 and _another_rank():
        return 0
    print(f"wrote {os.path.join(cfg.output_dir, 'metrics.json')}")
    test = metrics.get("test") or {}
    if "majority_rate" in test:
        print(f"test accuracy {test['accuracy']:.4f}  (majority-class rate {test['majority_rate']:.4f}, "
              f"{test['num_samples']} samples)  trainable {metrics['trainable_params']:,} / frozen "
              f"{metrics['frozen_params']:,} params, {metrics['wall_time_s']:.0f} s")
    elif test:
        print("test " + "  ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
    return 0


def _train_tasks(cfg, args) -> int:
    from unipt_scale.multitask import TASKS_JSON, train_tasks

    result = train_tasks(cfg, trust_remote_code=args.trust_remote_code)
    if _another_rank():
        return 0 if all(r["status"] == "completed" for r in result["tasks"]) else 3
    for row in result["tasks"]:
        test = row.get("test") or {}
        shown = "  ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
        print(f"{row['name']}: {row['status']}" + (f"  test {shown}" if shown else f" ({row.get('reason', '')})"))
    print(f"{len(result['tasks'])} tasks in {len(result['groups'])} lockstep group(s) on one backbone, "
          f"{result['wall_time_s']:.0f} s; wrote {os.path.join(cfg.output_dir, TASKS_JSON)}")
    return 0 if all(r["status"] == "completed" for r in result["tasks"]) else 3


def cmd_sweep(args) -> int:
    from unipt_scale.sweep import SWEEP_JSON, run_sweep

    result = run_sweep(args.config, args.overrides, args.grid, args.output_dir, args.trust_remote_code)
    if _another_rank():
        return 0 if all(r["status"] == "completed" for r in result["variants"]) else 3
    rule = result["selection"]
    metric = rule["metric"]
    print(f"{'variant':<40} {'status':<9} {'val ' + metric:>14} {'test ' + metric:>14}")
    for row in result["variants"]:
        val = (row.get("val") or {}).get(metric)
        test = (row.get("test") or {}).get(metric)
        print(f"{row['name']:<40} {row['status']:<9} {'' if val is None else f'{val:.4f}':>14} "
              f"{'' if test is None else f'{test:.4f}':>14}")
    chosen = result["chosen"] or f"none (no variant has a validation {metric})"
    print(f"chosen on val {metric} ({rule['mode']}): {chosen}")
    print(f"{len(result['variants'])} variants on {result['frozen_forwards']} frozen forwards, "
          f"{result['wall_time_s']:.0f} s; wrote {os.path.join(os.path.abspath(args.output_dir), SWEEP_JSON)}")
    return 0 if all(r["status"] == "completed" for r in result["variants"]) else 3


def _tokenizer(cfg, trust_remote_code: bool):
    from unipt_scale.preprocessors import load_tokenizer

    return load_tokenizer(cfg.backbone, trust_remote_code=trust_remote_code)


def _device():
    """Where eval / predict / generate run; a quantized backbone is built there directly (bitsandbytes
    quantizes on the device it loads to), so the model is never moved across devices after loading."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cmd_eval(args) -> int:
    from unipt_scale.atomic import atomic_write_json
    from unipt_scale.export import load_trained
    from unipt_scale.trainer import build_run_data, evaluate

    device = _device()
    model, cfg, meta = load_trained(args.checkpoint, args.overrides, device=device,
                                    trust_remote_code=args.trust_remote_code)
    data = build_run_data(cfg, trust_remote_code=args.trust_remote_code)
    saved = meta.get("label_names") or []
    if saved and data.label_names and list(data.label_names) != list(saved):
        raise ConfigError(f"the data's classes ({len(data.label_names)}: {', '.join(data.label_names[:4])}, ...) are "
                          f"not the ones the checkpoint was trained on ({len(saved)}: {', '.join(saved[:4])}, ...); "
                          "evaluate on shards written with the same classes (the same training split)")
    loader = {"val": data.val, "test": data.test, "train": data.train}[args.split]
    if loader is None:
        raise ConfigError(f"the {args.split} split is empty for this data config")
    metrics = evaluate(model, loader, None, args.split, device=device)
    print(json.dumps({args.split: metrics}, indent=2))
    if args.json:
        atomic_write_json(args.json, {args.split: metrics, "checkpoint": os.path.abspath(args.checkpoint)})
    return 0


def cmd_predict(args) -> int:
    if len(args.checkpoint) > 1:
        return _predict_many(args)
    import torch

    from unipt_scale.data import text_collate
    from unipt_scale.export import load_trained
    from unipt_scale.tasks.classification import ClassificationModel

    device = _device()
    model, cfg, meta = load_trained(args.checkpoint[0], device=device, trust_remote_code=args.trust_remote_code)
    if not isinstance(model, ClassificationModel):
        raise ConfigError("unipt predict serves classification checkpoints")
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    batch = text_collate(_tokenizer(cfg, args.trust_remote_code), cfg.data.max_length)([{"text": t} for t in texts])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    names = meta.get("label_names") or [str(i) for i in range(probs.shape[-1])]
    for t, p in zip(texts, probs):
        print(json.dumps({"text": t, "label": names[int(p.argmax())], "probability": round(float(p.max()), 4)}))
    return 0


def _named_checkpoints(items) -> dict:
    """--checkpoint [NAME=]DIR, repeated: {name: directory}."""
    from unipt_scale.serving import checkpoint_name

    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or os.path.isdir(item):  # no NAME=: named after its output directory
            name, path = checkpoint_name(item), item
        if name in named:
            raise ConfigError(f"two checkpoints are named {name!r}; name them: --checkpoint NAME=DIR")
        named[name] = path
    return named


def _generate_many(args, records, options) -> list:
    """Several causal-LM checkpoints of one backbone decoding together, one frozen forward per step: per record,
    {name: completion}."""
    from unipt_scale.serving import MultiModel

    if args.stream or options.num_beams > 1:
        raise ConfigError("several checkpoints decode together greedily or by sampling: drop --stream and "
                          "--num-beams, or generate with each checkpoint alone")
    mm = MultiModel.load(_named_checkpoints(args.checkpoint), device=_device(),
                         trust_remote_code=args.trust_remote_code)
    return mm.generate(records, options, batch_size=args.batch_size)


def _predict_many(args) -> int:
    """Several checkpoints of one backbone, one frozen forward per batch (unipt_scale.serving)."""
    from unipt_scale.serving import MultiModel

    mm = MultiModel.load(_named_checkpoints(args.checkpoint), device=_device(),
                         trust_remote_code=args.trust_remote_code)
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for start in range(0, len(texts), args.batch_size):
        chunk = texts[start:start + args.batch_size]
        for text, preds in zip(chunk, mm.classify(chunk)):
            print(json.dumps({"text": text, "predictions": {n: {"label": p["label"],
                                                                "probability": round(p["probability"], 4)}
                                                            for n, p in preds.items()}}))
    return 0


def _generation_options(args):
    from unipt_scale.generation import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                             length_penalty=args.length_penalty, stop=tuple(args.stop), seed=args.seed,
                             prefill_chunk=args.prefill_chunk).check()


def _writable_file(path: str, flag: str) -> str:
    """Checked before the model loads: the output can be written where it is asked for."""
    path = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: the directory {parent} is not writable")
    return path


def cmd_generate(args) -> int:
    from unipt_scale.atomic import atomic_write_text
    from unipt_scale.data.lm import read_prompt_records
    from unipt_scale.export import load_trained
    from unipt_scale.generation import generate_texts
    from unipt_scale.tasks.causal_lm import CausalLMModel

    options = _generation_options(args)
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.input and args.prompts:
        raise ConfigError("give prompts either with --input FILE.jsonl or as arguments, not both")
    if args.input:
        records = read_prompt_records(args.input)
    else:
        records = [{"prompt": p} for p in (list(args.prompts) or [line.rstrip("\n") for line in sys.stdin
                                                                    if line.strip()])]
    if not records:
        raise ConfigError("no prompt: give --input FILE.jsonl, prompts as arguments, or one per line on stdin")
    output = _writable_file(args.output, "--output") if args.output else None
    device = _device()
    if len(args.checkpoint) > 1:
        key, texts = "completions", _generate_many(args, records, options)
    else:
        model, cfg, _meta = load_trained(args.checkpoint[0], device=device, trust_remote_code=args.trust_remote_code)
        if not isinstance(model, CausalLMModel):
            raise ConfigError("unipt generate serves task.kind=causal_lm checkpoints; this one is "
                              f"task.kind={cfg.task.kind}")
        key, texts = "completion", generate_texts(model, _tokenizer(cfg, args.trust_remote_code), records, options,
                                                  batch_size=args.batch_size, trained_length=cfg.data.max_length,
                                                  stream=sys.stdout if args.stream else None)
    lines = [json.dumps({**record, key: text}, ensure_ascii=False) for record, text in zip(records, texts)]
    if output:
        atomic_write_text(output, "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} completions to {output}", file=sys.stderr)
    elif not args.stream:
        for line in lines:
            print(line)
    return 0


def cmd_info(args) -> int:
    from unipt_scale.tasks import build_model
    from unipt_scale.trained import count_parameters, trained_state_keys
    from unipt_scale.quantization import frozen_weight_bytes

    cfg = _load(args)
    num_classes = cfg.task.num_classes
    if cfg.task.kind in ("classification", "vqa") and not num_classes:  # the head's size comes from the data
        from unipt_scale.data import num_classes_of

        num_classes = num_classes_of(cfg.data)
    model = build_model(cfg, num_classes=num_classes, trust_remote_code=args.trust_remote_code)
    counts = count_parameters(model)
    params = dict(model.named_parameters())
    trained = [k for k in trained_state_keys(model) if k in params]
    encoder_keys = [k for k in trained if ".side." in f".{k}" or ".backbone." in f".{k}"]
    side = sum(params[k].numel() for k in encoder_keys if ".side." in f".{k}")
    adapted = sum(params[k].numel() for k in encoder_keys if ".backbone." in f".{k}")
    info = {"method": cfg.method, **counts, "side_network_params": side, "backbone_trained_params": adapted,
            "head_params": counts["trainable_params"] - side - adapted,
            "trainable_share": counts["trainable_params"] / max(1, counts["trainable_params"] + counts["frozen_params"])}
    encoders = [m for m in model.modules() if m.__class__.__name__ == "UniPTEncoder"]
    if encoders:
        info["tapped_layers"] = [e.backbone.layer_indices for e in encoders]
        info["mapping_dim"] = [e.side.mapping_dim for e in encoders]
    towers = [("backbone", cfg.backbone)] + ([("image_backbone", cfg.image_backbone)] if cfg.image_backbone else [])
    info["quantization"] = {key: bb.quantization for key, bb in towers}
    # Resident bytes of every frozen weight as loaded (quantized codes and their scales counted from storage).
    info["frozen_weight_bytes"] = frozen_weight_bytes(model)
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        from unipt_scale.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, (text + "\n").encode("utf-8"))
    return 0


def _delegate(module: str, argv: List[str]) -> int:
    import importlib

    return importlib.import_module(module).main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipt", description="UniPT side-network tuning of frozen backbones")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a side network (no arguments: the offline MiniLM demo)")
    _config_args(t)
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--help-config", action="store_true", help="list every config key with its help")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    _remote_code_arg(t)
    t.set_defaults(func=cmd_train)

    w = sub.add_parser("sweep", help="train every variant of a grid (learning rates, seeds, side-network settings) "
                                     "on one frozen forward per batch")
    w.add_argument("--config", help="YAML run config shared by every variant")
    w.add_argument("--output-dir", required=True, help="D: each variant writes D/<variant>/, the sweep D/sweep.json")
    w.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", required=True,
                   help="a swept key and its values (repeatable; the variants are every combination), e.g. "
                        "--grid train.lr=1e-4,3e-4 --grid train.seed=0,1,2")
    w.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides shared by every variant; train.resume=auto continues a stopped sweep (every "
                        "variant from the newest step all of them have a checkpoint of); deepspeed.enabled=true "
                        "under the deepspeed launcher trains every variant on the ranks (ZeRO 0-2)")
    _remote_code_arg(w)
    w.set_defaults(func=cmd_sweep)

    e = sub.add_parser("eval", help="evaluate a checkpoint written by `unipt train`")
    e.add_argument("--checkpoint", required=True, help="OUTPUT_DIR/checkpoint of a training run")
    e.add_argument("--split", default="test", choices=["val", "test", "train"])
    e.add_argument("--json", help="also write the metrics to this file")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.eval_batch_size=256")
    _remote_code_arg(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("predict", help="classify texts with a checkpoint (arguments, or one per line on stdin)")
    r.add_argument("--checkpoint", required=True, action="append", metavar="[NAME=]DIR",
                   help="OUTPUT_DIR/checkpoint of a classification run; repeat it to serve several checkpoints of "
                        "one backbone from one frozen forward per batch (unipt, ladder, linear_probe)")
    r.add_argument("--batch-size", type=int, default=64, help="texts per forward (several checkpoints)")
    r.add_argument("texts", nargs="*")
    _remote_code_arg(r)
    r.set_defaults(func=cmd_predict)

    g = sub.add_parser("generate", help="complete prompts with a causal_lm checkpoint (JSONL, arguments or stdin)")
    g.add_argument("--checkpoint", required=True, action="append", metavar="[NAME=]DIR",
                   help="OUTPUT_DIR/checkpoint of a task.kind=causal_lm run; repeat it for several checkpoints of "
                        "one backbone, decoded together on one frozen forward per step (greedy or sampling; each "
                        "record then gets `completions`: {name: text})")
    g.add_argument("--input", metavar="FILE.jsonl", help='one {"prompt": ...} or {"messages": [...]} object per line '
                                                          "(rendered with the chat template, as in training)")
    g.add_argument("--output", metavar="FILE.jsonl", help='each input object with its "completion", written '
                                                           "atomically (default: JSON lines on stdout)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left-padded)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (greedy scoring)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length ** this")
    g.add_argument("--stop", action="append", default=[], metavar="S",
                   help="end a completion at this string (repeatable; the string is not kept)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    g.add_argument("--prefill-chunk", type=int, default=0, metavar="N",
                   help="run each prompt through the model N positions at a time (0 = all at once): the same "
                        "completions, with the prompt's forward holding one chunk's states")
    g.add_argument("--stream", action="store_true", help="print each completion to stdout as it is generated, "
                                                           "one prompt at a time")
    g.add_argument("prompts", nargs="*")
    _remote_code_arg(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="trainable / frozen parameter counts and frozen weight bytes of a config")
    _config_args(i)
    i.add_argument("--json", metavar="FILE", help="also write the report to this file")
    _remote_code_arg(i)
    i.set_defaults(func=cmd_info)

    for name, module, helptext in (("plan", "unipt_scale.plan", "per-GPU memory plan: UniPT vs LoRA vs full"),
                                   ("shards", "unipt_scale.data.shards", "write WebDataset shards")):
        d = sub.add_parser(name, help=helptext, add_help=False)
        d.add_argument("rest", nargs=argparse.REMAINDER)
        d.set_defaults(func=lambda a, m=module: _delegate(m, a.rest))
    b = sub.add_parser("bench", help="benchmarks: `unipt bench kernels|data|methods|quality|headlines|quantization|"
                                     "generate ...`")
    b.add_argument("what", choices=list(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=lambda a: _delegate(f"unipt_scale.bench.{a.what}", a.rest))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the guard: a reader that went away (`| head`) surfaces here, not at exit
        return code
    except BrokenPipeError:
        # The reader closed the pipe: nothing more to print, and no traceback. stdout goes to devnull so the
        # interpreter's own flush at exit does not raise again; 141 is what a shell reports for SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _quiet_libraries()
    retain_freed_memory()
    # Commands that own their argument parsing get their arguments untouched (argparse's REMAINDER would
    # refuse a leading option such as `unipt plan --help`).
    delegated = {"plan": "unipt_scale.plan", "shards": "unipt_scale.data.shards"}
    rest = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if rest and rest[0] in delegated:
        return _delegate(delegated[rest[0]], rest[1:])
    if len(rest) > 1 and rest[0] == "bench" and rest[1] in BENCHES:
        return _delegate(f"unipt_scale.bench.{rest[1]}", rest[2:])
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "local_rank", None) is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        return args.func(args) or 0
    except ConfigError as err:
        print(f"unipt: config error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as err:
        print(f"unipt: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a readable one-liner for the known errors; full traceback otherwise
        from unipt_scale.assets import AssetError
        from unipt_scale.backbone import BackboneLoadError
        from unipt_scale.trainer import NonFiniteError

        if isinstance(err, NonFiniteError):
            print(f"unipt: {_one_line(err)}", file=sys.stderr)
            return 3
        if isinstance(err, (BackboneLoadError, AssetError)):
            print(f"unipt: {_one_line(err)}", file=sys.stderr)
            return 2
        raise


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
