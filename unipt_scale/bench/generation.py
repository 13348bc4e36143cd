"""Generated text scored against references, shared by `bench headlines` and the causal-LM suite of
`bench quality`: greedy completions of prompt/response records (unipt_scale.generation.generate_texts, the prompts
rendered as in training) and their ROUGE-L F1 (rouge-score, stemmed) and exact match against the responses.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence


def rouge_l(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """Mean ROUGE-L F1 (rouge-score's RougeScorer, Porter stemmer) and the share of predictions equal to their
    reference up to case and whitespace."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    exact = [" ".join(p.lower().split()) == " ".join(r.lower().split()) for p, r in zip(predictions, references)]
    n = max(1, len(scores))
    return {"rougeL": sum(scores) / n, "exact_match": sum(exact) / n, "num_samples": len(scores)}


def generate_scored(model, tokenizer, records: Sequence[dict], max_new_tokens: int,
                    trained_length: Optional[int], batch_size: int = 8) -> dict:
    """Greedy completions of `records` by a CausalLMModel, scored against each record's response:
    {"scores": rouge_l(...), "predictions", "references", "generate_s"}."""
    from unipt_scale.generation import generate_texts

    t0 = time.perf_counter()
    predictions = generate_texts(model, tokenizer, list(records), max_new_tokens=max_new_tokens,
                                 trained_length=trained_length, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    references = [r["response"] for r in records]
    return {"scores": rouge_l(predictions, references), "predictions": predictions, "references": references,
            "generate_s": seconds}
