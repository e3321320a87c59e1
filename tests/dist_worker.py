"""One process of a distributed test run (tests/test_distributed.py): the fake judge, then the trainer.

``python tests/dist_worker.py key=value ...`` trains as one process; under ``torchrun`` every rank
runs it. ``--resume RUN_DIR key=value ...`` continues a run. At the end each rank writes its
parameters to ``RUN_DIR/params-rank{R}.safetensors``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import fake_judge  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from spice_fast.train import Trainer, make_config, resume_config  # noqa: E402
from spice_fast.train.distributed import init_distributed, shutdown  # noqa: E402


def main(argv: list[str]) -> None:
    fake_judge.install()
    ctx = init_distributed()
    resume = argv[:1] == ["--resume"]
    config = resume_config(argv[1], argv[2:]) if resume else make_config(overrides=argv)
    trainer = Trainer(config, ctx=ctx, resume=resume)
    trainer.train()
    state = {k: v.detach().contiguous() for k, v in trainer.model_state_dict().items()}  # collective
    save_file(state, os.path.join(config.run_dir, f"params-rank{ctx.rank}.safetensors"))
    shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])
