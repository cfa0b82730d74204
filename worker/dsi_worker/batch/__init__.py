"""The batch-inference job: ``python -m dsi_worker.batch``.

Runs a model over a dataset (JSON Lines or Parquet) with a pool of tensor-parallel groups
(the same :class:`~dsi_worker.rank_actor.RankActor` groups that serve) and writes one output
file per input shard, exactly once, resumable after the job is killed.

Modules: :mod:`.args` (``BatchArgs``, the operator's contract), :mod:`.shards` (input
sharding, row ids, output names, the resume marker), :mod:`.tables` (reading shards and
writing part files), :mod:`.pool` (the group pool: whole-group replacement and retry),
:mod:`.progress` (``DSI_PROGRESS`` lines and the progress ConfigMap) and :mod:`.job` (the
driver). Importing this package imports none of them: the operator imports
:mod:`.progress` without Ray or torch.
"""
