"""`kd` with one torchrun rank killed (SIGKILL) at a chosen point, for tests/test_torchrun.py.

    python -m torch.distributed.run --nproc-per-node 2 tests/torchrun_fault.py step 5 distill --params ...

kills rank 1 right after optimizer step 5 (`step`), or right after its 1st committed cache shard (`commit 1`);
`set 16` runs rank 1 with precompute.max_length=16 instead.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    where, n, *args = sys.argv[1:]
    at = int(n)
    if os.environ.get("RANK") == "1":
        if where == "step":
            import importlib

            module = importlib.import_module("stages.methods.kd")  # where logit KD looks up fit
            fit = module.fit

            def killed_fit(*a, **k):
                return fit(*a, **{**k, "on_step": lambda step: _die() if step == at else None})

            module.fit = killed_fit
        elif where == "commit":
            from cache_format import CacheWriter

            commit = CacheWriter._commit

            def killed_commit(self, chunks):
                commit(self, chunks)
                if self._next_seq >= at:
                    _die()

            CacheWriter._commit = killed_commit
        elif where == "set":  # not a kill: rank 1 runs with other settings
            args += ["--set", f"precompute.max_length={at}"]
        else:
            raise SystemExit(f"unknown fault {where!r}: use step, commit or set")
    from pipeline.cli import cli

    cli.main(args, prog_name="kd")


if __name__ == "__main__":
    main()
