"""Record logs: a header line naming what produced the records, then one JSON record per line, appended per batch.

`magma-hf eval` and `magma-hf caption` write their results this way, so that a run resumes after an interruption
(the records already there are skipped; a last line torn by a kill is cut off) and a rerun with other settings is
refused, naming the difference. Under `accelerate launch` the work is sharded over the processes:

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

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..io_utils import remove_leftover_temporaries, write_text_atomically

logger = logging.get_logger(__name__)


# -------------------------------------------------------------------------------------------------------- processes
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
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    device = str(state.device) if state.device.type != "cpu" else "cpu"
    return Processes(state.process_index, state.num_processes, device)


def shard(todo: Sequence, procs: Processes) -> list:
    """This process's share of `todo` (the same list on every process): every `count`-th item from `rank`."""
    return list(todo[procs.rank :: procs.count])


# ----------------------------------------------------------------------------------------------------- a log's files
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


def remove_leftovers(path: Path) -> None:
    """Temporary files of an atomic write to `path` that a killed run left behind."""
    for leftover in remove_leftover_temporaries(path):
        logger.warning("Removed %s, left by an interrupted write of %s", leftover, path)


def append_records(log, records: list[dict]) -> None:
    """Append a batch's records to the open log, one JSON line each, and push them to the file."""
    log.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    log.flush()


def header_line(results_format: str, settings: Mapping[str, Any]) -> str:
    return json.dumps({"format": results_format, "settings": settings}) + "\n"


# --------------------------------------------------------------------------------------------- sharded, resumable run
def check_no_orphaned_process_logs(log_path: Path) -> None:
    """Process logs without their log (moved or deleted) would be read into a new run: refused, naming them."""
    orphans = process_logs(log_path)
    if orphans and not log_path.exists():
        raise ValueError(
            f"{log_path} does not exist but the process logs of a sharded run writing it do "
            f"({', '.join(str(p) for p in orphans)}); move them away, or put the log back to resume"
        )


def read_done(
    log_path: Path,
    results_format: str,
    settings: Mapping[str, Any],
    keys: Sequence[str],
    resume: bool,
    procs: Processes,
    known: Callable[[str], Any],
    what: str = "evaluation log",
) -> dict[str, dict | None]:
    """The records already done, by id: on the main process read from the log and every process log (each checked
    against `settings` on `keys`; torn last lines cut off), the log first written with its header when `resume` is
    false; an id of which `known(id)` is None is an error (the log belongs to other data). The other processes get
    the same ids (with `None` for the record), once the main process is through:
    nothing is appended before that."""
    done: dict[str, dict | None] = {}
    if procs.is_main:
        if resume:
            done.update(read_records(log_path))
        else:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(log_path)
            write_text_atomically(log_path, header_line(results_format, settings))
        for part in process_logs(log_path):
            check_resumable(part, read_header(part, results_format, what), settings, keys)
            for key, record in read_records(part).items():
                done.setdefault(key, record)
        unknown = [key for key in done if known(key) is None]
        if unknown:
            raise ValueError(
                f"{log_path} has results for ids not in the data (e.g. {unknown[:3]}); it belongs to "
                "other data. Choose another --output."
            )
    ids = procs.broadcast(list(done) if procs.is_main else None)
    return done if procs.is_main else dict.fromkeys(ids)


def open_for_append(log_path: Path, results_format: str, settings: Mapping[str, Any], procs: Processes):
    """The file this process appends its records to: the log on the main process, else its process log (created
    with the log's header when absent)."""
    if procs.is_main:
        return open(log_path, "a", encoding="utf-8")
    path = process_log_path(log_path, procs.rank)
    if not path.exists():
        remove_leftovers(path)
        write_text_atomically(path, header_line(results_format, settings))
    return open(path, "a", encoding="utf-8")


def merge_process_logs(log_path: Path, done: dict[str, dict], order: Sequence[str], procs: Processes) -> bool:
    """Once every process is through: the process logs' records added to `done` and the log rewritten with all of
    them in `order` (ids; those not in it after), then the process logs removed. On the main process only; `False`
    when there was nothing to merge (the log is then left as it is)."""
    procs.wait()
    parts = process_logs(log_path) if procs.is_main else []
    if not parts:
        return False
    for part in parts:
        done.update(read_records(part))
    with open(log_path, encoding="utf-8") as file:
        header = file.readline()
    position = {key: n for n, key in enumerate(order)}
    keys = sorted(done, key=lambda key: (position.get(key, len(position)), key))
    remove_leftovers(log_path)
    write_text_atomically(log_path, header + "".join(json.dumps(done[k], ensure_ascii=False) + "\n" for k in keys))
    for part in parts:  # the records are in the log now; a kill before this leaves them twice, read as once
        part.unlink()
    return True


__all__ = [
    "Processes",
    "append_records",
    "check_no_orphaned_process_logs",
    "check_resumable",
    "merge_process_logs",
    "open_for_append",
    "process_log_path",
    "process_logs",
    "processes",
    "read_done",
    "read_header",
    "read_records",
    "shard",
]
