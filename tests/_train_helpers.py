"""What the in-process training-loop tests share: a minimal engine, a quiet
config, and the reader of a one-rank checkpoint.  Import after
``pytest.importorskip("torch")``."""
import os

import torch

import mlutils.train as mt


class CountEngine:
    """A minimal Engine: records its batches, state is a tensor and the step."""

    def __init__(self):
        self.seen, self.lr, self._step = [], 1.0, 0
        self.w = torch.zeros(3)
        self.quitted = False

    @property
    def global_step(self):
        return self._step

    def train_step(self, batch):
        self.seen.append(int(batch))
        self.w += batch
        self._step += 1
        return {"loss": 1.0 / self._step, "lr": self.lr}

    def state_dict(self):
        return {"w": self.w, "step": self._step, "seen": list(self.seen)}

    def load_state_dict(self, s):
        self.w, self._step, self.seen = s["w"].clone(), int(s["step"]), list(s["seen"])

    def export(self):
        return {"w": self.w.clone()}

    def set_lr(self, lr):
        self.lr = lr

    def quit(self):
        self.quitted = True


def cfg(tmp_path, **kw):
    """A TrainConfig checkpointing into tmp_path, without commands, progress bar or stdout metrics
    (each can be turned on by keyword)."""
    kw.setdefault("checkpoint_dir", str(tmp_path))
    kw.setdefault("read_commands", False)
    kw.setdefault("progress", False)
    return mt.TrainConfig(metrics_stdout=False, **kw)


def load_rank0(folder):
    return torch.load(os.path.join(folder, "rank-00000-of-00001.pt"), weights_only=True)
