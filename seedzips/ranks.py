"""The composer's ranks under torchrun: which zips each labels, and waiting for the others.

`torchrun --nproc_per_node=N -m seedzips.compose ...` starts N processes; rank r labels the
zips whose number is r modulo N on its own GPU (cuda:LOCAL_RANK), so no two ranks write one
file. Rank 0 alone prepares the folder and keeps compose.json; every other rank records its
finished zips in compose.rank-R.json, which rank 0 folds in once all are done (or, after a
crash, at the next run's start, whatever the rank count then).
"""

import datetime
import os

# A rank that finishes early waits for the slowest at the end: labelling a seed-sized dataset
# takes hours, far past the default 30 minutes.
_WAIT = datetime.timedelta(hours=48)


class Ranks:
    """This process's rank, the world size and local rank (0, 1, 0 without torchrun)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        self._dist = None
        self.label = f" (rank {self.rank}/{self.world})" if self.world > 1 else ""  # in what it prints

    def start(self) -> None:
        """Join the ranks' gloo group (torch is imported by then: the depth model needs it)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo", timeout=_WAIT)
            self._dist = dist

    def mine(self, names: list) -> list:
        """The zips of `names` (in batch order) this rank writes."""
        return [name for number, name in enumerate(names) if number % self.world == self.rank]

    def wait_for_all(self) -> None:
        if self._dist is not None:
            self._dist.barrier()

    def close(self) -> None:
        if self._dist is not None:
            self._dist.destroy_process_group()
            self._dist = None
