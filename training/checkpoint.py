"""Checkpoints: one dict with everything needed to predict and to resume exactly, and the
snapshot of a train.py run that goes into it (and back, on --resume).

Written atomically and durably (temporary file in the same folder, fsync, rename, fsync of the
folder: pipeline.schema.replace_durably), so a crash or power loss while saving leaves the
previous checkpoint intact, never a truncated one.
"""

import io
import random
from pathlib import Path

import numpy as np
import torch

from model import UNet, UNetConfig
from pipeline.schema import replace_durably

from . import UserError
from .run import Progress

FORMAT = "bgfg-unet-checkpoint/1"  # tells our checkpoints apart from any other .pt file


def rng_states() -> dict:
    """The generators a run may draw from on the host. The CUDA generators are left out: nothing
    in a run draws from them (the augmentation is drawn in the workers from per-sample seeds), a
    state per visible GPU would tie the checkpoint to that many GPUs, and reading them would
    start CUDA in a `--device cpu` run."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_states(states: dict) -> None:
    """Restore rng_states(); a "cuda" entry (checkpoints of earlier versions) is ignored."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save(path: Path, state: dict) -> None:
    """Write `state` (plus the format tag) to `path` atomically; a failed write (disk full)
    raises UserError and leaves no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        # Serialised in memory first (the checkpoint's size, ~130 MB at the default width): torch's
        # own file writer reports a full disk as "unexpected pos 768 vs 662", a write() says why.
        data = io.BytesIO()
        torch.save({"format": FORMAT, **state}, data)
        with open(tmp, "wb") as f:
            f.write(data.getbuffer())
        replace_durably(str(tmp), str(path))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path}: {err.strerror or err}") from None


def load(path: Path | str, map_location="cpu") -> dict:
    """Read a checkpoint written by `save`; a missing or foreign file raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold argparse values, numpy RNG state etc., not just tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged or non-torch file
        raise UserError(f"checkpoint {path} cannot be read: {type(err).__name__}: {err}".splitlines()[0]) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    return state


def model_from_checkpoint(state: dict) -> UNet:
    """Rebuild the network a checkpoint was trained with and load its weights."""
    model = UNet(UNetConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model


def check_same_model(state: dict, config: UNetConfig, path: Path) -> None:
    """Refuse to resume a run with a checkpoint made for a different network."""
    # Through from_dict: a field added since the checkpoint was made takes its default.
    if UNetConfig.from_dict(state["model_config"]) != config:
        raise UserError(
            f"checkpoint {path} was made for model {state['model_config']}, "
            f"this run builds {config.to_dict()} (pass the same --width, --difference-input and --task-heads, or another --out)"
        )


# --- train.py's run (training.run.Setup and Progress) to a checkpoint and back ----------
def snapshot(setup, progress) -> dict:
    """The checkpoint of where the run is: weights, optimizer, schedule, RNG and data position."""
    args = setup.args
    return {
        "model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(), "scaler": setup.scaler.state_dict(),
        **progress.state_dict(),
        # Storage options may hold credentials: keep their names only.
        "args": {**vars(args), "storage_options": sorted(args.storage_options or {})},
        "model_config": setup.config.to_dict(), "image_size": args.image_size,
        "rng": rng_states(),
    }


def resume(setup) -> Progress:
    """Load OUT/last.pt into the run's model, optimizer, schedule and RNG; returns its position."""
    path = setup.out / "last.pt"
    state = load(path)
    check_same_model(state, setup.config, path)
    setup.model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] or not setup.scaler.is_enabled():
        setup.scaler.load_state_dict(state["scaler"])
    else:  # a run without fp16 saves an empty scaler state, which an enabled GradScaler refuses
        setup.say("note: last.pt was not trained with --amp fp16: its loss scale starts afresh")
    restore_rng_states(state["rng"])
    progress = Progress.from_state_dict(state)
    setup.say(f"resumed from {path} at step {progress.step} (epoch {progress.epoch}, batch {progress.batch_in_epoch})")
    if progress.loader_state is not None:
        # Checked against these shards and seed now (a PipelineError naming what differs), and
        # the rest of the epoch planned for this run's ranks, workers and batch size.
        where = setup.train_data.epoch(state=progress.loader_state).state_dict()
        was = progress.loader_state["segments"][-1]["world_size"]
        setup.say(f"resumed epoch {where['epoch']} at sample {where['samples_done']} of {where['epoch_samples']} "
                  f"on {setup.ctx.world_size} ranks (was {was} ranks)")
    return progress
