"""One generation path for every method, against transformers' own generate on the frozen LLM (a fresh causal
UniPT is exactly it): greedy, sampling with its processors, beam search; beams and sampling with the caches equal
a full recompute on a trained-looking side network; stop strings, streaming, and `unipt generate` on JSONL."""
import io
import json

import pytest
import torch

from lm_helpers import left_padded, perturbed, write_pairs
from tiny_models import tiny_causal_lm_dir
from unipt_scale.config import ConfigError, load_config
from unipt_scale.generation import GenerationOptions, cut_at_stop, generate, generate_texts, prompt_budget
from unipt_scale.model import build_model

EOS, PAD = 3, 0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_causal_lm_dir(str(tmp_path_factory.mktemp("gen")), "llama")


def _cfg(model_dir, tmp_path, *extra):
    return load_config(None, [f"backbone.path={model_dir}", "task.kind=causal_lm", "data.source=jsonl",
                              f"data.path={write_pairs(tmp_path / 'pairs.jsonl', 32)}", "unipt.mapping_dim=8",
                              "data.batch_size=4", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}", *extra])


def _prompts():
    b = left_padded([[2, 15, 16, 17, 18, 19], [2, 21], [2, 30, 31, 32]], PAD)
    return b["input_ids"], b["attention_mask"]


def _until_eos(rows):
    out = []
    for row in rows.tolist():
        out.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return out


def _hf(model_dir):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("options", [
    dict(max_new_tokens=12),
    dict(max_new_tokens=12, num_beams=3),
    dict(max_new_tokens=10, num_beams=4, length_penalty=0.5, repetition_penalty=1.4),
    dict(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5),
    dict(max_new_tokens=12, temperature=1.5, seed=11),
], ids=["greedy", "beams", "beams-lp-rep", "sample-k-p-rep", "sample-hot"])
def test_a_fresh_unipt_model_generates_what_transformers_generates_for_the_frozen_llm(llama, tmp_path, options):
    model = build_model(_cfg(llama, tmp_path)).eval()
    ids, mask = _prompts()
    ours = generate(model, ids, mask, eos_token_id=EOS, **options)
    hf_kwargs = dict(max_new_tokens=options["max_new_tokens"], num_beams=options.get("num_beams", 1),
                     do_sample=options.get("temperature", 0) > 0, pad_token_id=PAD, eos_token_id=EOS,
                     repetition_penalty=options.get("repetition_penalty", 1.0),
                     length_penalty=options.get("length_penalty", 1.0))
    if hf_kwargs["do_sample"]:
        hf_kwargs.update(temperature=options["temperature"], top_k=options.get("top_k", 0),
                         top_p=options.get("top_p", 1.0))
        torch.manual_seed(options["seed"])  # transformers samples from the global generator; ours is seeded alike
    with torch.no_grad():
        theirs = _hf(llama).generate(input_ids=ids, attention_mask=mask, **hf_kwargs)[:, ids.shape[1]:]
    assert _until_eos(ours) == _until_eos(theirs)


@pytest.mark.parametrize("options", [dict(num_beams=3), dict(num_beams=2, length_penalty=2.0),
                                     dict(temperature=0.9, top_p=0.8, seed=3)], ids=["beams", "beams-lp", "sample"])
def test_cached_decoding_equals_full_recompute_on_a_trained_side_network(llama, tmp_path, options):
    model = perturbed(build_model(_cfg(llama, tmp_path))).eval()
    ids, mask = _prompts()
    fast = generate(model, ids, mask, eos_token_id=EOS, max_new_tokens=14, **options)
    slow = generate(model, ids, mask, eos_token_id=EOS, max_new_tokens=14, incremental=False, **options)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("form", [(), ("unipt.side_blocks=1",), ("method=ladder", "ladder.output=residual"),
                                  ("method=lora",)], ids=["unipt", "deep", "ladder", "lora"])
def test_a_chunked_prefill_is_the_whole_prompt_at_once(llama, tmp_path, form):
    from unipt_scale.generation import DecodingState

    model = perturbed(build_model(_cfg(llama, tmp_path, *form)), scale=0.05).eval()
    ids, mask = _prompts()  # the second row is 4 pads then 2 tokens: its first chunks are all padding
    whole = DecodingState(model, capacity=ids.shape[1]).next_logits(ids, mask, ids.shape[1])
    for chunk in (1, 4):
        state = DecodingState(model, capacity=ids.shape[1], prefill_chunk=chunk)
        torch.testing.assert_close(state.next_logits(ids, mask, ids.shape[1]), whole, rtol=1e-5, atol=1e-5)
        assert state.past.get_seq_length() == ids.shape[1]
    for options in (dict(), dict(num_beams=2)):
        assert torch.equal(generate(model, ids, mask, eos_token_id=EOS, max_new_tokens=8, prefill_chunk=4,
                                    **options),
                           generate(model, ids, mask, eos_token_id=EOS, max_new_tokens=8, **options))


def test_lora_generates_through_the_same_path(llama, tmp_path):
    model = perturbed(build_model(_cfg(llama, tmp_path, "method=lora")), scale=0.05).eval()
    ids, mask = _prompts()
    for options in (dict(num_beams=3), dict(temperature=0.8, top_k=5, seed=2)):
        fast = generate(model, ids, mask, eos_token_id=EOS, max_new_tokens=10, **options)
        slow = generate(model, ids, mask, eos_token_id=EOS, max_new_tokens=10, incremental=False, **options)
        assert torch.equal(fast, slow)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama, tmp_path):
    model = perturbed(build_model(_cfg(llama, tmp_path))).eval()
    ids, mask = _prompts()
    a = generate(model, ids, mask, max_new_tokens=10, temperature=1.0, seed=7)
    b = generate(model, ids, mask, max_new_tokens=10, temperature=1.0, seed=7)
    assert torch.equal(a, b)
    greedy = generate(model, ids, mask, max_new_tokens=10)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=10, temperature=1.0, top_k=1, seed=9), greedy)


def test_stop_strings_end_the_completion_before_the_string(llama, tmp_path):
    from unipt_scale.preprocessors import load_tokenizer

    cfg = _cfg(llama, tmp_path)
    model = perturbed(build_model(cfg)).eval()
    tokenizer = load_tokenizer(cfg.backbone)
    records = [{"prompt": "good movie"}, {"prompt": "bad day night"}]
    full = generate_texts(model, tokenizer, records, max_new_tokens=12)
    words = full[0].split()
    assert len(words) >= 4, full
    stop = words[2]  # a word the unstopped completion reaches
    cut = generate_texts(model, tokenizer, records, max_new_tokens=12, stop=[stop])
    assert cut == [cut_at_stop(text, [stop]).strip() for text in full]
    assert stop not in cut[0] and len(cut[0]) < len(full[0])
    # Streaming prints exactly the completions, one prompt at a time.
    sink = io.StringIO()
    streamed = generate_texts(model, tokenizer, records, max_new_tokens=12, stream=sink)
    assert streamed == full
    assert [line.strip() for line in sink.getvalue().splitlines()] == full


def test_a_long_prompt_leaves_room_for_the_completion_inside_the_trained_length(llama, tmp_path):
    from unipt_scale.data.lm import prompt_ids
    from unipt_scale.preprocessors import load_tokenizer

    assert (prompt_budget(192, 20), prompt_budget(192, 150), prompt_budget(7, 100)) == (172, 96, 4)
    cfg = _cfg(llama, tmp_path)
    model = perturbed(build_model(cfg)).eval()
    tokenizer = load_tokenizer(cfg.backbone)
    record = {"prompt": " ".join(["good movie happy night food bad day"] * 9)}
    assert len(prompt_ids(tokenizer, record, 10_000)) > 30
    got = generate_texts(model, tokenizer, [record], max_new_tokens=6, trained_length=30)
    # The same completion as from the prompt shortened by hand to 30 - 6 tokens, as training shortens prompts.
    ids = torch.tensor([prompt_ids(tokenizer, record, 24)])
    assert ids.shape[1] == 24
    new = generate(model, ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)[0].tolist()
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert got == [tokenizer.decode(new, skip_special_tokens=True).strip()]


@pytest.mark.parametrize("options, says", [
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(top_p=0.0, temperature=1.0), "--top-p"),
    (dict(top_k=5), "--temperature > 0"),
    (dict(num_beams=2, temperature=0.5), "deterministic"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"),
    (dict(stop=("",)), "--stop"),
    (dict(prefill_chunk=-1), "--prefill-chunk"),
])
def test_bad_options_are_refused_in_one_line(options, says):
    with pytest.raises(ConfigError, match=says):
        GenerationOptions(**options).check()


def test_unipt_generate_reads_and_writes_jsonl(llama, tmp_path, capsys):
    from unipt_scale.cli import main
    from unipt_scale.export import load_trained
    from unipt_scale.preprocessors import load_tokenizer

    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), f"backbone.path={llama}", "task.kind=causal_lm",
                 "data.source=jsonl", f"data.path={write_pairs(tmp_path / 'pairs.jsonl', 32)}", "unipt.mapping_dim=8",
                 "data.batch_size=4", "train.tensorboard=false", "train.max_steps=3", "data.max_length=32"]) == 0
    checkpoint = str(out / "checkpoint")
    records = [{"prompt": "good movie", "id": 1},
               {"messages": [{"role": "user", "content": "bad day"}], "id": 2},
               {"prompt": "happy night food", "id": 3}]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    target = tmp_path / "out.jsonl"
    capsys.readouterr()
    args = ["generate", "--checkpoint", checkpoint, "--input", str(source), "--output", str(target),
            "--batch-size", "2", "--max-new-tokens", "6", "--num-beams", "2"]
    assert main(args) == 0
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "completion"} for line in lines] == records
    model, cfg, _ = load_trained(checkpoint)
    want = generate_texts(model, load_tokenizer(cfg.backbone), records, max_new_tokens=6, num_beams=2,
                          trained_length=32)
    assert [line["completion"] for line in lines] == want
    # Without --output: JSON lines on stdout; with --stream: the completions as text.
    capsys.readouterr()
    assert main(["generate", "--checkpoint", checkpoint, "--max-new-tokens", "6", "good movie"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == generate_texts(
        model, load_tokenizer(cfg.backbone), [{"prompt": "good movie"}], max_new_tokens=6, trained_length=32)[0]


def test_several_checkpoints_decode_together_on_one_forward_per_step(llama, tmp_path, capsys, monkeypatch):
    """Two causal UniPT checkpoints of one backbone (other seeds, other taps): one backbone pass per decoding step
    for both, and each checkpoint's greedy completions are the ones it gives alone."""
    from unipt_scale.backbone import HFBackbone
    from unipt_scale.cli import main
    from unipt_scale.export import load_trained
    from unipt_scale.preprocessors import load_tokenizer
    from unipt_scale.serving import MultiModel

    pairs = write_pairs(tmp_path / "pairs.jsonl", 32)
    checkpoints = {}
    for name, extra in (("a", ["train.seed=0", "train.lr=1e-2"]),
                        ("b", ["train.seed=1", "unipt.layers=[0,2]", "train.lr=3e-2"])):
        out = tmp_path / name
        assert main(["train", "--output-dir", str(out), f"backbone.path={llama}", "task.kind=causal_lm",
                     "data.source=jsonl", f"data.path={pairs}", "unipt.mapping_dim=8", "data.batch_size=4",
                     "train.tensorboard=false", "train.max_steps=8", "data.max_length=32", *extra]) == 0
        checkpoints[name] = str(out / "checkpoint")
    records = [{"prompt": "good movie"}, {"prompt": "happy night food very"}, {"prompt": "bad"}]
    alone = {}
    for name, path in checkpoints.items():
        model, cfg, _ = load_trained(path)
        alone[name] = generate_texts(model, load_tokenizer(cfg.backbone), records, max_new_tokens=6,
                                     trained_length=32)
    assert alone["a"] != alone["b"], "the two checkpoints should not decode alike"

    calls = []
    real = HFBackbone.forward_cached
    monkeypatch.setattr(HFBackbone, "forward_cached", lambda bb, *a, **k: calls.append(1) or real(bb, *a, **k))
    together = MultiModel.load(checkpoints).generate(records, max_new_tokens=6)
    assert together == [{"a": a, "b": b} for a, b in zip(alone["a"], alone["b"])]
    assert len(calls) <= 6, "one backbone pass per step for both checkpoints"

    capsys.readouterr()
    args = ["generate", "--max-new-tokens", "6", *[f for n, p in checkpoints.items() for f in ("--checkpoint",
                                                                                                f"{n}={p}")]]
    assert main([*args, "good movie"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": "good movie", "completions": together[0]}
    assert main([*args, "--num-beams", "2", "good movie"]) == 2
    assert "greedily or by sampling" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["bad-json", "no-prompt", "missing-dir", "bad-option", "both"])
def test_unipt_generate_refuses_bad_input_before_loading(tmp_path, capsys, problem):
    from unipt_scale.cli import main

    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "fine"}\n' + {"bad-json": '{"prompt": \n', "no-prompt": '{"text": "x"}\n'}.get(
        problem, '{"prompt": "also fine"}\n'))
    args = ["generate", "--checkpoint", str(tmp_path / "no-such-checkpoint"), "--input", str(source)]
    if problem == "missing-dir":
        args += ["--output", str(tmp_path / "nowhere" / "out.jsonl")]
    if problem == "bad-option":
        args += ["--top-p", "1.5"]
    if problem == "both":
        args += ["a prompt"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    expected = {"bad-json": f"{source}:2", "no-prompt": f"{source}:2", "missing-dir": "does not exist",
                "bad-option": "--top-p", "both": "not both"}[problem]
    assert expected in err[0], err
    assert "no-such-checkpoint" not in err[0], "the input is checked before the checkpoint is opened"
