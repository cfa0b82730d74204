"""Sharded model loading: each rank builds the model on the meta device and reads only its own
tensor-parallel shard, written once by :func:`reshard`.

Why not DeepSpeed's own path (measured with deepspeed 0.19.8, transformers 5.23, the tiny Llama,
TP 2 over gloo on CPU, ``replace_with_kernel_inject=False``, i.e. AutoTP):

* ``init_inference(..., save_mp_checkpoint_path=D)`` does write per-rank files for AutoTP:
  ``D/tp_{rank:02d}_{part:02d}.pt`` (8 torch pickles per rank), an empty ``non-tp.pt`` and
  ``ds_inference_config.json`` (``"parallelization": "tp"``, ``"checkpoints": {"non_tp": [...],
  "tp": [...]}``).
* Loading them back (model built under ``deepspeed.OnDevice(device="meta")``, then
  ``init_inference(..., checkpoint="D/ds_inference_config.json", base_dir=D)``) fails in the
  AutoTP branch of ``replace_transformer_layer``, which indexes ``checkpoints`` as a list:
  ``KeyError: 0`` at ``checkpoint_file = os.path.join(config.base_dir, checkpoint[i])``
  (module_inject/replace_module.py:394).  Only the kernel-injection branch reads that format.
* AutoTP's meta loading from the *original* Hugging Face files (a JSON listing
  ``model.safetensors``) works and gives the same tokens, but every rank reads every original
  file whole (``safetensors.torch.load_file``) and slices it: per rank, the disk reads are the
  whole checkpoint and the memory peak is one whole checkpoint file.

So this module builds the equivalent, with AutoTP itself deciding every shard's layout:

* :func:`reshard` runs AutoTP once per rank on the fully loaded model and saves that rank's
  sharded ``state_dict()`` as ``<model>/dsi-shards/tp<N>/rank<r>.safetensors``, plus a
  ``manifest.json`` (TP size, dtypes, sha256 of ``config.json``, per-file size and sha256,
  library versions).  Each rank runs in its own child process that joins torch's *fake*
  process group as rank r of N (AutoTP's only collective at sharding time is an RNG
  broadcast), so one machine reshards for any TP size holding one full copy of the model per
  concurrent child, not N.  The children run DeepSpeed's CPU accelerator and see no GPU.
* At load time (:func:`load_sharded`) the model is built from its config with parameters on
  the meta device (buffers such as rotary frequencies stay real), ``init_inference`` runs the
  same AutoTP on it (DeepSpeed allocates the now-sharded parameters uninitialised), and the
  rank's one file is read front to back straight into those parameters (:func:`read_shard_into`,
  hashing as it reads).  Nothing else is opened: the original weight files are not touched.

Shards that exist for the group's TP size but cannot be used (manifest for another TP size
or ``config.json``, a missing, truncated or corrupt file, tensors that do not match the model,
an incompatible dtype) raise :class:`ShardError` naming the file: the engine does not fall
back, since a model that needed sharded loading may not fit a full load.  Shards only for
other TP sizes are not an error: the engine loads the full model and logs a warning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsi_worker import allreduce
from dsi_worker.model_files import load_model

SHARDS_DIRNAME = "dsi-shards"
MANIFEST_NAME = "manifest.json"
FORMAT = "dsi-tp-shards/1"
_CHUNK = 64 << 20
_MAX_HEADER = 100 << 20


class ShardError(RuntimeError):
    """Shards exist but cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class ShardFile:
    """One rank's file: name inside the shard directory, size, sha256, and aliases (a name
    whose tensor is stored under another name, e.g. tied weights)."""

    rank: int
    path: str
    size: int
    sha256: str
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The ``manifest.json`` of one TP size's shards; ``dir`` is the directory holding it."""

    dir: Path
    tp_size: int
    dtype: str
    source_dtype: str | None
    config_sha256: str
    files: tuple[ShardFile, ...]
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The manifest file."""
        return self.dir / MANIFEST_NAME

    def file(self, rank: int) -> Path:
        """Rank ``rank``'s shard file."""
        return self.dir / self.files[rank].path

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to disk."""
        return {
            "format": FORMAT,
            "tp_size": self.tp_size,
            "dtype": self.dtype,
            "source_dtype": self.source_dtype,
            "config_sha256": self.config_sha256,
            "versions": self.versions,
            "files": [
                {"rank": f.rank, "path": f.path, "size": f.size, "sha256": f.sha256}
                | ({"aliases": f.aliases} if f.aliases else {})
                for f in self.files
            ],
        }

    @classmethod
    def from_json(cls, directory: Path, data: Any) -> Manifest:
        """Parse a manifest; ShardError naming the file when it is malformed."""
        where = directory / MANIFEST_NAME
        try:
            if data["format"] != FORMAT:
                raise ShardError(f"{where}: format {data['format']!r}, expected {FORMAT!r}")
            files = tuple(
                ShardFile(
                    int(f["rank"]),
                    str(f["path"]),
                    int(f["size"]),
                    str(f["sha256"]),
                    {str(k): str(v) for k, v in f.get("aliases", {}).items()},
                )
                for f in data["files"]
            )
            m = cls(
                directory,
                int(data["tp_size"]),
                str(data["dtype"]),
                data.get("source_dtype"),
                str(data["config_sha256"]),
                files,
                dict(data.get("versions", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ShardError(f"{where}: malformed manifest ({e!r})") from None
        if [f.rank for f in m.files] != list(range(m.tp_size)):
            raise ShardError(f"{where}: expected one file per rank 0..{m.tp_size - 1}")
        if any(Path(f.path).name != f.path for f in m.files):
            raise ShardError(f"{where}: shard paths must be plain file names")
        return m


# -- finding shards -----------------------------------------------------------------------


def shards_dir(model_dir: str | os.PathLike[str], tp: int) -> Path:
    """Where the shards of ``model_dir`` for TP size ``tp`` live."""
    return Path(model_dir).expanduser() / SHARDS_DIRNAME / f"tp{tp}"


def config_sha256(model_dir: str | os.PathLike[str]) -> str:
    """sha256 of the model's ``config.json`` bytes (shards are tied to one config)."""
    return hashlib.sha256((Path(model_dir).expanduser() / "config.json").read_bytes()).hexdigest()


def available_tp_sizes(model_dir: str | os.PathLike[str]) -> list[int]:
    """TP sizes that have a manifest under ``model_dir`` (not validated)."""
    root = Path(model_dir).expanduser() / SHARDS_DIRNAME
    if not root.is_dir():
        return []
    sizes = [p.parent.name[2:] for p in root.glob(f"tp*/{MANIFEST_NAME}")]
    return sorted(int(s) for s in sizes if s.isdigit())


def find_shards(model_dir: str | os.PathLike[str], tp: int) -> Manifest | None:
    """The validated manifest of ``model_dir``'s shards for TP size ``tp``.

    None when there are none (not a local directory, or no ``dsi-shards/tp<tp>/manifest.json``):
    load the full model.  ShardError, naming the file, when they exist but cannot be used: a
    malformed manifest or one for another TP size, a changed ``config.json``, a shard file that
    is missing or has the wrong size.  Cheap: reads the manifest and config, stats the files.
    """
    root = Path(model_dir).expanduser()
    where = shards_dir(root, tp) / MANIFEST_NAME
    if not root.is_dir() or not where.is_file():
        return None
    try:
        data = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{where}: unreadable manifest ({e})") from None
    m = Manifest.from_json(where.parent, data)
    again = f"re-run: python -m dsi_worker.sharded reshard --model {root} --tp {tp} --force"
    if m.tp_size != tp:
        raise ShardError(f"{where}: written for TP {m.tp_size}, found under tp{tp}; {again}")
    now = config_sha256(root)
    if m.config_sha256 != now:
        raise ShardError(
            f"{where}: written for another {root / 'config.json'} (sha256 "
            f"{m.config_sha256[:12]}, now {now[:12]}); {again}"
        )
    for f in m.files:
        p = m.dir / f.path
        if not p.is_file():
            raise ShardError(f"{p}: shard of rank {f.rank} listed in {where} is missing; {again}")
        if (size := p.stat().st_size) != f.size:
            raise ShardError(
                f"{p}: {size} bytes but {where} says {f.size} (truncated or rewritten); {again}"
            )
    return m


def check_dtype(manifest: Manifest, dtype: Any) -> None:
    """ShardError unless loading the shards in ``dtype`` equals loading the full model in it:
    same dtype, or shards that hold the checkpoint's own values (cast like a full load)."""
    want = dtype_name(dtype)
    if want == manifest.dtype or manifest.dtype == manifest.source_dtype:
        return
    raise ShardError(
        f"{manifest.path}: shards are {manifest.dtype} (rounded from {manifest.source_dtype} "
        f"weights) but the group runs {want}; reshard with --dtype {want} or serve in "
        f"{manifest.dtype}"
    )


# -- reading one shard --------------------------------------------------------------------


def _st_dtypes() -> dict[str, Any]:
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
        "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    }  # fmt: skip


def _read_header(f: Any, path: Path) -> tuple[dict[str, Any], bytes]:
    """(tensor entries, raw bytes read) of a safetensors file; ShardError when it is not one."""
    head = f.read(8)
    if len(head) < 8:
        raise ShardError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise ShardError(f"{path}: not a safetensors file (header length {n})")
    raw = f.read(n)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        for meta in header.values():
            _ = (meta["dtype"], list(meta["shape"]), meta["data_offsets"][1])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise ShardError(f"{path}: corrupt safetensors header ({e!r})") from None
    return header, head + raw


def _check_names(
    path: Path, header: dict[str, Any], targets: dict[str, Any], aliases: dict[str, str]
) -> None:
    bad = sorted(a for a, src in aliases.items() if a not in targets or src not in header)
    if bad:
        raise ShardError(f"{path}: aliases {bad[:4]} do not match the model or the file")
    want = set(targets) - set(aliases)
    missing, extra = sorted(want - set(header)), sorted(set(header) - want)
    if missing or extra:
        raise ShardError(
            f"{path}: tensors do not match the model built for this rank (missing "
            f"{missing[:4]}, unexpected {extra[:4]}); reshard for this model and TP size"
        )
    for name, meta in header.items():
        if list(meta["shape"]) != list(targets[name].shape):
            raise ShardError(
                f"{path}: {name} has shape {meta['shape']}, the model built for this rank "
                f"wants {list(targets[name].shape)}; reshard with this DeepSpeed version"
            )


def _readinto(f: Any, buf: Any, nbytes: int, digest: Any, path: Path, name: str) -> None:
    """Read ``nbytes`` from ``f`` straight into CPU tensor ``buf``'s memory; hash them into
    ``digest`` unless it is None."""
    import torch

    if nbytes == 0:
        return
    view = memoryview(buf.detach().reshape(-1).view(torch.uint8).numpy())
    if len(view) != nbytes:
        raise ShardError(f"{path}: {name} holds {nbytes} bytes, its shape needs {len(view)}")
    got = 0
    while got < nbytes:
        n = f.readinto(view[got : min(nbytes, got + _CHUNK)])
        if not n:
            raise ShardError(f"{path}: file ends inside tensor {name}")
        got += n
    if digest is not None:
        digest.update(view)


def read_shard_into(
    path: str | os.PathLike[str],
    targets: dict[str, Any],
    *,
    aliases: dict[str, str] | None = None,
    sha256: str | None = None,
) -> int:
    """Fill ``targets`` (name -> tensor of the final shape) from one safetensors file; bytes read.

    The file is read once, front to back, straight into each tensor's memory when it is a
    contiguous CPU tensor of the file's dtype (else via one temporary tensor, then cast/copied);
    with ``sha256`` it hashes as it reads and checks the digest at the end.  ``aliases`` name
    targets filled from another target.  ShardError, naming the file, on any mismatch.
    """
    import torch

    path = Path(path)
    aliases = aliases or {}
    digest = hashlib.sha256() if sha256 is not None else None
    dtypes = _st_dtypes()
    with open(path, "rb") as f, torch.no_grad():
        header, raw = _read_header(f, path)
        if digest is not None:
            digest.update(raw)
        total, pos = len(raw), 0
        _check_names(path, header, targets, aliases)
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = meta["data_offsets"]
            if begin != pos or meta["dtype"] not in dtypes:
                raise ShardError(f"{path}: unsupported layout or dtype at tensor {name}")
            dst = targets[name]
            src = dtypes[meta["dtype"]]
            direct = dst.device.type == "cpu" and dst.dtype == src and dst.is_contiguous()
            buf = dst if direct else torch.empty(list(meta["shape"]), dtype=src)
            _readinto(f, buf, end - begin, digest, path, name)
            if not direct:
                dst.copy_(buf)
            total, pos = total + end - begin, end
        while rest := f.read(_CHUNK):  # nothing follows the data in a good file
            if digest is not None:
                digest.update(rest)
            total += len(rest)
        for alias, source in aliases.items():
            if targets[alias].data_ptr() != targets[source].data_ptr():
                targets[alias].copy_(targets[source])
    if digest is not None and (got := digest.hexdigest()) != sha256:
        raise ShardError(
            f"{path}: sha256 {got[:12]}... differs from the manifest's {str(sha256)[:12]}... "
            f"(corrupt); reshard, or delete {path.parent} to load the full model"
        )
    return total


# -- loading a rank -----------------------------------------------------------------------


def build_empty_model(model_dir: str | os.PathLike[str], dtype: Any) -> Any:
    """The causal LM of ``model_dir`` with every parameter on the meta device (no memory,
    no weight file read); buffers (rotary frequencies) are real, and the generation config
    is the directory's, as ``from_pretrained`` would set it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    root = str(Path(model_dir).expanduser())
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        build = AutoModelForCausalLM.from_config
        model = build(config, dtype=dtype)  # type: ignore[no-untyped-call]
    if (Path(root) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(root, local_files_only=True)
    return model


def load_sharded(
    model_dir: str | os.PathLike[str],
    manifest: Manifest,
    *,
    rank: int,
    dtype: Any,
    verify: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """(this rank's AutoTP-sharded model, a load report) read from its own shard file only.

    Needs the TP group formed: torch.distributed with ``manifest.tp_size`` ranks and
    ``deepspeed.init_distributed`` done.  The model is built on the meta device,
    ``init_inference`` shards it with AutoTP exactly as on the full path (DeepSpeed then
    allocates the parameters, uninitialised, on its device), and the shard fills them.
    ``verify`` checks the file's sha256 while reading it (no second read).
    """
    import deepspeed
    import torch

    check_dtype(manifest, dtype)
    entry, path = manifest.files[rank], manifest.file(rank)
    t0 = time.monotonic()
    model = build_empty_model(model_dir, dtype)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    engine = deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": manifest.tp_size},
        dtype=dtype,
        replace_with_kernel_inject=False,
    )
    module = engine.module
    t1 = time.monotonic()
    targets = module.state_dict()
    nbytes = read_shard_into(
        path, targets, aliases=entry.aliases, sha256=entry.sha256 if verify else None
    )
    with torch.no_grad():  # non-persistent buffers: DeepSpeed's to_empty() dropped them
        for name, buf in module.named_buffers():
            if name in buffers and name not in targets:
                buf.copy_(buffers[name])
    if any(p.is_meta for p in module.parameters()):
        raise RuntimeError(f"{path}: parameters left on the meta device after loading")
    return module, {
        "path": "sharded",
        "manifest": str(manifest.path),
        "files": [str(path)],  # the rank's one file: nothing else is read
        "bytes_read": nbytes,
        "verified": verify,
        "build_s": t1 - t0,
        "read_s": time.monotonic() - t1,
    }


# -- resharding ---------------------------------------------------------------------------


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def stored_dtype(model_dir: str | os.PathLike[str]) -> str | None:
    """The dtype the checkpoint's floating-point weights are stored in (safetensors headers,
    else ``config.json``); None when unknown."""
    root = Path(model_dir).expanduser()
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for f in sorted(root.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header, _ = _read_header(fh, f)
        found = [names[m["dtype"]] for m in header.values() if m["dtype"] in names]
        if found:
            return max(set(found), key=found.count)
    cfg = json.loads((root / "config.json").read_text())
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(value) if value else None


def _shard_state(module: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors to save, aliases) of a sharded module's state_dict in ``dtype``: a tensor that
    is exactly another one (tied weights) is stored once; other shared memory is copied."""
    import torch

    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, t in module.state_dict().items():
        t = t.detach()
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if not t.numel():  # may be a view into a full weight (an empty slice): detach it
            tensors[name] = torch.empty(t.shape, dtype=t.dtype)
            continue
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        t = t.contiguous()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors, aliases


def _shard_one_rank(model_dir: str, tp: int, rank: int, out: Path, dtype: str) -> dict[str, Any]:
    """In a child process: rank ``rank`` of a fake TP group loads the full model, lets AutoTP
    shard it, and saves that rank's state; its manifest entry."""
    import torch
    import torch.distributed as tdist

    # Registers torch's "fake" process group (no communication: one process plays one rank).
    import torch.testing._internal.distributed.fake_pg  # noqa: F401
    from safetensors.torch import save_file

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    store = tdist.HashStore()  # type: ignore[attr-defined]
    tdist.init_process_group("fake", rank=rank, world_size=tp, store=store)
    allreduce.disable_cpu_shm_op()
    import deepspeed

    deepspeed.init_distributed(dist_backend="fake")
    model = load_model(model_dir, revision=None, dtype=getattr(torch, dtype, "auto"))
    out_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    # DeepSpeed's CPU accelerator refuses float16; float32 holds every float16 value exactly.
    run_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    engine = deepspeed.init_inference(
        model, tensor_parallel={"tp_size": tp}, dtype=run_dtype, replace_with_kernel_inject=False
    )
    tensors, aliases = _shard_state(engine.module, out_dtype)
    del engine, model
    path = out / f"rank{rank}.safetensors"
    meta = {"format": "pt", "dsi_tp_size": str(tp), "dsi_rank": str(rank)}
    save_file(tensors, str(path), metadata=meta)
    return {
        "rank": rank, "path": path.name, "size": path.stat().st_size,
        "sha256": _sha256_file(path), "aliases": aliases, "dtype": dtype_name(out_dtype),
    }  # fmt: skip


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _reshard_child(model_dir: str, tp: int, rank: int, out: str, dtype: str) -> None:
    """Child process entry: CPU only; writes ``rank<r>.json`` (entry or error) into ``out``."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    result = Path(out) / f"rank{rank}.json"
    try:
        entry = _shard_one_rank(model_dir, tp, rank, Path(out), dtype)
        result.write_text(json.dumps({"ok": entry}))
    except BaseException as e:
        result.write_text(json.dumps({"error": "".join(traceback.format_exception(e))[-4000:]}))
        raise SystemExit(1) from None


def _run_ranks(model_dir: Path, tp: int, out: Path, dtype: str, workers: int) -> list[Any]:
    """Run the ``tp`` rank children, ``workers`` at a time; their manifest entries."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pending, done = list(range(tp)), []
    running: list[tuple[int, Any]] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                r = pending.pop(0)
                p = ctx.Process(
                    target=_reshard_child, args=(str(model_dir), tp, r, str(out), dtype)
                )
                p.start()
                running.append((r, p))
            r, p = running.pop(0)
            p.join()
            result = out / f"rank{r}.json"
            data = json.loads(result.read_text()) if result.is_file() else {}
            if "ok" not in data:
                why = data.get("error", f"exit code {p.exitcode}, no result")
                raise ShardError(f"resharding rank {r} of {model_dir} failed:\n{why}")
            result.unlink()
            done.append(data["ok"])
    finally:
        for _, p in running:
            p.kill()
            p.join()
    return sorted(done, key=lambda e: e["rank"])


def reshard(
    model_dir: str | os.PathLike[str],
    tp: int,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "auto",
    workers: int = 1,
    force: bool = False,
) -> Manifest:
    """Write one safetensors file per rank of TP size ``tp``, plus a manifest.

    Into ``<out_dir or model_dir/dsi-shards>/tp<tp>/``; the engine finds them under the model
    directory only, so shards written elsewhere must be moved there.  ``dtype``: ``auto``
    keeps the checkpoint's (loads in any dtype are then exact), else ``float32``/``bfloat16``/
    ``float16``.  Ranks run in child processes, ``workers`` at a time, each holding the full
    model once (float16 checkpoints twice: AutoTP runs in float32 on CPU).  The directory
    appears only when every rank succeeded; an existing one is replaced only with ``force``.
    """
    root = Path(model_dir).expanduser().resolve()
    if tp < 2:
        raise ValueError(f"tp must be at least 2, got {tp}")
    if not (root / "config.json").is_file():
        raise ShardError(f"{root}: no config.json (not a Hugging Face model directory)")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16; got {dtype!r}")
    final = (Path(out_dir).expanduser() if out_dir else root / SHARDS_DIRNAME) / f"tp{tp}"
    if final.exists() and not force:
        raise ShardError(f"{final} exists; pass force=True (--force) to rewrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tp{tp}.", dir=final.parent))
    try:
        entries = _run_ranks(root, tp, tmp, dtype, workers)
        manifest = Manifest(
            final, tp, entries[0]["dtype"], stored_dtype(root), config_sha256(root),
            tuple(ShardFile(e["rank"], e["path"], e["size"], e["sha256"], e["aliases"])
                  for e in entries),
            _versions(),
        )  # fmt: skip
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        for f in tmp.iterdir():  # ranks may run as other users of a shared volume
            f.chmod(0o644)
        tmp.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("deepspeed", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# -- memory figures -----------------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MiB; None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float | None:
    """Reset this process's peak resident set size (Linux ``clear_refs``, so the next peak is
    the load's); the resident size now in MiB, None when the reset was refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (since the last :func:`reset_peak_rss`)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_report(rss_before: float | None) -> dict[str, float]:
    """``peak_rss_mb`` (since :func:`reset_peak_rss`, else of the process's life) and, when the
    reset worked, ``rss_before_mb`` (resident size when loading began)."""
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if rss_before is not None:
        out["rss_before_mb"] = round(rss_before, 1)
    return out


# -- command line -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m dsi_worker.sharded reshard --model DIR --tp N`` / ``show --model DIR``."""
    ap = argparse.ArgumentParser(
        prog="python -m dsi_worker.sharded",
        description="Per-rank tensor-parallel shards of a model directory (sharded loading).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    rs = sub.add_parser("reshard", help="write per-rank shards of MODEL for TP size N")
    rs.add_argument("--model", required=True, help="Hugging Face model directory")
    rs.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    rs.add_argument("--out", help="root to write tp<N>/ under (default MODEL/dsi-shards)")
    rs.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 ...")
    rs.add_argument("--workers", type=int, default=1, help="ranks resharded at once")
    rs.add_argument("--force", action="store_true", help="replace existing shards")
    sh = sub.add_parser("show", help="list and check the shards of MODEL")
    sh.add_argument("--model", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "reshard":
            t0 = time.monotonic()
            m = reshard(args.model, args.tp, args.out, dtype=args.dtype,
                        workers=args.workers, force=args.force)  # fmt: skip
            print(f"wrote {m.path} ({m.tp_size} files, {m.dtype}) in {time.monotonic() - t0:.1f} s")
            return 0
        for tp in available_tp_sizes(args.model):
            found = find_shards(args.model, tp)
            assert found is not None
            size = sum(f.size for f in found.files) / 2**20
            print(f"tp{tp}: {found.dtype}, {len(found.files)} files, {size:.1f} MiB: ok")
        return 0
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
