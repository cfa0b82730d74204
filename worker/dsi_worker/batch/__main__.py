"""``python -m dsi_worker.batch``: run the batch-inference job (see :mod:`dsi_worker.batch`).

Arguments: ``--args-json '<json>'``, ``--args-file PATH``, or the environment variable
``DSI_BATCH_ARGS`` (:class:`~dsi_worker.batch.args.BatchArgs`). Exit codes: 0 done (every
shard written, ``_SUCCESS`` present); 1 the job failed (last line: ``batch job failed:
<why>``); 2 bad arguments (one line naming each bad field).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from dsi_worker.batch.args import BatchArgsError, load_batch_args

log = logging.getLogger("dsi_worker.batch")


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the job, and return the exit code."""
    try:
        args = load_batch_args(argv, os.environ)
    except BatchArgsError as e:
        print(e, file=sys.stderr, flush=True)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from dsi_worker.batch.job import JobFailed, run_job

    try:
        summary = run_job(args)
    except JobFailed as e:
        log.error("batch job failed: %s", e)
        return 1
    except Exception as e:  # a bug: show the traceback, but still end on one clear line
        log.exception("batch job crashed")
        log.error("batch job failed: %s: %s", type(e).__name__, e)
        return 1
    done = {
        "output": summary.output,
        "shards_written": summary.shards_written,
        "shards_skipped": summary.shards_skipped,
        "rows_written": summary.rows_written,
        "group_replacements": summary.group_replacements,
        "elapsed_s": round(summary.elapsed_s, 1),
    }
    log.info("batch job done: %s", json.dumps(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
