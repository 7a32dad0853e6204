"""Exports: the engines' weights as a safetensors file beside the checkpoints, in the export dtype, with
the step, the dtype and the user's metadata (e.g. the model config) in the file's metadata."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from ..io import torch_save
from .config import TrainConfig, export_dtype

__all__ = ["write_export"]

log = logging.getLogger("mlutils.train")


def write_export(engines: Any, cfg: TrainConfig, step: int, leader: bool) -> Optional[str]:
    """Write ``export-<step>.safetensors`` (global leader; every rank takes the weights, as a sharded
    engine must gather them); its path, or None when nothing was written."""
    out_dir = cfg.export_dir or cfg.checkpoint_dir
    if out_dir is None:
        if leader:
            log.warning("export: no export_dir or checkpoint_dir configured")
        return None
    tensors = engines.export()
    if not leader:
        return None
    dtype = export_dtype(cfg.export_dtype) if cfg.export_dtype is not None else None
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"export-{step:08d}.safetensors")
    meta = dict(cfg.export_metadata or {})
    meta.update(step=step, dtype=str(dtype).replace("torch.", "") if dtype is not None else "as trained")
    torch_save({"module": tensors, **meta}, path)
    log.info("exported %d tensors to %s", len(tensors), path)
    return path
