"""SelectivBench datasets on disk: compressed .npz plus a JSON of the parameters, written atomically.

A file ``NAME.npz`` holds n ragged samples concatenated along time with ``offsets`` [n + 1]
(sample i is rows offsets[i]:offsets[i+1]): ``step_class``, ``y``, ``element``, ``is_token``,
``after_distractor`` [sum T'], and ``x`` [sum T', C] float32 only when the inputs are not plain
one-hots of ``step_class`` (noise); otherwise x is rebuilt on load. ``NAME.json`` beside it holds
the task config and the generation parameters. Every file is written to a temporary file in the
same folder and moved into place with os.replace, so a reader never sees a half-written file.

``generate`` writes a dataset as a folder of shards (``shard-00000.npz`` + ``.json``, ...) and a
final ``dataset.json``; an interrupted run keeps its finished shards, and running it again
resumes at the first missing shard. ``load`` reads a single file or such a folder.

Temporary files are named ``.NAME.pid<PID>@<host>.<random>.tmp``. A run killed outright (SIGKILL,
power loss) cannot remove its own; the next ``generate`` over the folder removes those whose writer
is gone: written on this host by a process id that is no longer running, or (names without a
process id, or written on another host) not modified for ``STALE_TEMP_AGE_S`` (a day). Temporary
files of a live writer are never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .expand import Sample
from .presets import TaskConfig, check_int, check_seed, dataset, get_preset, max_items

FORMAT = "linrec_ref.selectivbench/1"
_ARRAYS = ("step_class", "y", "element", "is_token", "after_distractor")


def _params(config: TaskConfig, split: str, n: int, seed: int, epoch: int, overlap_compat: bool) -> dict:
    return {"format": FORMAT, "config": config.to_dict(), "split": split, "n": int(n),
            "seed": int(seed), "epoch": int(epoch), "overlap_compat": bool(overlap_compat)}


def dataset_name(config: TaskConfig, split: str, n: int, seed: int, epoch: int = 0,
                 overlap_compat: bool = False) -> str:
    """A readable name plus a short hash of all parameters, e.g. ``t1-small_amb12_train_n100_s1_e0_3f2a9c1d``."""
    params = _params(config, split, n, seed, epoch, overlap_compat)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    grammar = f"amb{config.amb}" if config.amb is not None else f"A{config.n_letters}-{config.n_amb}x{config.depth}"
    compat = "_compat" if overlap_compat else ""
    return f"{config.name}_{grammar}_{split}_n{n}_s{seed}_e{epoch}{compat}_{digest}"


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


STALE_TEMP_AGE_S = 24 * 3600
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.pid(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.[A-Za-z0-9_]+\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())


def _temp_prefix(path: Path) -> str:
    """``.NAME.pid<PID>@<host>.``: who writes the temporary file (see the module docstring)."""
    return f".{path.name}.pid{os.getpid()}@{_host()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                       # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:                   # exists, owned by another user
        return True
    return True


def remove_stale_temps(folder: Union[str, Path], max_age_s: float = STALE_TEMP_AGE_S) -> List[Path]:
    """Removes the temporary files (``.*.tmp``) in ``folder`` whose writer is gone; returns them.

    Stale: written on this host by a process that is no longer running (POSIX), or not modified
    for ``max_age_s`` seconds (a name without a process id, another host's, or not POSIX). A
    process id reused by a new process keeps its file until it is old enough.
    """
    removed = []
    now, host = time.time(), _host()
    for tmp in Path(folder).glob(".*.tmp"):
        match = _TEMP_NAME.match(tmp.name)
        try:
            if match and match["host"] == host and os.name == "posix":
                stale = not _process_alive(int(match["pid"]))
            else:
                stale = now - tmp.stat().st_mtime > max_age_s
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:             # its writer finished (os.replace) meanwhile
            continue
    return removed


def _check_folder(where: str, folder: Path) -> None:
    """A clear error before anything is created when ``folder`` or one of its parents is a file."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{where}: out_dir must be a folder, but {p} is a file")
            return


def _atomic_write(path: Path, write) -> None:
    """Calls write(file object) on a temporary file in path's folder, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; a dataset is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pack(samples: Sequence[Sample]) -> dict:
    lengths = np.array([s.n_steps for s in samples], dtype=np.int64)
    arrays = {"offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    for name in _ARRAYS:
        arrays[name] = np.concatenate([getattr(s, name) for s in samples]) if samples else np.zeros(0)
    C = samples[0].x.shape[1] if samples else 0
    arrays["n_input_classes"] = np.array(C)
    x = np.concatenate([s.x for s in samples]) if samples else np.zeros((0, C), np.float32)
    if not np.array_equal(x, _one_hot(arrays["step_class"], C)):
        arrays["x"] = x.astype(np.float32)
    arrays["step_class"] = arrays["step_class"].astype(np.int8)
    arrays["y"] = arrays["y"].astype(np.int32)
    arrays["element"] = arrays["element"].astype(np.int32)
    return arrays


def _one_hot(step_class: np.ndarray, C: int) -> np.ndarray:
    x = np.zeros((len(step_class), C), dtype=np.float32)                   # [sum T', C]
    lit = np.flatnonzero(step_class >= 0)
    x[lit, step_class[lit]] = 1.0
    return x


def _unpack(z) -> List[Sample]:
    offsets = z["offsets"]
    step_class = z["step_class"].astype(np.int64)
    C = int(z["n_input_classes"])
    x = z["x"] if "x" in z.files else _one_hot(step_class, C)
    cols = {"y": z["y"].astype(np.int64), "element": z["element"].astype(np.int64),
            "is_token": z["is_token"].astype(bool), "after_distractor": z["after_distractor"].astype(bool)}
    return [Sample(x=x[a:b], step_class=step_class[a:b], **{k: v[a:b] for k, v in cols.items()})
            for a, b in zip(offsets[:-1], offsets[1:])]


def save(path_dir: Union[str, Path], samples: Sequence[Sample], config: TaskConfig, split: str = "train",
         seed: int = 1, epoch: int = 0, overlap_compat: bool = False, start: int = 0,
         name: Optional[str] = None) -> Path:
    """Writes ``samples`` to path_dir/NAME.npz and NAME.json (atomically); returns the .npz path."""
    samples = list(samples)
    folder = Path(path_dir)
    _check_folder("save", folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = name or dataset_name(config, split, len(samples), seed, epoch, overlap_compat)
    meta = _params(config, split, len(samples), seed, epoch, overlap_compat)
    meta["start"] = int(start)
    arrays = _pack(samples)
    _atomic_write(folder / f"{name}.npz", lambda f: np.savez_compressed(f, **arrays))
    _atomic_write(folder / f"{name}.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return folder / f"{name}.npz"


def load(path: Union[str, Path]) -> Tuple[List[Sample], TaskConfig]:
    """(samples, config) from a NAME.npz file (its NAME.json beside it) or a ``generate`` folder."""
    path = Path(path)
    if path.is_dir():
        manifest = path / "dataset.json"
        if not manifest.exists():
            raise ValueError(f"load: {path} has no dataset.json (an unfinished generate run?); run generate again")
        meta = json.loads(manifest.read_text())
        samples: List[Sample] = []
        for shard in meta["shards"]:
            samples += load(path / shard)[0]
        return samples, TaskConfig.from_dict(meta["config"])
    npz = path if path.suffix == ".npz" else path.with_suffix(".npz")
    if not npz.exists():
        raise ValueError(f"load: no dataset file {npz}")
    meta = json.loads(npz.with_suffix(".json").read_text())
    with np.load(npz) as z:
        samples = _unpack(z)
    return samples, TaskConfig.from_dict(meta["config"])


def _progress(stream=sys.stderr):
    """A dependency-free progress bar on stderr: update(done, total)."""
    t0 = time.perf_counter()

    def update(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        rate = done / max(time.perf_counter() - t0, 1e-9)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} samples {rate:8.1f}/s")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return update


def _check_generate_args(config: TaskConfig, n, seed, split, epoch, overlap_compat, shard_size) -> None:
    check_int("generate", "n", n, 1)
    check_seed("generate", seed)
    if split not in ("train", "test"):
        raise ValueError(f"generate: split must be 'train' or 'test', got {split!r}")
    check_int("generate", "epoch", epoch, 0)
    if not isinstance(overlap_compat, (bool, np.bool_)):
        raise ValueError(f"generate: overlap_compat must be a bool, got {overlap_compat!r}")
    check_int("generate", "shard_size", shard_size, 1)
    limit = max_items(config, split, overlap_compat)
    if n > limit:
        raise ValueError(f"generate: n must be <= {limit} for the {split} split"
                         + (" (training items stay below test_offset, keeping the splits disjoint)"
                            if split == "train" and not overlap_compat else "") + f", got {n}")


def generate(preset: Union[str, TaskConfig], n: int, out_dir: Union[str, Path], seed: int = 1,
             split: str = "train", epoch: int = 0, overlap_compat: bool = False, shard_size: int = 1000,
             progress: bool = True) -> Path:
    """Generates ``n`` samples into out_dir/NAME/ as shards; resumable. Returns the folder.

    Shards already on disk with matching parameters are kept; the manifest ``dataset.json`` is
    written last, so its presence marks a complete dataset. Every argument is checked (and the
    grammar built) before anything is created; temporary files left by killed runs are removed
    (``remove_stale_temps``).
    """
    config = get_preset(preset)
    _check_generate_args(config, n, seed, split, epoch, overlap_compat, shard_size)
    folder = Path(out_dir) / dataset_name(config, split, n, seed, epoch, overlap_compat)
    _check_folder("generate", folder)
    config.grammar(seed)                      # a grammar that cannot be built fails here, not mid-run
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    update = _progress() if progress else (lambda done, total: None)
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - start)
        name = f"shard-{k:05d}"
        shards.append(f"{name}.npz")
        meta_path = folder / f"{name}.json"
        if (folder / f"{name}.npz").exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("start") == start and meta.get("n") == count and meta.get("seed") == seed:
                update(start + count, n)
                continue
        samples = list(dataset(config, split, count, seed, epoch, overlap_compat, start=start))
        save(folder, samples, config, split, seed, epoch, overlap_compat, start=start, name=name)
        update(start + count, n)
    manifest = _params(config, split, n, seed, epoch, overlap_compat)
    manifest["shards"] = shards
    _atomic_write(folder / "dataset.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return folder
