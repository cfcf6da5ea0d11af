"""The runner: crosses the grid, runs each cell's recipe, measures it, stores it.

Two phases keep the dependency between cells simple on any executor: first every teacher
that a pending cell needs is trained (or found in the cache) and measured, then the student
cells run. A cell that raises is stored as failed with its traceback; the others still run.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import datetime as dt
import functools
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from . import stage_cache
from .config import COMPRESSOR_KIND, Cell, Experiment, Ref, TeacherJob, as_dict, digest, parse_ref
from .contracts import CompressionContext, DistillContext, TaskData
from .convergence import NotConverged, not_converged_message, row_converged, stage_convergence
from .environment import environment
from .measure import export, measure
from .plugins import Plugins
from .store import Record, Store
from .teachers import CachedTeacher, obtain_teacher
from .training import Tapped, Teacher, UpdateTracker, fit, predict, warm_up


@dataclasses.dataclass
class RunSummary:
    total: int  # student cells in the grid
    skipped: int  # not for this run: done before (or failed, without --retry-failed)
    done: int  # student cells finished now
    failed: list[Record]  # teacher jobs and student cells that failed now
    taken: int = 0  # jobs another run sharing the store claimed or finished first
    failed_earlier: int = 0  # failed cells left alone (no --retry-failed)

    @property
    def exit_code(self) -> int:
        """1 while the grid holds failed cells, failed now or kept from an earlier run."""
        return 1 if self.failed or self.failed_earlier else 0


class CellTimeout(Exception):
    """A cell ran past ``--cell-timeout``."""


class _Expired(BaseException):
    """Raised asynchronously into the cell's thread; a BaseException so that no ``except
    Exception`` inside a plugin swallows it. Turned into ``CellTimeout`` at the boundary."""


@contextlib.contextmanager
def deadline(seconds: float | None, what: str):
    """Raise ``CellTimeout`` in this thread once ``seconds`` have passed.

    A watchdog thread raises it asynchronously (``PyThreadState_SetAsyncExc``), which works in
    any thread (a Dask worker runs cells in threads, where signals cannot reach) and takes
    effect at the next Python bytecode, i.e. after the running torch operation returns. A lock
    and the clearing of a pending exception keep a late watchdog from hitting code after the
    block.
    """
    if not seconds:
        yield
        return
    tid, lock, state = threading.get_ident(), threading.Lock(), {"armed": True, "fired": False}
    set_async = ctypes.pythonapi.PyThreadState_SetAsyncExc

    def fire():
        with lock:
            if state["armed"]:
                state["fired"] = True
                set_async(ctypes.c_ulong(tid), ctypes.py_object(_Expired))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except _Expired:
        raise CellTimeout(f"{what} ran past --cell-timeout {seconds:g} s") from None
    finally:
        with lock:
            state["armed"] = False
            timer.cancel()
            if state["fired"]:
                set_async(ctypes.c_ulong(tid), None)  # clear it if still pending
    if state["fired"]:
        raise CellTimeout(f"{what} ran past --cell-timeout {seconds:g} s")


#: Task data by task spec, loaded once per process and kept for every runner there: a worker
#: process runs the teacher phase and then the student phase with two unpickled runners.
LOADED_DATA: dict[str, TaskData] = {}


class CellRunner:
    """Runs teacher jobs and student cells in one process.

    Pickled to worker processes: the plugin manager is not picklable, so a worker loads the
    installed plugins itself (plugins registered at run time exist only in this process)."""

    def __init__(self, plugins: Plugins, cache_dir: Path, device: str = "cpu",
                 cell_timeout: float | None = None, precision: str = "fp32"):
        self.plugins = plugins
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.cell_timeout = cell_timeout
        self.precision = precision
        self.epoch_bars: TextIO | None = None  # a terminal: one bar per training stage
        self._test_logits: dict[tuple, torch.Tensor] = {}

    def __getstate__(self):
        return {"cache_dir": self.cache_dir, "device": self.device, "cell_timeout": self.cell_timeout,
                "precision": self.precision}

    def __setstate__(self, state):
        from .plugins import get_plugins

        self.__init__(get_plugins(), **state)

    @contextlib.contextmanager
    def epoch_bar(self, epochs: int, label: str):
        """A tqdm bar over one training stage's epochs, on a terminal only (not in workers)."""
        if self.epoch_bars is None:
            yield None
            return
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc=label, unit="epoch", leave=False, file=self.epoch_bars,
                   position=1, **bar_layout(self.epoch_bars))
        try:
            yield lambda row: (bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3g}", refresh=False),
                               bar.update(1))
        finally:
            bar.close()

    # ------------------------------------------------------------ shared pieces
    def data(self, task_ref) -> TaskData:
        """The task's splits, loaded once per process (``LOADED_DATA``)."""
        key = digest(task_ref.spec())
        if key not in LOADED_DATA:
            while len(LOADED_DATA) >= 2:  # a grid rarely has more tasks in flight; free the oldest
                LOADED_DATA.pop(next(iter(LOADED_DATA)))
            LOADED_DATA[key] = self.plugins.get("task", task_ref.name).build(task_ref.params).load()
        return LOADED_DATA[key]

    def teacher(self, job: TeacherJob) -> CachedTeacher:
        task = self.plugins.get("task", job.task.name).build(job.task.params)
        family = self.plugins.get("model", job.teacher.name).build(job.teacher.params)
        return obtain_teacher(job, task, family, self.data(job.task), self.cache_dir, self.device,
                              epoch_bar=self.epoch_bar)

    def _guarded(self, labels: dict, config: Callable[[], dict], cell_id: str, experiment: str,
                 role: str, body: Callable[[], tuple[dict, list]]) -> Record:
        warm_up()  # torch's one-off costs are no cell's time
        started = _now()
        try:
            with deadline(self.cell_timeout, f"the {role} cell"):
                metrics, stages = body()
            status, error, tb = "done", None, None
        except Exception as exc:  # a broken cell must not stop the grid
            metrics, stages = {}, []
            status, error, tb = "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()
        return Record(cell_id=cell_id, experiment=experiment, role=role, status=status,
                      metrics=metrics, config=config(), stages=stages,
                      environment={**environment(), "device": self.device,
                                   "precision": self.precision, "seeds": seeds_of(labels["seed"]),
                                   "plugins": dict(self.plugins.versions)},
                      started_at=started, finished_at=_now(), error=error, traceback=tb, **labels)

    def failed_record(self, job, error: str) -> Record:
        """A failure recorded without running ``job`` (a cell or a teacher job)."""
        now = _now()
        if isinstance(job, TeacherJob):
            ids = dict(cell_id=job.cell_id, experiment=job.experiment.name, role="teacher",
                       config=job.config(), **job.labels())
        else:
            ids = dict(cell_id=job.cell_id(self.plugins), experiment=job.experiment.name, role="student",
                       config=job.config(self.plugins), **cell_labels(job))
        return Record(status="failed", metrics={}, stages=[], started_at=now, finished_at=now,
                      environment={**environment(), "device": self.device}, error=error, **ids)

    def lost_record(self, job, reason: str) -> Record:
        """The record of a job whose worker died under it (killed, out of memory)."""
        return self.failed_record(job, f"WorkerLost: {reason}")

    # ------------------------------------------------------------ teacher jobs
    def run_teacher(self, job: TeacherJob) -> Record:
        self.plugins.pm.hook.kdbench_cell_started(cell=job)

        def body():
            seed_everything(job.seed)
            cached = self.teacher(job)
            task = self.plugins.get("task", job.task.name).build(job.task.params)
            metrics = measure(export(cached.model), self.data(job.task), task, None,
                              job.experiment.measure)
            metrics["train_seconds"] = cached.train_seconds
            if job.experiment.measure.probe:
                family = self.plugins.get("model", job.teacher.name).build(job.teacher.params)
                metrics.update(self.probe_figures(cached.model, family, self.data(job.task), job.seed))
            stage = {"history": cached.history}
            metrics.update(epoch_figures([stage], task.metric))
            verdict = stage_convergence(cached.history, task.metric, task.higher_is_better,
                                        job.training.converge_tolerance)
            if verdict.converged is not None:
                metrics["converged"] = row_converged([verdict.converged])
            if job.training.require_converged and verdict.converged is False:
                raise NotConverged(not_converged_message(f"teacher {job.teacher.label()} train", verdict,
                                                         job.training.converge_tolerance))
            return metrics, [{"op": "train", "seconds": cached.train_seconds,
                              "from_cache": cached.from_cache, "history": cached.history, **verdict.log()}]

        return self._guarded(job.labels(), job.config, job.cell_id, job.experiment.name, "teacher", body)

    # ------------------------------------------------------------ teacher outputs
    def teacher_identity(self, job: TeacherJob, family) -> str:
        """What the teacher's weights depend on: for a released checkpoint its spec alone (no
        seed, no training), so every seed shares one cache of its outputs."""
        return digest(job.teacher.spec()) if family.pretrained else job.teacher_key

    def teacher_outputs(self, cell: Cell, job: TeacherJob, family, model: nn.Module, distiller,
                        data: TaskData, log: list[dict]):
        """The teacher's outputs over the training split, computed once per (teacher, task,
        split) and cached, when that is valid: a distiller that reads only outputs and data
        without augmentation (the teacher then sees the same inputs every epoch). With the
        experiment's ``teacher_cache: {top_k}`` they are top-k log-probabilities (language
        models); otherwise the exact logits, when they fit ``EXACT_LIMIT_BYTES``. ``None``: the
        teacher runs beside the student, batch by batch."""
        if distiller.needs_features or distiller.needs_attention or data.train_transform is not None:
            return None
        from .logit_cache import (EXACT_LIMIT_BYTES, TopKLogits, cache_key, cached_logits, cached_topk,
                                  compute_logits, exact_key)

        settings, inputs = cell.experiment.teacher_cache, data.train.tensors[0]
        identity, folder = self.teacher_identity(job, family), self.cache_dir / "teacher-outputs"
        start = time.perf_counter()
        if settings is not None:
            key = cache_key(identity, cell.task.spec(), "train", settings.top_k)
            topk, from_cache = cached_topk(folder / f"{key}.pt", lambda: TopKLogits.compute(
                model, inputs, settings.top_k, device=self.device))
            entry = {"top_k": settings.top_k, "bytes_per_token": topk.bytes_per_token(),
                     "positions": int(topk.log_rest.numel())}
            outputs = topk.log_probs
        else:
            key = exact_key(identity, cell.task.spec(), "train")
            memo_key = ("train-logits", key)  # kept in memory too: cells of a run share it
            from_cache = memo_key in self._test_logits
            if from_cache:
                logits = self._test_logits[memo_key]
            else:
                one = compute_logits(model, inputs[:1], device=self.device)  # outputs per example
                if len(inputs) * one.numel() * 4 > EXACT_LIMIT_BYTES:
                    return None
                logits, from_cache = cached_logits(folder / f"{key}.pt", lambda: compute_logits(
                    model, inputs, device=self.device))
                self._memo(memo_key, lambda: logits)
            entry = {"exact": True, "bytes": logits.numel() * 4}
            outputs = logits.__getitem__
        log.append({**entry, "from_cache": from_cache, "seconds": time.perf_counter() - start})
        return outputs

    def teacher_test_logits(self, job: TeacherJob, family, task_ref, model: nn.Module,
                            data: TaskData, batch_size: int) -> torch.Tensor:
        """The teacher's test-split logits, computed once per process and teacher (an LLM
        teacher's pass over the test split costs more than a small student's whole cell)."""
        return self._memo(("logits", self.teacher_identity(job, family), digest(task_ref.spec())),
                          lambda: predict(model, data.test.tensors[0], batch_size))

    def _memo(self, key: tuple, compute):
        """A few teachers' test outputs (cells of one recipe run seed after seed, each seed its
        own teacher); the oldest goes first, since a large vocabulary makes them big."""
        if key not in self._test_logits:
            while len(self._test_logits) >= 4:
                self._test_logits.pop(next(iter(self._test_logits)))
            self._test_logits[key] = compute()
        return self._test_logits[key]

    def probe_figures(self, model: nn.Module, family, data: TaskData, seed: int,
                      teacher: nn.Module | None = None, teacher_point: str | None = None,
                      teacher_key: tuple | None = None) -> dict[str, float]:
        """Linear-probe accuracy of the model's deepest feature point (its embedding), fitted on
        the training split and scored on test; with a teacher, the cosine agreement (equal
        widths) and linear CKA of the two embeddings of the test split."""
        from .probe import cosine_agreement, embeddings, linear_cka, probe_accuracy

        points = family.feature_points(model)
        (x_train, y_train), (x_test, y_test) = data.train.tensors, data.test.tensors
        if not points or y_test.dim() != 1:
            return {}
        train, test = embeddings(model, points[-1], x_train), embeddings(model, points[-1], x_test)
        out = {"probe_accuracy": probe_accuracy(train, y_train, test, y_test, seed=seed)}
        if teacher is not None and teacher_point is not None:
            theirs = self._memo(("embedding",) + teacher_key, lambda: embeddings(teacher, teacher_point, x_test))
            cosine = cosine_agreement(test, theirs)
            if cosine is not None:
                out["teacher_cosine"] = cosine
            out["teacher_cka"] = linear_cka(test, theirs)
        return out

    # ------------------------------------------------------------ student cells
    def run_cell(self, cell: Cell) -> Record:
        self.plugins.pm.hook.kdbench_cell_started(cell=cell)
        return self._guarded(cell_labels(cell), lambda: cell.config(self.plugins),
                             cell.cell_id(self.plugins), cell.experiment.name, "student",
                             functools.partial(self._student, cell))

    def _student(self, cell: Cell) -> tuple[dict, list]:
        seed_everything(cell.seed)
        data = self.data(cell.task)
        task = self.plugins.get("task", cell.task.name).build(cell.task.params)
        job = cell.teacher_job(self.plugins)
        cached = self.teacher(job)
        teacher_family = self.plugins.get("model", cell.pair.teacher.name).build(cell.pair.teacher.params)
        teacher = Teacher(cached.model, teacher_family.feature_points(cached.model),
                          teacher_family.attention_points(cached.model))

        if cell.stages[0].op == "init":
            family, model = teacher_family, copy.deepcopy(cached.model)
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            family = self.plugins.get("model", cell.pair.student.name).build(cell.pair.student.params)
            model = family.build(data)
        base = cell.student_training(self.plugins)

        log: list[dict] = []
        outputs_log: list[dict] = []  # teacher outputs cached or read, per training stage
        extra_params = 0
        updates = UpdateTracker()  # which parameters training changed (is the head trained?)
        from_teacher = cell.stages[0].op == "init"  # the weights, head included, are the trained teacher's
        example = data.train.tensors[0][:2]

        def train(model: nn.Module, training, ref) -> list[dict]:
            """Train in place, with the distiller of ``ref`` if given; adapters are counted."""
            nonlocal extra_params
            distiller, extra, outputs = None, [], None
            # Tap points are read per call: a compressor may have replaced modules.
            student = Tapped(model, family.feature_points(model), family.attention_points(model))
            if ref is not None:
                distiller = self.plugins.get("distiller", ref.name).build(ref.params)
                extra = distiller.setup(DistillContext(
                    model, teacher.model, data, student.feature_points, teacher.feature_points,
                    student.attention_points, teacher.attention_points, training.epochs))
                extra_params += sum(p.numel() for m in extra for p in m.parameters())
                outputs = self.teacher_outputs(cell, job, teacher_family, cached.model, distiller, data,
                                               outputs_log)
            with self.epoch_bar(training.epochs, f"{cell.recipe} seed {cell.seed}") as on_epoch, \
                    updates.watch(model, example):
                return fit(model, data, task, training, cell.seed, distiller=distiller, teacher=teacher,
                           student=student, extra_modules=extra, device=self.device,
                           precision=self.precision,
                           teacher_outputs=outputs, on_epoch=on_epoch)

        calibration_size = cell.experiment.measure.calibration_size
        # A seeded sample of the training split, the same for every recipe of a seed.
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cell.seed))
        calibration = order[:calibration_size]
        # Leading training stages another recipe has already run for this seed are loaded.
        prefixes = {k: stage_cache.prefix_key(cell, self.plugins, k, self.device, self.precision)
                    for k in stage_cache.training_prefixes(cell)}
        done = 0
        for k in sorted(prefixes, reverse=True):
            saved = stage_cache.load(self.cache_dir, prefixes[k])
            if saved is not None:
                model.load_state_dict(saved.state)
                log = [{**entry, "from_cache": True} for entry in saved.entries]
                extra_params = saved.extra_params
                updates.restore(saved.updates)
                stage_cache.restore(saved.rng)
                done = k
                break
        for index, stage in enumerate(cell.stages[done:], start=done + 1):
            start = time.perf_counter()
            entry: dict[str, Any] = {"op": stage.op, "name": stage.ref.name if stage.ref else None}
            if stage.op == "init":
                entry["source"] = stage.source
            elif stage.op in ("train", "distill", "finetune"):
                training = stage.resolve_training(base)
                entry["history"] = train(model, training, stage.ref)
                verdict = stage_convergence(entry["history"], task.metric, task.higher_is_better,
                                            training.converge_tolerance)
                if not (from_teacher or updates.head_trained()):
                    verdict = verdict.withheld()  # the validation metric reads an untrained head
                entry.update(verdict.log())
                if training.require_converged and verdict.converged is False:
                    raise NotConverged(not_converged_message(stage.label(), verdict, training.converge_tolerance))
            else:
                compressor = self.plugins.get(COMPRESSOR_KIND[stage.op], stage.ref.name).build(stage.ref.params)
                if stage.op != "prune":
                    model = export(model)  # fold earlier pruning masks into the weights first
                entry["history"] = []

                def finetune(m: nn.Module, epochs: int, distill: Any = None) -> list[dict]:
                    # A DistillerRef parameter arrives resolved (its spec is in the cell id); a
                    # name or mapping from a compressor that builds its own is resolved here.
                    ref = distill if isinstance(distill, Ref) or not distill else parse_ref(
                        self.plugins, "distiller", distill, f"{stage.ref.name}.distill")
                    history = train(m, dataclasses.replace(base, epochs=epochs), ref)
                    entry["history"].extend(history)
                    return history

                context = CompressionContext(
                    data=data, calibration=data.train.tensors[0][calibration], teacher=teacher.model,
                    seed=cell.seed, calibration_targets=data.train.tensors[1][calibration],
                    finetune=finetune)
                model = compressor.apply(model, context)
                entry.update(materialized=compressor.materialized, report=compressor.report(),
                             calibration={"split": "train", "size": len(calibration), "seed": cell.seed})
                if not entry["history"]:
                    del entry["history"]
            entry["seconds"] = time.perf_counter() - start
            if outputs_log:
                entry["teacher_outputs"] = outputs_log[:]
                outputs_log.clear()
            log.append(entry)
            if index in prefixes:
                stage_cache.save(self.cache_dir, prefixes[index], model,
                                 [{k: v for k, v in e.items() if k != "from_cache"} for e in log], extra_params,
                                 updates.state())

        deployable = export(model)
        teacher_logits = self.teacher_test_logits(job, teacher_family, cell.task, teacher.model, data,
                                                  cell.experiment.measure.eval_batch_size)
        # The teacher is timed beside the student: the speedup column is a paired ratio.
        metrics = measure(deployable, data, task, teacher_logits, cell.experiment.measure,
                          reference=export(teacher.model))
        # Computing the teacher's cached outputs is paid once for all cells: reported apart.
        outputs_seconds = sum(t["seconds"] for e in log for t in e.get("teacher_outputs", []))
        metrics["train_seconds"] = sum(e["seconds"] for e in log) - outputs_seconds
        metrics["teacher_outputs_seconds"] = outputs_seconds
        metrics["teacher_train_seconds"] = cached.train_seconds
        metrics["extra_train_params"] = extra_params
        metrics["materialized"] = all(e.get("materialized", True) for e in log)
        metrics.update(training_figures(log, updates, from_teacher))
        if cell.experiment.measure.probe:
            metrics.update(self.probe_figures(
                deployable, family, data, cell.seed, teacher.model, (teacher.feature_points or [None])[-1],
                (self.teacher_identity(job, teacher_family), digest(cell.task.spec()))))
        metrics.update(epoch_figures(log, task.metric))
        return metrics, log


def training_figures(log: list[dict], updates: UpdateTracker, from_teacher: bool) -> dict[str, float]:
    """A cell's verdicts on its training: ``converged`` (1.0 when every judged training stage
    had stopped improving, 0.0 when one had not; absent when none was judged), ``head_trained``
    (1.0 when training changed the head, or the weights are a copy of the trained teacher's)
    and ``never_updated_params``, the count of parameters no training changed, whose names the
    log of the last trained stage lists (``never_updated``, with the ``head`` module)."""
    out: dict[str, float] = {}
    converged = row_converged([e.get("converged") for e in log if e.get("op") in ("train", "distill", "finetune")])
    if converged is not None:
        out["converged"] = converged
    if updates.trained:
        never = updates.never_updated()
        last = next((e for e in reversed(log) if "history" in e), log[-1])
        last.update(never_updated=never, head=updates.head)
        out["never_updated_params"] = float(len(never))
        out["head_trained"] = 1.0 if from_teacher or updates.head_trained() else 0.0
    return out


def epoch_figures(log: list[dict], metric: str) -> dict[str, float]:
    """Last-epoch and chosen-epoch test metrics of the last training stage.

    They describe the deployed model only when that stage ends the recipe; after a
    compression stage they describe the model before compression.
    """
    trained = [e for e in log if e.get("history")]
    if not trained:
        return {}
    history = trained[-1]["history"]
    chosen = next(r for r in history if r.get("chosen"))
    return {f"last_epoch_test_{metric}": history[-1][f"test_{metric}"],
            f"chosen_epoch_test_{metric}": chosen[f"test_{metric}"],
            "chosen_epoch": chosen["epoch"]}


def cell_labels(cell: Cell) -> dict:
    labels = cell.labels()
    if cell.stages[0].op == "init":  # the student is a copy of the teacher
        labels["student"] = labels["teacher"]
    return labels


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeds_of(seed: int) -> dict[str, int]:
    """The seeds a cell gave each generator (``seed_everything``), recorded with its result."""
    return {"python": seed, "numpy": seed, "torch": seed}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclasses.dataclass
class Plan:
    """What a run would do: the grid's cells, their stored state, the teachers to obtain."""

    cells: list[Cell]
    status: dict[str, str]  # cell id -> 'done' | 'failed' (absent: never finished)
    claimed: dict[str, str]  # cell id -> the other live run working on it
    pending: list[Cell]  # the cells this run will try to claim
    teacher_jobs: list[TeacherJob]  # teachers a pending cell needs whose row is missing or failed

    def failed_left(self, plugins: Plugins, retry_failed: bool) -> int:
        """Failed cells this run leaves alone (rerun with ``--retry-failed``)."""
        return 0 if retry_failed else sum(self.status.get(c.cell_id(plugins)) == "failed" for c in self.cells)


def runs_now(status: str | None, retry_failed: bool) -> bool:
    """Whether a run takes a cell of this stored status: never finished (None), or with
    ``retry_failed`` failed."""
    return status == "failed" if retry_failed else status is None


def plan_run(experiment: Experiment, store: Store | None, plugins: Plugins, retry_failed: bool = False) -> Plan:
    """The cells a run does: those never finished, or with ``retry_failed`` those that failed.
    ``store`` None: a store that does not exist yet (everything is pending)."""
    status = store.statuses() if store is not None else {}
    cells = experiment.cells()
    pending = [c for c in cells if runs_now(status.get(c.cell_id(plugins)), retry_failed)]
    jobs: dict[str, TeacherJob] = {}
    for cell in pending:
        job = cell.teacher_job(plugins)
        if status.get(job.cell_id) != "done":
            jobs.setdefault(job.cell_id, job)
    # Teachers whose row exists but whose weights a pending cell needs are loaded or
    # retrained inside that cell (the cache is keyed by the same hash).
    claimed = store.claimed_elsewhere() if store is not None else {}
    return Plan(cells, status, claimed, pending, list(jobs.values()))


def bar_layout(stream: TextIO) -> dict:
    """tqdm's size settings for a terminal: follow its size, or 100 x 40 where it reports none
    (a pseudo-terminal opened without a size, as ``script`` opens one): tqdm would take 0 rows
    and hide every bar."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    return {"dynamic_ncols": True} if size.columns and size.lines else {"ncols": 100, "nrows": 40}


class Progress:
    """The grid's progress: a tqdm bar (cells done, failed, remaining, ETA) on a terminal,
    one line per finished cell otherwise (logs and CI), nothing when quiet."""

    def __init__(self, stream: TextIO | None, total: int):
        self.stream, self.bar, self.failed = stream, None, 0
        if stream is not None and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=stream, unit="cell", leave=True, **bar_layout(stream))

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        elif self.stream is not None:
            print(msg, file=self.stream, flush=True)

    def advance(self, ok: bool) -> None:
        self.failed += not ok
        if self.bar is not None:
            self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_executor(plugins: Plugins, experiment: Experiment, name: str | None = None,
                   overrides: dict | None = None, threads: int | None = None):
    """The executor of the command line (``--executor``, ``--workers``, ``--scheduler``), else
    the experiment file's, else ``local``; overrides apply to the file's executor too.
    ``threads`` (``--threads``) becomes the workers' torch threads where the executor has them."""
    ref = experiment.executor
    if name is None:
        name = ref.name if ref is not None else "local"
    params = as_dict(ref.params) if ref is not None and ref.name == name else {}
    params.update(overrides or {})
    fields = getattr(plugins.get("executor", name, "--executor").cls.Params, "__dataclass_fields__", {})
    if threads is not None and "threads" in fields:
        params["threads"] = threads
    return plugins.build("executor", name, params, where="--executor")


def run_experiment(experiment: Experiment, store: Store, plugins: Plugins, cache_dir: Path,
                   executor=None, progress: TextIO | None = sys.stderr, device: str = "cpu",
                   retry_failed: bool = False, cell_timeout: float | None = None,
                   precision: str = "fp32", plan: Plan | None = None) -> RunSummary:
    """Run every cell of the grid that the store does not hold (with ``retry_failed``: every
    cell it holds as failed), claiming each one as it starts, so that runs sharing the store
    split the grid between them. ``executor``: a started executor, or a name (default: the
    experiment's, else local). ``plan``: this store's plan, if the caller has just made it
    (claims still decide who runs each cell)."""
    if executor is None or isinstance(executor, str):
        executor = build_executor(plugins, experiment, executor)
        executor.start()
        owned = True
    else:
        owned = False
    runner = CellRunner(plugins, cache_dir, device, cell_timeout, precision)
    plan = plan or plan_run(experiment, store, plugins, retry_failed)
    cells, pending, teacher_jobs = plan.cells, plan.pending, plan.teacher_jobs
    left_failed = plan.failed_left(plugins, retry_failed)
    bar = Progress(progress, len(teacher_jobs) + len(pending))
    if bar.bar is not None:
        runner.epoch_bars = progress
    bar.say(f"kdbench: experiment '{experiment.name}': {len(cells)} cells, "
            f"{sum(plan.status.get(c.cell_id(plugins)) == 'done' for c in cells)} already done, "
            f"{len(pending)} to run" + (f", {left_failed} failed earlier (kept; --retry-failed reruns them)"
                                         if left_failed else "")
            + f"; {len(teacher_jobs)} teacher(s) to train or load")

    failed: list[Record] = []
    failed_teachers: dict[str, Record] = {}
    finished = taken = done_students = 0
    total = len(teacher_jobs) + len(pending)
    statuses = ("failed",) if retry_failed else (None,)

    def claimed(items, cell_id_of):
        """Each job as a worker is free for it, if this run could claim it in the store."""
        nonlocal taken
        for item in items:
            if store.claim(cell_id_of(item), statuses):
                yield item
            else:  # another run holds it or has just finished it
                taken += 1
                bar.advance(True)

    def record(job, rec: Record, kind: str) -> None:
        nonlocal finished, done_students
        rec.environment["run"] = store.owner  # which run (host:pid:tag) produced the row
        store.put(rec)
        done_students += rec.ok and rec.role == "student"
        plugins.pm.hook.kdbench_cell_finished(cell=job, record=rec)
        finished += 1
        name = f"{rec.task} | {rec.teacher} -> {rec.student} | {rec.recipe} | seed {rec.seed}"
        if rec.ok:
            metric = next((k for k in rec.metrics if k.startswith("test_")), None)
            score = f"{metric}={rec.metrics[metric]:.4f}" if metric else ""
            bar.say(f"[{finished + taken}/{total}] {kind} {name}: ok {score}")
        else:
            failed.append(rec)
            bar.say(f"[{finished + taken}/{total}] {kind} {name}: FAILED {rec.error}")
        bar.advance(rec.ok)

    store.start_heartbeat()
    try:
        for job, rec in executor.map(runner.run_teacher, claimed(teacher_jobs, lambda j: j.cell_id),
                                     runner.lost_record):
            record(job, rec, "teacher")
            if not rec.ok:
                failed_teachers[job.teacher_key] = rec
        # A cell whose teacher failed fails at once, naming the cause, rather than retrying it.
        runnable = []
        for cell in pending:
            cause = failed_teachers.get(cell.teacher_job(plugins).teacher_key)
            if cause is None:
                runnable.append(cell)
            elif store.claim(cell.cell_id(plugins), statuses):
                record(cell, runner.failed_record(cell, f"its teacher failed: {cause.error}"), "cell")
        for cell, rec in executor.map(runner.run_cell, claimed(runnable, lambda c: c.cell_id(plugins)),
                                      runner.lost_record):
            record(cell, rec, "cell")
    finally:
        store.stop_heartbeat()
        bar.close()
        if owned:
            executor.close()
    return RunSummary(total=len(cells), skipped=len(cells) - len(pending), done=done_students,
                      failed=failed, taken=taken, failed_earlier=left_failed)
