"""train.py for torchrun in the tests, reporting what each rank did: `torchrun ... tests/ddp_probe.py
REPORT_DIR TRAIN_ARGS...` runs train.main(TRAIN_ARGS) and writes REPORT_DIR/rank-R.pt with the
keys of every training batch that rank stepped on (augmented batches, in order) and its model's
final parameters (its BatchNorm buffers follow its own last batch, so they may differ), so a test can compare the ranks with each other, not only rank 0's last.pt."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # torchrun puts tests/, not the root, first

import torch  # noqa: E402

import train  # noqa: E402
from pipeline import Batch  # noqa: E402

batches, models = [], []
to_device = Batch.to


def recording_to(batch, *args, **kwargs):
    if batch.augmented:  # a training batch (validation and the baselines' fit read un-augmented ones)
        batches.append(list(batch["key"]))
    return to_device(batch, *args, **kwargs)


class RecordingUNet(train.UNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        models.append(self)


if __name__ == "__main__":
    report, argv = Path(sys.argv[1]), sys.argv[2:]
    Batch.to = recording_to
    train.UNet = RecordingUNet  # the model train.py trains (preflight sizes its own)
    status = train.main(argv)
    (model,) = models
    torch.save({"batches": batches, "parameters": {name: value.detach().cpu() for name, value in
                                                   model.named_parameters()}},
               report / f"rank-{os.environ['RANK']}.pt")
    sys.exit(status)
