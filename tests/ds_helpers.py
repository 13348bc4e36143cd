"""What the multi-rank test modules share: subprocess runs through DeepSpeed's launcher on CPU (gloo), their
outputs, and the tiny keyword CSV they train on."""
import csv
import glob
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
import torch

from tiny_models import WORDS

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
RUN_TIMEOUT = 420


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_env():
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([HERE, env.get("PYTHONPATH", "")]))
    # DeepSpeed compiles its CPU ops (shared-memory comm, CPU Adam) on first use; one fixed cache for every run.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "unipt_scale",
                                                        "torch_extensions"))
    return env


def run(name, cmd, env=None, expect_ok=True, durations=None):
    """The subprocess `cmd` from the repository root; a failure or time-out fails the test with its output."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env or ds_env(), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or "")[-3000:] + (err.stderr or "")[-3000:]
        pytest.fail(f"{name} did not finish in {RUN_TIMEOUT} s:\n{output}")
    if durations is not None:
        durations[name] = time.time() - t0
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    if "--master_port" in cmd:  # a finished (or killed) run leaves no CPU all-reduce segment in /dev/shm
        port = cmd[cmd.index("--master_port") + 1]
        leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        assert not leaked, f"{name} left shared-memory segments behind: {leaked}"
    return proc


def deepspeed(*args):
    """DeepSpeed's launcher with 2 local ranks on 127.0.0.1."""
    return [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def metrics(out):
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh)


def losses(out):
    return torch.tensor([v for _, v in metrics(out)["train_loss"]], dtype=torch.float64)


def write_keyword_csv(path, n):
    """Random word strings labelled by the sign of their keyword score (pos / neg / mixed)."""
    rng = random.Random(0)
    pos, neg = {"good", "great", "happy", "love", "fine"}, {"bad", "awful", "sad", "hate", "not"}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
            score = sum(x in pos for x in words) - sum(x in neg for x in words)
            w.writerow([" ".join(words) + f" n{i}", "pos" if score > 0 else "neg" if score < 0 else "mixed"])
    return path
