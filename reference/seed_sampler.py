"""The original samplers, re-implemented in plain Python as the baseline.

Behaviour as recorded for the original utilities: a list bag with
random.choice + list.remove for PoolSampler (quadratic per round), a whole
permutation for RandomSampler (torch.randperm when torch is installed, else
random.shuffle), greedy packing for BatchedOrderedSampler (a limit of 0 means
no limit, both 0 is an error).  A reference of the tests, and the baseline
of bench/bench_sampler.py (both import it from here).
"""
import random

try:
    import torch
except ImportError:  # pragma: no cover - the bench also runs without torch
    torch = None


class PoolSampler:
    def __init__(self, pool=[], keep_all=False, shuffle=False):  # noqa: B006
        self.length = len(pool)
        self.shuffle = shuffle
        self.global_pool = pool if keep_all else None
        self.global_indices = list(range(self.length))
        self.reset()

    def reset(self):
        self.current_pool = list(self.global_indices)
        if self.shuffle:
            random.shuffle(self.current_pool)

    def sample(self, pool=None):
        if pool is None:
            pool = self.global_pool
        index = random.choice(self.current_pool)
        self.current_pool.remove(index)
        if len(self.current_pool) == 0:
            self.reset()
        return pool[index] if pool is not None else index

    __call__ = sample

    def __len__(self):
        return self.length

    def index(self):
        return self.length - len(self.current_pool)

    def get_state(self):
        return {"length": self.length, "global_pool": self.global_pool,
                "global_indices": list(self.global_indices), "current_pool": list(self.current_pool)}

    def set_state(self, state):
        self.length = state["length"]
        self.global_pool = state["global_pool"]
        self.global_indices = list(state["global_indices"])
        self.current_pool = list(state["current_pool"])


class OrderedSampler:
    def __init__(self, length):
        self.position = 0
        self.length = length

    def __len__(self):
        return self.length

    def index(self):
        return self.position

    def __iter__(self):
        if self.position >= self.length:
            self.position = 0
        while self.position < self.length:
            yield self.position
            self.position += 1

    def get_state(self):
        return {"position": self.position, "length": self.length}

    def set_state(self, state):
        self.position = state["position"]
        self.length = state["length"]


class BatchedOrderedSampler:
    def __init__(self, buckets, max_duration=0, max_batch_size=0, shuffle=False, drop_last=True,
                 use_max_size=True):
        if max_duration == 0 and max_batch_size == 0:
            raise ValueError("max_duration and max_batch_size cannot both be 0")
        self.position = 0
        self.batches = []
        self.shuffle = shuffle
        batch, size, index = [], 0, 0
        for _key, bucket in buckets.items():
            for _path, duration in bucket:
                flush = False
                if max_duration > 0 and size + duration > max_duration:
                    flush = True
                elif max_batch_size > 0 and len(batch) >= max_batch_size:
                    flush = True
                if flush and len(batch) > 0:
                    self.batches.append(batch)
                    batch, size = [], 0
                batch.append(index)
                index += 1
                size = duration * len(batch) if use_max_size else size + duration
        if not drop_last and batch:
            self.batches.append(batch)
        if self.shuffle:
            random.shuffle(self.batches)

    def __len__(self):
        return len(self.batches)

    def index(self):
        return self.position

    def __iter__(self):
        if self.position >= len(self.batches):
            self.position = 0
            if self.shuffle:
                random.shuffle(self.batches)
        while self.position < len(self.batches):
            yield self.batches[self.position]
            self.position += 1

    def get_state(self):
        return {"position": self.position, "batches": [list(b) for b in self.batches]}

    def set_state(self, state):
        self.position = state["position"]
        self.batches = [list(b) for b in state["batches"]]


class RandomSampler:
    def __init__(self, length):
        self.position = 0
        self.length = length
        if torch is not None:
            self.generator = torch.Generator()
            self.perm = torch.randperm(length, generator=self.generator)
        else:
            self.generator = random.Random()
            self.perm = list(range(length))
            self.generator.shuffle(self.perm)

    def _new_perm(self):
        if torch is not None:
            self.perm = torch.randperm(self.length, generator=self.generator)
        else:
            self.perm = list(range(self.length))
            self.generator.shuffle(self.perm)

    def __len__(self):
        return self.length

    def index(self):
        return self.position

    def __iter__(self):
        if self.position >= self.length:
            self.position = 0
            self._new_perm()
        while self.position < self.length:
            yield self.perm[self.position]
            self.position += 1

    def get_state(self):
        gen = self.generator.get_state() if torch is not None else self.generator.getstate()
        return {"position": self.position, "length": self.length, "perm": self.perm, "generator": gen}

    def set_state(self, state):
        self.position = state["position"]
        self.length = state["length"]
        self.perm = state["perm"]
        if torch is not None:
            self.generator.set_state(state["generator"])
        else:
            self.generator.setstate(state["generator"])
