"""``modelpress gc``: run garbage collection once against this machine's settings and print what it freed.

A server-side command (it needs the database and the blob store, like ``migrate``), registered on the
CLI's parser by ``register``; the worker runs the same ``worker.gc.run_gc`` on its own timer.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_gc(ctx: Any) -> int:
    """Run one gc pass; print the summary line (or ``--json``) of what it freed."""
    from worker.gc import run_gc

    report = run_gc()
    if ctx.args.json:
        ctx.out.print(json.dumps(report.as_dict()), markup=False, highlight=False, soft_wrap=True)
    else:
        ctx.out.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    return 0


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``gc`` to the CLI's subcommands."""
    cmd = sub.add_parser("gc", parents=parents,
                         help="delete what retention says, sweep unreferenced blobs and leftovers; print what was freed",
                         description="Run garbage collection once (retention, deferred deletes, orphan blobs, "
                                     "staged uploads and work folders of killed processes, old cache entries).")
    cmd.set_defaults(func=cmd_gc)
