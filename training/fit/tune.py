"""`tlserve tune`: an Optuna search over a training configuration's hyperparameters.

The base configuration is `tlserve train`'s (every option, or a recipe); `--space` says which fields
a trial draws (training.fit.search_space). Trials train on the train split and are judged on the
validation split (training.fit.trial), with a TPE sampler and a median pruner fed each epoch's
validation accuracy; the test split is not read until the search is over. Then the best
configuration is written as a recipe and trained as a run, and so is the base configuration (the
default), each by `tlserve train`'s own loop, so their test accuracies are measured once each, the
same way.

The study lives in Optuna's RDB storage (SQLite under the study folder by default): a killed study
resumes where it stopped (a trial it was in the middle of is failed by Optuna's heartbeat and
tried again), and several processes given the same --study and --storage share its trials. The
last steps (recipe, the two runs, summary) run under a file lock in the study folder: the first
process to get there trains the two runs, the others find them and report the same result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from serving.base import storage
from serving.base.errors import UserError, choose
from training.config import TrainConfig
from training.fit import recipes, search_space
from training.fit.trial import Trainer, TrialResult
from training.fit.validation import resolve
from training.record import records

Log = Callable[[str], None]
PRUNERS = ("median", "none")
STUDY_DB = "study.db"
BEST_RECIPE = "best.yaml"
SUMMARY = "summary.json"
TRIALS_CSV = "trials.csv"
HEARTBEAT_SECONDS = 10  # a killed process's trial is failed (and retried) this long x2 after its last beat
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SETTINGS = "tlserve"   # the study's user attribute holding its base configuration and space


@dataclass
class TuneOptions:
    space: str | None
    trials: int = 40
    study: str | None = None
    storage: str | None = None    # an Optuna RDB URL; default sqlite:///<out>/study.db
    out: Path | None = None       # the study folder; default $TLSERVE_HOME/tune/<study>
    timeout: float | None = None  # seconds this process searches
    pruner: str = "median"
    final: bool = True            # train the best and default configurations after the search


@dataclass
class TrialRow:
    """One finished trial, as the progress table and trials.csv show it."""
    number: int
    state: str                    # complete | pruned | fail
    val_accuracy: float | None
    epochs: int | None
    seconds: float | None
    params: dict[str, Any]


@dataclass
class TuneResult:
    study: str
    folder: Path
    storage: str
    space: str
    trials: list[TrialRow]
    best: TrialRow
    recipe: Path
    best_run: records.Run | None = None
    default_run: records.Run | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def default_study(cfg: TrainConfig) -> str:
    scheme, _, arg = cfg.data.spec.partition(":")
    data = re.sub(r"[^A-Za-z0-9]+", "-", Path(arg).name if arg else scheme).strip("-") or scheme
    return f"tune-{cfg.backbone}-{cfg.strategy}-{data}"


def tune(base: TrainConfig, opts: TuneOptions, runs_dir: Path | None = None, *, log: Log = print,
         on_trial: Callable[[TrialRow], None] | None = None, tracker=None) -> TuneResult:
    """Search, then train the best and the default configurations; every check before anything is written."""
    space = search_space.parse(opts.space)
    choose("--pruner", opts.pruner, PRUNERS)
    if opts.trials < 1:
        raise UserError("--trials must be at least 1")
    base = resolve(dataclasses.replace(base, name=None, overwrite=False))
    if base.teacher:
        raise UserError("tune does not search with --teacher yet; tune the student's options without it")
    if base.augment_views:
        raise UserError("tune does not search with --augment-views yet; use --augment (layers in the model)")
    search_space.check(space, base)
    study_name = opts.study or default_study(base)
    if not _NAME.match(study_name):
        raise UserError(f"--study '{study_name}': use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    folder = Path(opts.out) if opts.out else storage.home() / "tune" / study_name
    url = opts.storage or f"sqlite:///{(folder / STUDY_DB).resolve()}"
    settings = {"config": _comparable(base), "space": space.text()}
    if _exists(url, folder):
        _check_settings(_load(url, study_name, log), settings, study_name)

    from training.fit.train import load_data  # noqa: PLC0415 (the very data loading and checks of a run)

    dataset = load_data(base, log).dataset
    folder.mkdir(parents=True, exist_ok=True)
    with _lock(folder / ".open.lock"):  # two processes creating the database's tables at once collide
        study = _open(url, study_name, opts, base.seed, settings, log)
    if tracker is not None:
        tracker.start_study(study_name, settings["config"], space.text(), opts.trials)
    scratch = folder / f".cache-{os.getpid()}"
    trainer = Trainer(dataset, scratch)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    try:
        _search(study, space, base, trainer, opts, log, on_trial, tracker)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    searched = {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(_cpu_seconds() - cpu0, 2),
                "extract_seconds": round(trainer.extract_seconds, 2)}
    with _lock(folder / ".final.lock"):
        return _finish(study, space, base, folder, url, opts, runs_dir, searched, log, tracker)


# ---- the study -------------------------------------------------------------------------------

def _optuna():
    import optuna  # noqa: PLC0415 (only `tlserve tune` needs it)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our table says what each trial did
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _storage(url: str):
    optuna = _optuna()
    if url.startswith("sqlite:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=HEARTBEAT_SECONDS,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None)


def _exists(url: str, folder: Path) -> bool:
    """Whether the study may already exist (a SQLite file is only looked for; other URLs are asked)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).is_file()
    return True


def _load(url: str, name: str, log: Log):
    optuna = _optuna()
    try:
        return optuna.load_study(study_name=name, storage=_storage(url))
    except KeyError:
        return None
    except Exception as exc:  # sqlalchemy's errors: an unreachable or unreadable database
        raise UserError(f"--storage {url}: cannot open the study database: {str(exc).splitlines()[0]}") from None


def _check_settings(study, settings: dict[str, Any], name: str) -> None:
    if study is None:
        return
    stored = study.user_attrs.get(_SETTINGS)
    if stored is None:
        return
    for key, what in (("config", "training configuration"), ("space", "search space")):
        if stored[key] != settings[key]:
            changed = sorted(k for k in set(stored[key]) | set(settings[key])
                             if stored[key].get(k) != settings[key].get(k)) if key == "config" else [stored[key]]
            raise UserError(f"study '{name}' was started with another {what} ({', '.join(map(str, changed))}); "
                            "resume it with its own options, or give another --study")


def _open(url: str, name: str, opts: TuneOptions, seed: int, settings: dict[str, Any], log: Log):
    """Create the study, or load it (resuming, or joining other processes). The process that creates it
    samples from the run's seed; one that joins draws its own seed, so two processes do not propose
    the same first trials."""
    optuna = _optuna()
    store = _storage(url)
    # Not before the 4th epoch: a low learning rate starts slowly, and the search should still see where it ends.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3) if opts.pruner == "median" \
        else optuna.pruners.NopPruner()
    try:
        study = optuna.create_study(study_name=name, storage=store, direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
        study.set_user_attr(_SETTINGS, settings)
        log(f"study '{name}': new, in {url}")
        return study
    except optuna.exceptions.DuplicatedStudyError:
        pass
    joined_seed = (seed * 1_000_003 + os.getpid() + time.time_ns()) % 2**32
    study = optuna.load_study(study_name=name, storage=store, pruner=pruner,
                              sampler=optuna.samplers.TPESampler(seed=joined_seed))
    _check_settings(study, settings, name)
    if _SETTINGS not in study.user_attrs:
        study.set_user_attr(_SETTINGS, settings)
    log(f"study '{name}': {_counted(study)} of {opts.trials} trials finished, continuing (in {url})")
    return study


def _finished_states():
    from optuna.trial import TrialState  # noqa: PLC0415

    return (TrialState.COMPLETE, TrialState.PRUNED)


def _counted(study) -> int:
    return len(study.get_trials(deepcopy=False, states=_finished_states()))


def _search(study, space: search_space.Space, base: TrainConfig, trainer: Trainer, opts: TuneOptions, log: Log,
            on_trial, tracker) -> None:
    optuna = _optuna()
    remaining = opts.trials - _counted(study)
    if remaining <= 0:
        log(f"all {opts.trials} trials are done; nothing left to search")
        return

    def objective(trial) -> float:
        cfg = resolve(search_space.apply(base, space.suggest(trial)))

        reported: list[float] = []

        def report(step: int, accuracy: float) -> None:
            reported.append(accuracy)
            trial.report(accuracy, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {step + 1}: val accuracy {accuracy:.4f} below the median")

        result: TrialResult | None = None
        t0 = time.perf_counter()
        try:
            result = trainer.fit(cfg, report)
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
            trial.set_user_attr("epochs", result.epochs if result else len(reported))
        return result.val_accuracy

    def ended(study_, frozen) -> None:
        row = row_of(frozen)
        if on_trial is not None:
            on_trial(row)
        if tracker is not None:
            tracker.safely(lambda: tracker.log_trial(row, frozen.intermediate_values), what=f"trial {row.number}", log=log)

    # Every process stops once the study holds --trials finished trials (two that start the last one
    # together may finish one more).
    limit = optuna.study.MaxTrialsCallback(opts.trials, states=_finished_states())
    study.optimize(objective, n_trials=remaining, timeout=opts.timeout, callbacks=[limit, ended], gc_after_trial=True)


def row_of(frozen) -> TrialRow:
    return TrialRow(number=frozen.number, state=frozen.state.name.lower(), val_accuracy=frozen.value,
                    epochs=frozen.user_attrs.get("epochs"), seconds=frozen.user_attrs.get("seconds"),
                    params=dict(frozen.params))


# ---- after the search -------------------------------------------------------------------------

@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One process of a study at a time (opening the study; the recipe and the two runs after the search).
    The lock goes with the process, so a killed one leaves none behind."""
    import fcntl  # noqa: PLC0415

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _finish(study, space: search_space.Space, base: TrainConfig, folder: Path, url: str, opts: TuneOptions,
            runs_dir: Path | None, searched: dict[str, Any], log: Log, tracker) -> TuneResult:
    from optuna.trial import TrialState  # noqa: PLC0415

    rows = [row_of(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        raise UserError(f"study '{study.study_name}': no trial finished (all pruned or failed); widen --space "
                        "or raise --trials")
    best_trial = study.best_trial
    best_cfg = resolve(search_space.apply(base, best_trial.params))
    recipe = folder / BEST_RECIPE
    storage.write_text(recipe, _recipe_text(best_cfg, study.study_name, best_trial))
    storage.write_text(folder / TRIALS_CSV, trials_csv(rows, space.names))
    result = TuneResult(study.study_name, folder, url, space.text(), rows, row_of(best_trial), recipe)
    if opts.final:
        result.best_run = _final_run(best_cfg, f"{study.study_name}-best", runs_dir, log)
        result.default_run = _final_run(base, f"{study.study_name}-default", runs_dir, log)
    result.summary = _summary(result, searched)
    storage.write_json(folder / SUMMARY, result.summary)
    if tracker is not None:
        tracker.safely(lambda: tracker.log_study(result), what=f"study {result.study}", log=log)
    return result


def _recipe_text(cfg: TrainConfig, study: str, trial) -> str:
    import yaml  # noqa: PLC0415

    options = recipes.record_options(_comparable(cfg))
    head = (f"# The best configuration of study '{study}': trial {trial.number}, validation accuracy "
            f"{trial.value:.4f}.\n# Train it with: tlserve train --config {BEST_RECIPE}\n")
    return head + yaml.safe_dump(options, sort_keys=True)


def _final_run(cfg: TrainConfig, name: str, runs_dir: Path | None, log: Log) -> records.Run:
    """The configuration trained as a run named `name`: an existing run of that very configuration (from
    another process of the study, or before a kill) is reused; anything else under that name is replaced."""
    from training.fit.train import train  # noqa: PLC0415

    path = storage.runs_dir(runs_dir) / name
    if (path / records.RECORD).is_file():
        run = records.load_run(str(path))
        if _comparable(TrainConfig.from_dict(run.record.config)) == _comparable(cfg):
            log(f"run '{name}': already trained with this configuration")
            return run
    log(f"training run '{name}' (its test accuracy is measured once, at its end)")
    return train(dataclasses.replace(cfg, name=name, overwrite=True), runs_dir, log=log, progress=False)


def _comparable(cfg: TrainConfig) -> dict[str, Any]:
    """The configuration without how a run was started (its name, --overwrite)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("name", "overwrite")}


def _summary(result: TuneResult, searched: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for row in result.trials:
        counts[row.state] = counts.get(row.state, 0) + 1

    def run_facts(run: records.Run | None) -> dict[str, Any] | None:
        return None if run is None else {"name": run.name, "test_accuracy": run.record.test.accuracy,
                                         "val_accuracy": _last_val(run.record)}

    return {"study": result.study, "storage": result.storage, "space": result.space, "trials": counts,
            "best_trial": dataclasses.asdict(result.best), "recipe": str(result.recipe),
            "best_run": run_facts(result.best_run), "default_run": run_facts(result.default_run),
            "search": searched}


def _last_val(record: records.RunRecord) -> float | None:
    vals = [r.get("val_accuracy") for r in record.history if r.get("val_accuracy") is not None]
    return vals[-1] if vals else None


def trials_csv(rows: list[TrialRow], names: list[str]) -> str:
    import csv  # noqa: PLC0415
    import io  # noqa: PLC0415

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", "state", "val_accuracy", "epochs_run", "seconds", *names])
    for r in rows:
        writer.writerow([r.number, r.state, r.val_accuracy, r.epochs, r.seconds, *(r.params.get(n) for n in names)])
    return buf.getvalue()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
