"""Decoding with a causal_lm model, one path for every method: greedy, sampling (temperature, top-k, top-p,
repetition penalty), beam search, stop strings and streaming.

The token-choosing parts are transformers' own (its logits processors and its streamer); what is ours is the
decoding state: the backbone's KV cache and, for UniPT, the side network's cache, advanced one
position at a time and reordered between beams. Beam search follows transformers' beam search step for step
(length penalty, its early-stop heuristic, the finished-hypothesis pool), so a fresh UniPT model — exactly the
frozen LLM — returns what `model.generate(num_beams=K)` of that LLM returns.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from unipt_scale.config import ConfigError


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy (or beam search with num_beams > 1); > 0: sampling
    top_k: int = 0  # sampling: keep the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: keep the smallest set of tokens whose probability reaches p
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the completion
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: a finished beam's score is Σ log p / length ** length_penalty
    stop: Tuple[str, ...] = ()  # a completion ends at the first of these strings (which is not kept)
    seed: int = 0  # sampling
    # The prompt goes through the model this many positions at a time against the caches (0: all at once), so
    # its forward holds the tapped states of one chunk, not of the whole prompt; the result is the same.
    prefill_chunk: int = 0

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def check(self) -> "GenerationOptions":
        """One line naming the bad option and the fix, before any model is loaded."""
        problems = [(self.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
                    (self.temperature >= 0, "--temperature must be >= 0 (0 is greedy)"),
                    (self.top_k >= 0, "--top-k must be >= 0 (0 keeps every token)"),
                    (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
                    (self.repetition_penalty > 0, "--repetition-penalty must be > 0 (1 is none)"),
                    (self.num_beams >= 1, "--num-beams must be >= 1"),
                    (self.prefill_chunk >= 0, "--prefill-chunk must be >= 0 (0 runs the prompt at once)"),
                    (all(isinstance(s, str) and s for s in self.stop), "--stop takes non-empty strings")]
        for ok, message in problems:
            if not ok:
                raise ConfigError(message)
        if not self.sampling and (self.top_k or self.top_p < 1):
            raise ConfigError("--top-k / --top-p shape sampling: give --temperature > 0 with them (0 is greedy)")
        if self.num_beams > 1 and self.sampling:
            raise ConfigError("beam search here is deterministic: use --num-beams with --temperature 0, or sample "
                              "with --num-beams 1")
        return self


def logits_processors(options: GenerationOptions, attention_mask: Optional[torch.Tensor] = None):
    """transformers' processors for the options: the repetition penalty always (the left padding of each row, from
    `attention_mask`, is not a repetition), the warpers when sampling."""
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        padding = (attention_mask != 0).int().argmax(dim=1) if attention_mask is not None else None
        procs.append(RepetitionPenaltyLogitsProcessor(float(options.repetition_penalty), prompt_ignore_length=padding))
    if options.sampling:
        if options.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(options.temperature))
        if options.top_k:
            procs.append(TopKLogitsWarper(options.top_k))
        if options.top_p < 1.0:
            procs.append(TopPLogitsWarper(options.top_p))
    return procs


def _spans(n: int, new: int, chunk: int):
    """(start, end) of the last `new` of n positions, `chunk` at a time (0: all at once)."""
    step = chunk or new
    return [(start, min(start + step, n)) for start in range(n - new, n, step)]


class DecodingState:
    """The model's view of the sequences decoded so far: `next_logits` runs only the new positions against the
    caches (incremental) or the whole sequence again (the reference); `reorder` follows the beams."""

    def __init__(self, model, incremental: bool = True, capacity: Optional[int] = None, prefill_chunk: int = 0):
        self.capacity = capacity  # positions the side cache will hold by the end (its buffer is sized once)
        self.prefill_chunk = prefill_chunk
        self.encoder = model.encoder
        self.side = getattr(self.encoder, "side", None)
        self.backbone = self.encoder.backbone
        self.head = model.head_weight()
        self.incremental = incremental
        self.past = None  # the backbone's KV cache
        self.side_cache = None  # UniPT's SideCache

    def next_logits(self, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        """fp32 logits (B, V) of the position after `ids` (B, N), whose last `new` tokens the caches lack (the
        prompt in chunks of prefill_chunk positions)."""
        if not self.incremental:
            tokens, _ = self.encoder({"input_ids": ids, "attention_mask": mask})
            last = tokens[:, -1]
        else:
            for start, end in _spans(ids.shape[1], new, self.prefill_chunk):
                last = self._advance(ids[:, start:end], mask[:, :end])
        return self.logits(last)

    def logits(self, last: torch.Tensor) -> torch.Tensor:
        return F.linear(last.to(self.head.dtype), self.head).float()

    def _advance(self, step_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the new positions `step_ids` against the caches (extending them); the last position's output."""
        if self.side is not None:
            states, self.past = self.backbone.forward_cached(step_ids, mask, self.past)
            return self.side_last(states)
        y, self.past = _backbone_cached(self.backbone, step_ids, mask, self.past)
        return y[:, -1]

    def side_last(self, states) -> torch.Tensor:
        """The side network over the new positions' tapped states (extending its cache); the last one's output."""
        y, self.side_cache = self.side.step(states.hidden_states, states.mask, states.final, self.side_cache,
                                            capacity=self.capacity)
        return y[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        if self.past is not None:
            self.past.reorder_cache(rows)
        if self.side_cache is not None:
            self.side_cache = self.side_cache.select(rows)


class RoutedModels:
    """Causal-LM models built on views of one shared frozen backbone (unipt_scale.serving.MultiModel), each row
    of a batch decoded by the model `owners[row]` names: rows of one batch may belong to different checkpoints."""

    def __init__(self, models: Sequence, owners: torch.Tensor):
        self.models, self.owners = list(models), owners
        for m in self.models:
            if getattr(m.encoder, "side", None) is None or not hasattr(m.encoder.backbone, "_shared"):
                raise ConfigError("several checkpoints decode on one forward when each is a UniPT or ladder model "
                                  "built on a shared backbone (serving.MultiModel); generate with the others alone")

    def eval(self) -> "RoutedModels":
        for m in self.models:
            m.eval()
        return self

    def parameters(self):
        return self.models[0].parameters()


class SharedDecodingState:
    """Decoding for RoutedModels: each step runs the frozen backbone once over every row (one KV cache, the union
    of the models' tapped layers), then each model's side network and head over its own rows."""

    def __init__(self, routed: RoutedModels, capacity: Optional[int] = None, prefill_chunk: int = 0):
        self.states = [DecodingState(m, True, capacity, prefill_chunk) for m in routed.models]
        self.backbone = routed.models[0].encoder.backbone._shared.backbone
        self.layers = sorted(set().union(*(st.backbone.layer_indices for st in self.states)))
        where = {layer: i for i, layer in enumerate(self.layers)}
        self.slots = [[where[i] for i in st.backbone.layer_indices] for st in self.states]  # each model's taps
        self.rows = [torch.nonzero(routed.owners == k).flatten() for k in range(len(routed.models))]
        self.prefill_chunk = prefill_chunk
        self.past = None

    def next_logits(self, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        from unipt_scale.backbone import BackboneOutput

        self.backbone.tap(self.layers)
        for start, end in _spans(ids.shape[1], new, self.prefill_chunk):
            out, self.past = self.backbone.forward_cached(ids[:, start:end], mask[:, :end], self.past)
            last = [st.side_last(BackboneOutput([out.hidden_states[j][rows] for j in slots], out.mask[rows],
                                                out.final[rows]))
                    for st, rows, slots in zip(self.states, self.rows, self.slots)]
        logits = [st.logits(x) for x, st in zip(last, self.states)]
        full = logits[0].new_empty(ids.shape[0], logits[0].shape[-1])
        for rows, part in zip(self.rows, logits):
            full[rows] = part
        return full


def _backbone_cached(backbone, step_ids, mask, past):
    """The plain decoder (LoRA, full fine-tuning, the frozen model) over new tokens with its KV cache."""
    from unipt_scale.backbone import cache_argument, cache_of

    n = step_ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -n:]
    out = backbone.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{cache_argument(backbone.model): past})
    return out.last_hidden_state, cache_of(out)


class StopStrings:
    """Which rows' completions contain a stop string, checked on the decoded text of the new tokens (any
    tokenizer: transformers' StopStringCriteria cannot read the vocabulary of every tokenizer, word-level ones
    among them, and a stop string may span tokens)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, tuple(stops), prompt_len

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(ids[:, self.prompt_len:].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=ids.device)


def _options(options: Optional[GenerationOptions], fields: dict) -> GenerationOptions:
    options = options or GenerationOptions()
    if fields:
        if "stop" in fields:
            fields = {**fields, "stop": tuple(fields["stop"] or ())}
        options = dataclasses.replace(options, **fields)
    return options.check()


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             options: Optional[GenerationOptions] = None, *, eos_token_id: Optional[int] = None, tokenizer=None,
             incremental: bool = True, streamer=None, generator: Optional[torch.Generator] = None,
             **option_fields) -> torch.Tensor:
    """New tokens (B, ≤ max_new_tokens) after left-padded prompts; a row that ended (eos or a stop string)
    continues with eos. Options come as a GenerationOptions or as its fields (`max_new_tokens=16, num_beams=4`).
    `tokenizer` is needed for stop strings; `streamer` (a transformers streamer: put/end) receives the prompt and
    then each new token (batch size 1, no beams)."""
    options = _options(options, option_fields)
    model.eval()
    # The last new token is produced, never fed back: the caches end at prompt + max_new_tokens - 1 positions.
    capacity = input_ids.shape[1] + options.max_new_tokens - 1
    if isinstance(model, RoutedModels):
        if options.num_beams > 1 or streamer is not None or not incremental:
            raise ConfigError("several checkpoints decode together greedily or by sampling, with the caches: drop "
                              "--num-beams / --stream, or generate with each checkpoint alone")
        state = SharedDecodingState(model, capacity, options.prefill_chunk)
    else:
        state = DecodingState(model, incremental, capacity=capacity, prefill_chunk=options.prefill_chunk)
    if options.stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    stops = StopStrings(tokenizer, options.stop, input_ids.shape[1]) if options.stop else None
    if options.num_beams > 1:
        if streamer is not None:
            raise ConfigError("streaming shows one sequence as it grows; beam search keeps several: drop --stream "
                              "or --num-beams")
        return _beam_search(state, input_ids, attention_mask.long(), options, eos_token_id, stops)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ConfigError("streaming prints one completion at a time: use --batch-size 1 with --stream")
    if options.sampling and generator is None:
        generator = torch.Generator(device=input_ids.device).manual_seed(options.seed)
    return _sample(state, input_ids, attention_mask.long(), options, eos_token_id, stops, generator, streamer)


def _sample(state, ids, mask, options, eos, stops, generator, streamer) -> torch.Tensor:
    processors = logits_processors(options, mask)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out: List[torch.Tensor] = []
    if streamer is not None:
        streamer.put(ids.cpu())
    new = ids.shape[1]
    for _ in range(options.max_new_tokens):
        scores = processors(ids, state.next_logits(ids, mask, new))
        if options.sampling:
            nxt = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)
        else:
            nxt = scores.argmax(-1)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out.append(nxt)
        if streamer is not None:
            streamer.put(nxt.cpu())
        ended = nxt == eos if eos is not None else torch.zeros_like(done)
        if stops is not None:
            ended |= stops(ids)
        done |= ended
        if bool(done.all()):
            break
        new = 1
    if streamer is not None:
        streamer.end()
    return torch.stack(out, 1)


def _beam_search(state, ids, mask, options, eos, stops) -> torch.Tensor:
    """transformers' beam search (its `_beam_search`, default flags: early_stopping=False), over our caches."""
    batch, beams = ids.shape[0], options.num_beams
    prompt_len = ids.shape[1]
    max_len = prompt_len + options.max_new_tokens
    keep = max(2, 1 + (eos is not None)) * beams
    device = ids.device
    fill = eos if eos is not None else 0
    processors = logits_processors(options, mask.repeat_interleave(beams, 0))

    running = torch.full((batch, beams, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = ids[:, None]
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9  # the first step expands beam 0 only
    finished_scores = torch.full((batch, beams), -1e9, device=device)
    finished_lengths = torch.full((batch, beams), max_len, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_beams = torch.arange(keep, device=device) < beams
    offsets = torch.arange(batch, device=device)[:, None] * beams
    mask = mask.repeat_interleave(beams, 0)
    cur, new = prompt_len, prompt_len
    while cur < max_len:
        flat = running[:, :, :cur].reshape(batch * beams, cur)
        log_probs = processors(flat, F.log_softmax(state.next_logits(flat, mask, new), -1))
        vocab = log_probs.shape[-1]
        accumulated = (log_probs.view(batch, beams, vocab) + running_scores[..., None]).view(batch, -1)
        topk_scores, topk_index = accumulated.topk(keep, dim=-1)
        source = topk_index // vocab
        candidates = running.gather(1, source[..., None].expand(-1, -1, max_len)).clone()
        candidates[:, :, cur] = topk_index % vocab
        hits = torch.full((batch, keep), cur + 1 >= max_len, dtype=torch.bool, device=device)
        if eos is not None:
            hits |= candidates[:, :, cur] == eos
        if stops is not None:
            hits |= stops(candidates[:, :, :cur + 1].reshape(batch * keep, -1)).view(batch, keep)

        # The best `beams` candidates that did not end continue.
        live_scores = topk_scores + hits.float() * -1e9
        chosen = live_scores.topk(beams, dim=-1).indices
        running = candidates.gather(1, chosen[..., None].expand(-1, -1, max_len))
        running_scores = live_scores.gather(1, chosen)
        rows = (source.gather(1, chosen) + offsets).reshape(-1)

        # Candidates among the top `beams` that ended join the finished pool if they beat its worst.
        ended = hits & top_beams[None]
        scored = topk_scores / ((cur + 1 - prompt_len) ** options.length_penalty)
        scored = scored + (~improvable).float() * -1e9 + (~ended).float() * -1e9
        pool_scores = torch.cat([finished_scores, scored], 1)
        best = pool_scores.topk(beams, dim=-1).indices
        finished = torch.cat([finished, candidates], 1).gather(1, best[..., None].expand(-1, -1, max_len))
        finished_scores = pool_scores.gather(1, best)
        finished_lengths = torch.cat([finished_lengths, torch.full_like(scored, cur + 1, dtype=torch.long)],
                                     1).gather(1, best)
        is_finished = torch.cat([is_finished, ended], 1).gather(1, best)

        state.reorder(rows)
        mask = torch.cat([mask[rows], torch.ones_like(mask[:, :1])], 1)
        cur, new = cur + 1, 1
        best_possible = running_scores[:, :1] / ((cur - prompt_len) ** options.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values,
                                     torch.full_like(best_possible, -1e9))
        improvable &= (best_possible > worst_finished).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()):
            break
    length = int(finished_lengths[:, 0].max()) - prompt_len
    out = finished[:, 0, prompt_len:prompt_len + length].clone()
    for b in range(batch):  # a shorter best hypothesis is padded with eos, as the sampling path pads ended rows
        out[b, int(finished_lengths[b, 0]) - prompt_len:] = fill
    return out


def _left_padded(rows: Sequence[Sequence[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = torch.tensor(list(r), dtype=torch.long), 1
    return ids, mask


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (a completion never carries the string that ended it)."""
    at = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:at] if at >= 0 else text


def prompt_budget(trained_length: int, max_new_tokens: int) -> int:
    """Tokens a prompt keeps so that prompt and completion stay within the length the model was trained at.

    A side network with positions of its own (unipt.side_blocks, the ladder's blocks) never saw a later position,
    and training data cut to data.max_length put every response's end at the same place: a deep side network
    trained on such data and handed a prompt of max_length tokens ends its completion at once. At least half the
    trained length stays for the prompt."""
    return max(trained_length - max_new_tokens, (trained_length + 1) // 2)


def generate_texts(model, tokenizer, records: Sequence[dict], options: Optional[GenerationOptions] = None, *,
                   batch_size: int = 8, trained_length: Optional[int] = None, stream=None,
                   **option_fields) -> List:
    """Completions of records ({"prompt"} or {"messages"}), rendered with the chat template as in training, batched
    with left padding. With `trained_length` (the checkpoint's data.max_length) a long prompt is shortened as
    training shortens it, to prompt_budget. `stream` (a text file such as sys.stdout) prints each completion as it
    grows (one prompt at a time).

    `model` may be a {name: model} of checkpoints on one shared backbone (serving.MultiModel): every prompt then
    goes to every checkpoint, all of them decoded on one frozen forward per step, and each record's completion is a
    {name: text}."""
    from unipt_scale.data.lm import prompt_ids, render_prompt

    options = _options(options, option_fields)
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    names = list(model) if isinstance(model, dict) else None
    first = model[names[0]] if names else model
    device = next(first.parameters()).device
    generator = torch.Generator(device=device).manual_seed(options.seed) if options.sampling else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    step = 1 if stream is not None else batch_size
    budget = prompt_budget(trained_length, options.max_new_tokens) if trained_length else None
    texts = []
    for s in range(0, len(records), step):
        if budget:
            rows = [prompt_ids(tokenizer, r, budget) for r in records[s:s + step]]
        else:
            rows = [tokenizer(render_prompt(tokenizer, r), add_special_tokens=False)["input_ids"]
                    for r in records[s:s + step]]
        ids, mask = _left_padded(rows, pad)
        streamer = _TextStream(tokenizer, stream) if stream is not None else None
        decoder = model
        if names:  # every prompt once per checkpoint, the checkpoints' rows side by side in one batch
            k = len(names)
            ids, mask = ids.repeat(k, 1), mask.repeat(k, 1)
            decoder = RoutedModels([model[n] for n in names], torch.arange(k).repeat_interleave(len(rows)))
        new = generate(decoder, ids.to(device), mask.to(device), options, eos_token_id=tokenizer.eos_token_id,
                       tokenizer=tokenizer, streamer=streamer, generator=generator)
        done = []
        for row in new.tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            done.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), options.stop).strip())
        if names:
            done = [{n: done[j * len(rows) + i] for j, n in enumerate(names)} for i in range(len(rows))]
        texts.extend(done)
    return texts


class _TextStream:
    """transformers' TextStreamer (word-boundary-safe incremental decoding) writing to a given file."""

    def __init__(self, tokenizer, file):
        from transformers import TextStreamer

        class _To(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                file.write(text + ("\n" if stream_end else ""))
                file.flush()

        self._streamer = _To(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def put(self, value):
        self._streamer.put(value)

    def end(self):
        self._streamer.end()
