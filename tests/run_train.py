"""`unipt train` in a subprocess that a test can crash: --kill-after-step=K SIGKILLs the process right after
optimizer step K (what a scheduler's kill -9 or the OOM killer does). Usage: run_train.py [--kill-after-step=K]
KEY=VALUE ..."""
import logging
import os
import signal
import sys

from unipt_scale.config import load_config
from unipt_scale.trainer import Callback, train


class KillAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    argv = sys.argv[1:]
    kills = [KillAfter(int(a.split("=", 1)[1])) for a in argv if a.startswith("--kill-after-step=")]
    train(load_config(None, [a for a in argv if not a.startswith("--")]), callbacks=kills)
