"""Checkpoints: safetensors for tensors, JSON/YAML for everything else, written atomically.

A checkpoint is a folder `checkpoints/step-00001000/` written under a temporary name and
renamed when complete, so a crash during a save leaves the previous checkpoints intact.
Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cmgen.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
DONE_FILE = "state.json"  # written last: a folder without it is not a checkpoint


def environment_info() -> dict:
    """Package versions and the git revision, stored with every run and checkpoint."""
    versions = {}
    for pkg in ("cmgen", "torch", "diffusers", "accelerate", "safetensors", "numpy", "scipy", "torchvision"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    rev = None
    try:
        here = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if rev and dirty:
            rev += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "git_revision": rev}


# ----------------------------------------------------------------------------- optimizer state

def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and a JSON part."""
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for pid, st in state_dict["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
                meta["state"][str(pid)][name] = {"tensor": f"{pid}.{name}"}
            else:
                meta["state"][str(pid)][name] = {"value": value}
    return tensors, meta


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- writing

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    recipe_yaml: str, extra_files: dict[str, str] | None = None) -> Path:
    """Write `checkpoints/step-N/` atomically: tensors[name] -> name.safetensors, state -> state.json."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tdict in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tdict.items()}, str(tmp / f"{name}.safetensors"))
    for name, text in (extra_files or {}).items():
        _write_text(tmp / name, text)
    _write_text(tmp / "recipe.yaml", recipe_yaml)
    _write_text(tmp / "environment.json", json.dumps(environment_info(), indent=2))
    _write_text(tmp / DONE_FILE, json.dumps(state, indent=2))
    for f in tmp.iterdir():
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): replace atomically
        old = ckpt_root / f".old-step-{step:08d}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / DONE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints and any stale temporary folders."""
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for p in root.glob(".tmp-step-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- reading

def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((Path(ckpt) / DONE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not a cmgen state")
        return state
    except FileNotFoundError:
        raise UserError(f"'{ckpt}' is not a cmgen checkpoint (no {DONE_FILE}); pass a run folder or a "
                        "checkpoints/step-N folder") from None
    except (ValueError, UnicodeDecodeError):   # JSONDecodeError is a ValueError
        raise UserError(f"checkpoint '{ckpt}' has a corrupt {DONE_FILE}; resume from an older checkpoint") from None


def read_weights(path) -> object:
    """A weight file someone else made: .safetensors, else a torch file read with weights_only=True (tensors and
    plain containers, never arbitrary pickled objects). Errors propagate: each caller words its own sentence."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only; a truncated or foreign file is a one-line error, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, use an older one")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"'{path}' is not a valid safetensors file ({str(exc).splitlines()[0][:80]}); "
                        "it may be truncated or not a cmgen checkpoint") from None
