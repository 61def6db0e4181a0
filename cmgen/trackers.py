"""TensorBoard / Weights & Biases through accelerate's trackers (`train.log_with`).

The trackers receive the rows metrics.jsonl receives (and eval.jsonl's numbers as `eval/<key>`), at the
same steps, with the flattened recipe as the run's config. A resume never leaves a step twice:
TensorBoard is opened with `purge_step` = the checkpoint's step + 1, which hides whatever a crashed run
logged after its last checkpoint; W&B continues the same run id (stored in the run folder) and keeps
the first copy of a re-logged step, which the keyed RNG makes equal to the second.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from pathlib import Path
from typing import Optional

from cmgen.errors import UserError

log = logging.getLogger("cmgen")

CHOICES = ("none", "tensorboard", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_name(value: str) -> Optional[str]:
    """accelerate's `log_with` for the recipe value; a one-line error if unknown or not installed."""
    if value not in CHOICES:
        raise UserError(f"recipe key 'train.log_with' must be one of {', '.join(CHOICES)}, got '{value}'")
    if value == "none":
        return None
    if importlib.util.find_spec(PACKAGE[value]) is None:
        raise UserError(f"train.log_with={value} needs the {PACKAGE[value]} package: "
                        f"pip install 'cmgen[{value}]', or set train.log_with=none")
    return value


def flat_config(recipe) -> dict:
    """The recipe as one level of dotted keys with scalar values (what trackers accept as a config)."""
    from cmgen.recipe import recipe_to_dict
    from cmgen.state import _flat

    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in _flat(recipe_to_dict(recipe))}


def wandb_settings(out: Path, name: str, env=os.environ) -> dict:
    """wandb.init arguments: the run id kept in the run folder (a resume continues that run) and offline
    mode unless WANDB_MODE says otherwise or credentials exist (never a prompt, never a hang)."""
    id_file = out / "wandb-run-id"
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12])
    mode = env.get("WANDB_MODE")
    if mode is None:
        netrc = Path(env.get("NETRC", Path.home() / ".netrc"))
        has_key = bool(env.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        mode = "online" if has_key else "offline"
        if mode == "offline":
            log.info("wandb: no WANDB_API_KEY, logging offline under %s (wandb sync to upload)", out / "wandb")
    return {"dir": str(out), "name": name, "id": id_file.read_text().strip(), "resume": "allow", "mode": mode}


def start_trackers(acc, recipe, out: Path, step: int) -> bool:
    """init_trackers for the recipe's `train.log_with` (main process); returns whether any is on."""
    which = tracker_name(recipe.train.log_with)
    if which is None:
        return False
    if acc.is_main_process:
        if which == "tensorboard":
            project, kwargs = "tensorboard", {"purge_step": step + 1}  # events in out/tensorboard/
        else:
            project, kwargs = os.environ.get("WANDB_PROJECT", "cmgen"), wandb_settings(out, recipe.name)
        acc.init_trackers(project, config=flat_config(recipe), init_kwargs={which: kwargs})
    return True
