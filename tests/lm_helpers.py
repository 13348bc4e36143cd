"""What the decoder test modules share: prompt/response JSONL, left-padded batches and a trained-looking side
network (a fresh one adds exactly zero, which would make most checks trivial)."""
import json

import torch

WORDS = ["good", "bad", "movie", "food", "day", "night", "happy", "sad"]


def write_pairs(path, n=48) -> str:
    """n prompt/response records of the tiny vocabulary (the response is the prompt reversed)."""
    with open(path, "w") as fh:
        for i in range(n):
            w = [WORDS[(i + k) % len(WORDS)] for k in range(3)]
            fh.write(json.dumps({"prompt": " ".join(w), "response": " ".join(reversed(w))}) + "\n")
    return str(path)


def left_padded(rows, pad=0) -> dict:
    """input_ids / attention_mask of token-id lists, padded on the left as decoder batches are."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}


def perturbed(model, scale=0.2, seed=1):
    """The model with random noise added to what it trains."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
