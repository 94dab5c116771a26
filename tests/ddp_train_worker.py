"""One rank of the 2-process training run of tests/test_train.py (started by torchrun).

argv: a JSON TrainConfig and a folder; the rank's first-step gradients (as the optimiser sees
them, after DDP's all-reduce) and final weights and EMA are saved there as ``rank<r>.pt``, so
that the test can compare the ranks with each other and with one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from camixer_fast.train import TrainConfig, Trainer


def main() -> None:
    torch.set_num_threads(1)
    config = TrainConfig(**json.loads(sys.argv[1]))
    trainer = Trainer(config)
    first_grads: dict[str, torch.Tensor] = {}

    def record(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not first_grads:
            first_grads.update({name: p.grad.detach().clone()
                                for name, p in trainer.model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(record)
    try:
        trainer.run()
        torch.save({"params": trainer.model.state_dict(), "ema": trainer.ema.state,
                    "grads": first_grads, "world_size": trainer.dist.world_size},
                   Path(sys.argv[2]) / f"rank{trainer.dist.rank}.pt")
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
