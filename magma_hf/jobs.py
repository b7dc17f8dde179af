"""The resumable, sharded job of `magma-hf eval` and `magma-hf caption`: one record log, resumed, sharded, merged.

A command gives only its identity and its records: the settings that produced them (`Job.settings`, written in the
log's header) with the keys a rerun must share (`Job.keys`, known before the model loads; `MODEL_KEYS` after), and
a function from a batch of its examples to their records. The job does the rest:

- the output: a log in a folder that can be written, never another run's, nor a finished result beside it that is
  not this run's (`Job.check_output`, before the model is loaded or anything written);
- the log: a header line naming what produced the records, then one JSON record per line, appended per batch, so
  that a run resumes after an interruption (the records already there are skipped; a last line torn by a kill is cut
  off) and a rerun with other settings is refused, naming the difference (`Job.resume`);
- the batches, with a progress bar (`Job.run`), and the finished result written atomically (`Job.write_results`);
- the model a job answers with: a folder loaded for inference, and its identity (`load_model`);
- the command line: the model's options (`add_model_arguments`), `run_command` (INFO logging; a refused input
  reported by `cli.refuse`).

Under `accelerate launch` the work is sharded over the processes:

- the main process checks and reads the log (and the process logs an earlier sharded run left), cuts torn lines off,
  and tells every process which ids are done; nobody writes before that;
- the ids still to do are dealt out in turn (`todo[rank::count]`); the main process appends to the log itself,
  process `r` to its own process log beside it, `NAME.process-r.jsonl` (created with the same header), so no file
  has two writers;
- when all are done, the main process rewrites the log with every record in the data's order (atomically) and
  only then removes the process logs: a kill in between leaves the records twice, which a rerun reads as once.

The process logs of any earlier run are read whatever its process count, so a run sharded over N processes resumes
with M (one included); with one process and no process logs nothing differs from an unsharded run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging as std_logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .cli import refuse
from .folders import remove_leftover_temporaries, write_text_atomically
from .hub_magma import check_processor_files
from .processing_magma import MagmaProcessor, check_processor_matches_model

logger = logging.get_logger(__name__)

# The settings that identify the model, known only once it is loaded: checked after the others, which a rerun can
# check before loading 12 GB.
MODEL_KEYS = ("model_weights", "dtype")


# ---------------------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Processes:
    """This process's place among those `accelerate launch` (or torchrun) started; one process when none did."""

    rank: int = 0
    count: int = 1
    device: str | None = None  # where a model loaded by this process goes (None: the caller's default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Every process reaches this point before any goes on."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        """The main process's `value`, on every process (it is also the barrier the main process's reads need)."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]


def processes() -> Processes:
    """The processes of this run. Without a GPU the process group uses gloo (accelerate's `cpu` mode), whatever the
    launcher, so `accelerate launch --multi_gpu --num_processes N` also shards over CPU processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    device = str(state.device) if state.device.type != "cpu" else "cpu"
    return Processes(state.process_index, state.num_processes, device)


def shard(todo: Sequence, procs: Processes) -> list:
    """This process's share of `todo` (the same list on every process): every `count`-th item from `rank`."""
    return list(todo[procs.rank :: procs.count])


# ---------------------------------------------------------------------------------------------------------------------
# A log's files


def process_log_path(log_path: Path, rank: int) -> Path:
    """`results.jsonl` -> `results.process-1.jsonl`: where process `rank` (> 0) appends its records."""
    return log_path.with_name(f"{log_path.stem}.process-{rank}{log_path.suffix}")


def process_logs(log_path: Path) -> list[Path]:
    """The process logs beside `log_path` (any rank: those of an earlier run with more processes included)."""
    pattern = re.compile(rf"{re.escape(log_path.stem)}\.process-[1-9][0-9]*{re.escape(log_path.suffix)}")
    return sorted(p for p in log_path.parent.glob(f"{log_path.stem}.process-*") if pattern.fullmatch(p.name))


def differences(recorded: Mapping[str, Any], settings: Mapping[str, Any], keys: Iterable[str]) -> str:
    """`key: X in the file, Y now` for each of `keys` on which a log's settings and this run's differ."""
    differing = [key for key in keys if key in settings and recorded.get(key) != settings[key]]
    return "; ".join(f"{key}: {recorded.get(key)!r} in the file, {settings[key]!r} now" for key in differing)


def read_header(path: Path, results_format: str, what: str = "evaluation log") -> dict[str, Any]:
    """The settings in a log's first line; an error naming the problem when it is not a log of `results_format`
    (`"magma_hf.evaluation/2"`: a log of another family, or of another version of this one, is refused)."""
    family = results_format.rsplit("/", 1)[0] + "/"
    with open(path, encoding="utf-8", errors="replace") as file:
        first = file.readline()
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or not str(header.get("format", "")).startswith(family):
        raise ValueError(
            f"{path} is not a magma_hf {what} (its first line is {first[:80]!r}); choose another --output "
            "or move the file away"
        )
    if header["format"] != results_format or not isinstance(header.get("settings"), dict):
        raise ValueError(
            f"Cannot resume {path}: it is in the format {header['format']!r}, written by an earlier magma_hf that "
            f"did not record the model's weights and the data's questions (it records {header.get('settings')}), so "
            "resuming it could mix two runs. Choose another --output (the file is left as it is), or move it away."
        )
    return header["settings"]


def check_resumable(path: Path, recorded: Mapping[str, Any], settings: Mapping[str, Any], keys) -> None:
    """An error naming every difference when the log at `path` was written with other `keys` than this run's."""
    details = differences(recorded, settings, keys)
    if details and recorded.get("model_weights") != settings.get("model_weights"):  # a hash does not say which models
        details += f" (the file's model: {recorded.get('model')!r}; this run's: {settings.get('model')!r})"
    if details:
        raise ValueError(
            f"Cannot resume {path}: it was written by another run ({details}). Its results would be mixed with "
            "this run's. Choose another --output, or move the file away to start again."
        )


def read_records(path: Path) -> dict[str, dict]:
    """The records after a log's header, by id. A last line without its newline (a run killed while appending it)
    is cut off the file, so that the run appends after complete lines only."""
    with open(path, "rb") as file:
        data = file.read()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        logger.warning(
            "%s: dropping the incomplete last line (%d bytes) left by an interrupted run", path, len(data) - complete
        )
        os.truncate(path, complete)
    records: dict[str, dict] = {}
    for number, line in enumerate(data[:complete].decode("utf-8", errors="replace").splitlines()[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}, line {number}, is not a result record ({line[:80]!r}); the log is damaged")
        records[str(record["id"])] = record
    return records


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` atomically, after removing the temporary files a killed run's write to it left behind."""
    for leftover in remove_leftover_temporaries(path):
        logger.warning("Removed %s, left by an interrupted write of %s", leftover, path)
    write_text_atomically(path, text)


def header_line(results_format: str, settings: Mapping[str, Any]) -> str:
    return json.dumps({"format": results_format, "settings": settings}) + "\n"


def check_writable_folder(folder: Path) -> None:
    """An error naming the folder when results cannot be written into it (it, or the nearest existing parent)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"Cannot write the results into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot write the results into {folder}: {existing} is not writable")


# ---------------------------------------------------------------------------------------------------------------------
# The job


@dataclass
class Job:
    """One run of a command over its examples: resumable from its log, sharded over the processes.

    `log_path` is the record log (None: the records are kept in memory only); `results_path`, when given, the
    finished result written beside it once all are done (`magma-hf eval`'s aggregate JSON). `settings` identify the
    run (the log's header); `keys` name those a resumed log must share before the model loads, `MODEL_KEYS` after.
    `what` names the log in errors (`"caption log"`)."""

    results_format: str
    log_path: Path | None
    settings: dict[str, Any]
    keys: tuple[str, ...]
    procs: Processes
    what: str = "evaluation log"
    results_path: Path | None = None
    recorded: dict[str, Any] | None = None  # the settings of the log this run resumes (None: a new log)
    done: dict[str, dict | None] = field(default_factory=dict)  # records by id (other processes: the ids only)

    def check_output(self) -> None:
        """Sets `recorded` when this run resumes the log, after checking that neither the log nor a finished
        `results_path` belongs to another run: those are never continued or overwritten."""
        log_path, output = self.log_path, self.results_path
        if log_path is None:
            return
        if not log_path.exists():
            orphans = process_logs(log_path)  # they would be read into a new run: refused, naming them
            if orphans:
                raise ValueError(
                    f"{log_path} does not exist but the process logs of a sharded run writing it do "
                    f"({', '.join(str(p) for p in orphans)}); move them away, or put the log back to resume"
                )
            check_writable_folder(log_path.parent)
            if output is not None and output.exists():  # results whose log is gone
                raise ValueError(
                    f"{output} exists but its per-example log {log_path} does not, so the run cannot "
                    f"resume; move {output} away or choose another --output."
                )
            return
        self.recorded = read_header(log_path, self.results_format, self.what)
        check_resumable(log_path, self.recorded, self.settings, self.keys)
        if output is None or not output.exists():  # a finished result is rewritten only when it is this run's
            return
        try:
            finished = json.loads(output.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            finished = None
        if not isinstance(finished, dict) or finished.get("format") != self.results_format:
            raise ValueError(
                f"{output} is not a magma_hf results file of this format; move it or choose another --output"
            )
        details = differences(finished.get("settings", {}), self.recorded, self.keys + MODEL_KEYS)
        if details:
            raise ValueError(
                f"{output} holds the results of another run than its log {log_path} ({details}); move one away"
            )

    def resume(self, known: Callable[[str], Any]) -> None:
        """Once the model's identity is in `settings`: the records already done, by id, into `done`. The main process
        reads them from the log and every process log (each checked against `settings`; torn last lines cut off), or
        starts a new log with its header; an id of which `known(id)` is None is an error (the log belongs to other
        data). The other processes get the same ids (with `None` for the record) once the main process is through:
        nothing is appended before that."""
        log_path, procs = self.log_path, self.procs
        if log_path is None:
            return
        done: dict[str, dict | None] = {}
        if procs.is_main:
            if self.recorded is not None:
                check_resumable(log_path, self.recorded, self.settings, MODEL_KEYS)
                done.update(read_records(log_path))
            else:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(log_path, header_line(self.results_format, self.settings))
            for part in process_logs(log_path):
                recorded = read_header(part, self.results_format, self.what)
                check_resumable(part, recorded, self.settings, self.keys + MODEL_KEYS)
                for key, record in read_records(part).items():
                    done.setdefault(key, record)
            unknown = [key for key in done if known(key) is None]
            if unknown:
                raise ValueError(
                    f"{log_path} has results for ids not in the data (e.g. {unknown[:3]}); it belongs to "
                    "other data. Choose another --output."
                )
        ids = procs.broadcast(list(done) if procs.is_main else None)
        self.done = done if procs.is_main else dict.fromkeys(ids)

    def pending(self, ids: Sequence) -> list[int]:
        """The rows of `ids` not done yet (the same list on every process)."""
        return [row for row in range(len(ids)) if str(ids[row]) not in self.done]

    def run(
        self,
        todo: list[int],
        total: int,
        records_for: Callable[[list[int]], list[dict[str, Any]]],
        batch_size: int,
        *,
        noun: str,
        desc: str,
        unit: str = "it",
        progress: bool = True,
    ) -> None:
        """Produce the records of the rows `todo` of `total`: this process's share, `batch_size` rows per
        `records_for(rows)` call, each batch's records appended to this process's log as soon as they exist: the log
        on the main process, else its process log (created with the log's header when absent)."""
        procs = self.procs
        if self.done and todo and procs.is_main:
            logger.info("Resuming %s: %d of %d %s already done", self.log_path, total - len(todo), total, noun)
        todo = shard(todo, procs)
        sharded = f" (process 1 of {procs.count})" if procs.count > 1 else ""
        initial = total - len(todo) if procs.count == 1 else 0
        bar = tqdm(total=initial + len(todo), initial=initial, desc=f"{desc}{sharded}", unit=unit,
                   disable=not progress or not procs.is_main)  # fmt: skip
        log_path = self.log_path
        if log_path is not None and not procs.is_main:
            log_path = process_log_path(log_path, procs.rank)
            if not log_path.exists():
                write_atomically(log_path, header_line(self.results_format, self.settings))
        log = None if log_path is None else open(log_path, "a", encoding="utf-8")
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                records = records_for(batch)
                self.done.update((str(record["id"]), record) for record in records)
                if log is not None:  # one JSON line per record, pushed to the file per batch
                    log.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
                    log.flush()
                bar.update(len(batch))
        finally:
            bar.close()
            if log is not None:
                log.close()

    def finish(self, order: Sequence[str]) -> None:
        """Once every process is through: on the main process the process logs' records added to `done` and the log
        rewritten with all of them in `order` (ids; those not in it after), then the process logs removed (a kill
        before that leaves the records twice, read as once). Without process logs the log is left as it is."""
        if self.log_path is None:
            return
        self.procs.wait()
        parts = process_logs(self.log_path) if self.procs.is_main else []
        if not parts:
            return
        for part in parts:
            self.done.update(read_records(part))
        with open(self.log_path, encoding="utf-8") as file:
            header = file.readline()
        position = {key: n for n, key in enumerate(order)}
        keys = sorted(self.done, key=lambda key: (position.get(key, len(position)), key))
        records = "".join(json.dumps(self.done[key], ensure_ascii=False) + "\n" for key in keys)
        write_atomically(self.log_path, header + records)
        for part in parts:
            part.unlink()

    def write_results(self, result: Mapping[str, Any]) -> None:
        """The finished result into `results_path`, atomically, with the log's format (main process only)."""
        text = json.dumps({"format": self.results_format, **result}, indent=1, ensure_ascii=False)
        write_atomically(self.results_path, text + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# The model


def load_model_and_processor(path: str | os.PathLike, device: str | None = None, dtype: str | None = None):
    """A MAGMA folder's model (in eval mode, on `device`) and processor."""
    if not Path(path).exists() and (Path(path).is_absolute() or str(path).startswith((".", "~"))):
        raise FileNotFoundError(f"there is no model folder {path}")  # not a Hub id: transformers would say it is
    if Path(path).is_dir():
        check_processor_files(path)  # before the weights load, which may take minutes
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype in (None, "auto"):
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    from .modeling_magma import MagmaForConditionalGeneration  # here: `magma-hf caption --engine vllm` imports this
    # module in vLLM's environment, whose transformers has only MAGMA's config and processors (README)

    model = MagmaForConditionalGeneration.from_pretrained(str(path), dtype=torch_dtype).to(device).eval()
    processor = MagmaProcessor.from_pretrained(str(path))
    check_processor_matches_model(processor, model.config, str(path))
    return model, processor


def load_model(model, processor, device: str | None, dtype: str | None, procs: Processes, fingerprint: bool = True):
    """`(model, processor, identity)`: a model folder loaded (on this process's device unless `device` says
    otherwise), or a loaded model as given; `identity` the settings that identify it: its name as the log records it,
    its weights' fingerprint (None when not `fingerprint`: a run without a log needs none) and its dtype."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        model, loaded_processor = load_model_and_processor(model, device=device or procs.device, dtype=dtype)
        processor = processor or loaded_processor
    else:
        name = getattr(model, "name_or_path", "") or type(model).__name__
    weights = weights_fingerprint(model) if fingerprint else None
    return model, processor, {"model": name, "model_weights": weights, "dtype": str(model.dtype).removeprefix("torch.")}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes), the identity of what answers.

    Exact: any changed weight changes it, and the same weights give the same value whatever folder, copy or device
    they come from (a dtype is other bytes, hence another identity: it gives other answers too). Tensors are hashed
    in threads (hashlib releases the GIL), so a 12 GB model takes seconds, against hours of generation.
    """
    state = model.state_dict()

    def tensor_digest(name: str) -> str:
        tensor = state[name].detach()
        digest = hashlib.sha256(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy()))
        return digest.hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(tensor_digest, sorted(state)))
    return "sha256:" + hashlib.sha256("".join(digests).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# The CLI


def add_model_arguments(parser: argparse.ArgumentParser, dtype_note: str = "") -> None:
    """The options a job command ends with: where and in which dtype the model is loaded, and the progress bar."""
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help=f"model dtype (default: bfloat16 on GPU, float32 on CPU{dtype_note})")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_command(work: Callable[[], Any], report: Callable[[Any], None]) -> int:
    """A job command's `run`: INFO logging, `work()` (the model is loaded inside, once the data and the output are
    known to be usable), a refused input reported by `cli.refuse`, and `report(result)` on the main process only
    (under accelerate launch every process has the result; one prints it)."""
    std_logging.basicConfig(level=std_logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = work()
    except (ValueError, OSError) as error:  # a refused input: bad data, settings, model folder or output
        return refuse(error)
    if processes().is_main:
        report(result)
    return 0


__all__ = [
    "MODEL_KEYS", "Job", "Processes", "add_model_arguments", "check_resumable",
    "check_writable_folder", "load_model", "load_model_and_processor", "process_log_path", "process_logs",
    "processes", "read_header", "read_records", "run_command", "shard", "weights_fingerprint",
]  # fmt: skip
