"""Evaluation: eval_fn at a step boundary (on every rank or the global leader only; its error raised or
logged), its metrics line, a stop signal that cuts it short, and the ranking of best checkpoints."""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

from .checkpoint import rng_state, write_best_pointer
from .output import plain

__all__ = ["evaluate"]

log = logging.getLogger("mlutils.train")


def evaluate(loop: Any) -> bool:
    """Run eval_fn(step, should_stop) and log its metrics as a JSON line {"step", "eval": {...}}.

    Returns True when a stop signal came during it (a collective: every
    rank gets here at the same points).  Such an evaluation may be cut
    short: its line says ``"interrupted": true``, and the checkpoint the
    loop then writes holds the RNG states from before it and asks the
    resumed run to evaluate this step again first, so the resumed run
    continues exactly as an uninterrupted one.  With ``eval_on="leader"``
    only the global leader runs eval_fn (its should_stop is then local)."""
    if loop.eval_fn is None:
        if loop.leader:
            log.warning("eval: no eval_fn given to train()")
        return False
    rng_before = rng_state(loop.data.generator)
    result = None
    if loop.cfg.eval_on == "all" or loop.leader:
        stop = loop.should_stop if loop.cfg.eval_on == "all" else (lambda: loop.signals.name is not None)
        try:
            result = loop.eval_fn(loop.step, stop)
            if result is not None and not isinstance(result, Mapping):
                raise TypeError(f"eval_fn returned {type(result).__name__} {result!r}; it must return a "
                                f"mapping of metrics (or None)")
        except Exception:
            if loop.cfg.eval_errors == "raise":
                raise
            log.exception("eval_fn failed at step %d (TrainConfig.eval_errors='log': training goes on)",
                          loop.step)
            result = None
    interrupted = loop.should_stop()
    if interrupted:
        loop.eval_pending_rng = rng_before
    if result is not None:
        loop.eval_metrics = dict(result)
        record: Dict[str, Any] = {"step": loop.step, "eval": loop.eval_metrics}
        if interrupted:
            record["interrupted"] = True
        loop.out.emit(record, loop.step)
    if loop.best.k and not interrupted:
        _rank_evaluation(loop, result)
    return interrupted

def _rank_evaluation(loop: Any, result: Optional[Mapping[str, Any]]) -> None:
    """keep_best: the leader's value of best_metric ranks this step; a new best is checkpointed now."""
    value = loop.best.value_of(plain(result)) if loop.leader else None
    if loop.ckpt.world > 1:
        value = loop.dist.broadcast_object(value, src=0)
    if value is not None and loop.best.offer(value, loop.step):
        if loop.leader:
            log.info("step %d is among the %d best by %s (%s)", loop.step, loop.best.k, loop.best.metric,
                     value)
        if loop.ckpt.last_step == loop.step:  # its checkpoint exists: only the pointer moves
            if loop.leader and loop.cfg.checkpoint_dir is not None:
                loop.ckpt.saver.wait()
                write_best_pointer(loop.cfg.checkpoint_dir, loop.best.pointer())
        else:
            loop.save(sync=False)
